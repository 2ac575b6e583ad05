/// Hard limits of the wire protocol. Every length the decoder reads is checked
/// against one of these before anything is allocated, so no input, however
/// hostile, makes a peer allocate more than these bounds.
public enum ProtocolLimits {
    /// Version 2: CheckFree (reconstruction in restores, recovery reports
    /// and manifests; the checkFree and shard messages; the carried kind).
    /// Version 3: the durable tier (flushed steps in status and recovery
    /// reports, a restore's durable source, the export messages) and the
    /// operator's cluster-wide requests (status, drain, verify, rebuild plan).
    /// Version 4: fields no receiver read are gone (a heartbeat's live nodes,
    /// a welcome's daemon version, a save acceptance's shard state, a fragment
    /// acknowledgement's holder, a rebuild order's incarnation).
    public static let version: UInt8 = 4
    /// Control payload of one frame (manifests, status). Bulk bytes are separate.
    public static let maximumControlPayloadBytes = 8 << 20
    /// Control payload of the peer messages that carry manifests (see
    /// ``MessageType/maximumPayloadBytes``).
    public static let maximumLargeControlPayloadBytes = 1 << 30
    /// Bulk bytes following one frame's payload (a tensor or a fragment).
    public static let maximumBulkBytes: UInt64 = 1 << 40
    /// Tensor names, job ids and other identifiers, in UTF-8 bytes.
    public static let maximumNameBytes = 256
    public static let maximumJobIDBytes = 128
    /// File system paths (Linux PATH_MAX).
    public static let maximumPathBytes = 4096
    /// Human-readable messages (errors, warnings).
    public static let maximumMessageBytes = 4096
    public static let maximumTensorsPerShard = 16_384
    public static let maximumShapeRank = 16
    /// Opaque trainer metadata attached to a save (e.g. data-loader position).
    public static let maximumMetadataBytes = 64 << 10
    public static let maximumWorldSize: UInt32 = 1 << 20
    /// Entries in list replies (jobs, steps, nodes, ranks).
    public static let maximumListEntries = 65_536
    /// One rank's manifest file (16,384 tensors with 256-byte names fit).
    public static let maximumManifestBytes = 16 << 20
    /// Problems (and notes) one node reports in a verify reply; more are summed up in one line.
    public static let maximumProblemsPerNode = 1024
    /// Named counters in a status reply.
    public static let maximumCounters = 256
    /// Pipelined repair: survivors in one chain (at most k ≤ 255) and the
    /// bounds on a slice, which every hop buffers once.
    public static let maximumRepairChainHops = 255
    public static let repairSliceBytesRange: ClosedRange<UInt32> = 4096...(16 << 20)
    public static let authenticationNonceBytes = 32
    public static let authenticationTagBytes = 32
}
