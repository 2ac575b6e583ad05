public import ErasureCoding
public import SnapshotProtocol

/// A sealed shard's manifest as stored beside its segment, so a restarted
/// daemon knows from its own files what it holds. Self-checking (CRC-32C).
public struct ManifestFile: Equatable, Sendable {
    static let magic: UInt32 = 0x4D50_4E53  // "SNPM"
    /// Version 2 adds the CheckFree reconstruction record; version 1 files still read.
    static let version: UInt8 = 2
    static let maximumBytes = 16 << 20

    public var key: ShardKey
    public var world: UInt32
    public var shard: ShardRecord

    public func encoded() -> [UInt8] {
        var w = ByteWriter(reservingCapacity: 4096)
        w.write(Self.magic)
        // Version 1 where it says all there is: peers of the previous release still read it.
        let version = shard.reconstruction == nil ? 1 : Self.version
        w.write(version)
        w.write(key.job)
        w.write(key.step)
        w.write(key.rank)
        w.write(world)
        w.write(shard.topology)
        w.write(shard.segmentSizeBytes)
        w.writeOptional(shard.gradientNorm?.bitPattern)
        w.write(blob: shard.metadata)
        w.writeCount(shard.specs.count)
        for entry in shard.manifest { w.write(entry) }
        for offset in shard.tensorOffsets { w.write(offset) }
        if version >= 2 { w.writeOptional(shard.reconstruction) }
        w.write(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    public init(key: ShardKey, world: UInt32, shard: ShardRecord) {
        self.key = key
        self.world = world
        self.shard = shard
    }

    public init(decoding bytes: [UInt8]) throws(ProtocolError) {
        guard bytes.count >= 4 else { throw .truncatedField("manifest") }
        let body = Array(bytes.dropLast(4))
        var tail = ByteReader(Array(bytes.suffix(4)))
        let stored = try tail.read(UInt32.self, "manifest.crc32c")
        let computed = CRC32C.checksum(body)
        guard stored == computed else { throw .payloadChecksumMismatch(expected: stored, actual: computed) }
        var r = ByteReader(body)
        guard try r.read(UInt32.self, "magic") == Self.magic else { throw .invalidValue(field: "manifest", reason: "bad magic") }
        let version = try r.read(UInt8.self, "version")
        guard version == 1 || version == Self.version else { throw .unsupportedVersion(version) }
        let job = try r.readJobID()
        let step = try r.read(Step.self, "step")
        let rank = try r.read(Rank.self, "rank")
        world = try r.read(UInt32.self, "world")
        let topology = try r.readTopology()
        let segmentSize = try r.read(UInt64.self, "segmentSizeBytes")
        let norm = try r.readGradientNorm()
        let metadata = try r.readBlob("metadata", limitBytes: ProtocolLimits.maximumMetadataBytes)
        let count = try r.readCount("entries", limit: ProtocolLimits.maximumTensorsPerShard, minimumElementBytes: 17)
        var entries: [ManifestEntry] = []
        for _ in 0..<count { entries.append(try r.readManifestEntry()) }
        var offsets: [UInt64] = []
        for _ in 0..<count { offsets.append(try r.read(UInt64.self, "offset")) }
        let reconstruction = version >= 2 ? try r.readOptionalReconstruction() : nil
        try r.finish()
        // Manifests travel between nodes (readiness reports): a layout that is
        // not the one the tensors imply would send a rebuild past a segment's end.
        guard let layout = SegmentLayout.offsets(for: entries.map(\.spec)), layout.offsets == offsets, layout.segmentSizeBytes == segmentSize else {
            throw .invalidValue(field: "manifest", reason: "tensor offsets or segment size do not match the tensors' layout")
        }
        key = ShardKey(job: job, step: step, rank: rank)
        shard = ShardRecord(
            state: .localComplete, specs: entries.map(\.spec), tensorOffsets: offsets, segmentSizeBytes: segmentSize,
            topology: topology, checksums: entries.map(\.crc32c), gradientNorm: norm, metadata: metadata, writer: nil,
            reconstruction: reconstruction)
    }
}
