/// Saving a shard (beginSave → saveReady, putTensor…, commitSave →
/// saveAccepted, or abortSave → ok) and the commit state a trainer waits on
/// (latestCommitted, which has no payload, → latestCommittedReply;
/// waitCommitted → latestCommittedReply).

public struct BeginSave: WirePayload {
    public static let type = MessageType.beginSave
    public var step: Step
    public var transport: DataTransport
    public var tensors: [TensorSpec]
    public init(step: Step, transport: DataTransport, tensors: [TensorSpec]) {
        self.step = step
        self.transport = transport
        self.tensors = tensors
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.write(transport.rawValue)
        w.write(tensors)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        transport = try r.readEnum(DataTransport.self, "transport")
        tensors = try r.readTensorSpecs()
    }
}

/// Where each tensor goes inside the shard's arena segment. With shared
/// memory, the segment's file descriptor travels with this frame (SCM_RIGHTS).
public struct SaveReady: WirePayload {
    public static let type = MessageType.saveReady
    public var step: Step
    public var segmentSizeBytes: UInt64
    public var tensorOffsets: [UInt64]
    public init(step: Step, segmentSizeBytes: UInt64, tensorOffsets: [UInt64]) {
        self.step = step
        self.segmentSizeBytes = segmentSizeBytes
        self.tensorOffsets = tensorOffsets
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.write(segmentSizeBytes)
        w.write(list: tensorOffsets)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        segmentSizeBytes = try r.read(UInt64.self, "segmentSizeBytes")
        tensorOffsets = try r.readTensorOffsets()
    }
}

/// Bytes `offsetBytes ..< offsetBytes + bulkLength` of tensor `tensorIndex`, as bulk.
public struct PutTensor: WirePayload {
    public static let type = MessageType.putTensor
    public var step: Step
    public var tensorIndex: UInt32
    public var offsetBytes: UInt64
    public init(step: Step, tensorIndex: UInt32, offsetBytes: UInt64) {
        self.step = step
        self.tensorIndex = tensorIndex
        self.offsetBytes = offsetBytes
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.write(tensorIndex)
        w.write(offsetBytes)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        tensorIndex = try r.read(UInt32.self, "tensorIndex")
        offsetBytes = try r.read(UInt64.self, "offsetBytes")
    }
}

public struct CommitSave: WirePayload {
    public static let type = MessageType.commitSave
    public var step: Step
    /// Optional client-computed CRC-32C per tensor; the daemon verifies them.
    public var checksums: [UInt32]?
    /// L2 norm of the rank's last gradient, for CheckFree stage reconstruction.
    public var gradientNorm: Double?
    public var metadata: [UInt8]
    public init(step: Step, checksums: [UInt32]? = nil, gradientNorm: Double? = nil, metadata: [UInt8] = []) {
        self.step = step
        self.checksums = checksums
        self.gradientNorm = gradientNorm
        self.metadata = metadata
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.write(checksums != nil)
        if let checksums { w.write(list: checksums) }
        w.writeOptional(gradientNorm?.bitPattern)
        w.write(blob: metadata)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        checksums = try r.readBool("hasChecksums") ? try r.readList(of: UInt32.self, "checksums", limit: ProtocolLimits.maximumTensorsPerShard) : nil
        gradientNorm = try r.readGradientNorm()
        metadata = try r.readBlob("metadata", limitBytes: ProtocolLimits.maximumMetadataBytes)
    }
}

/// The shard's bytes are the daemon's: sealing (checksums, protection) goes
/// on in the background, and status reports how far it got.
public struct SaveAccepted: WirePayload {
    public static let type = MessageType.saveAccepted
    public var step: Step
    public init(step: Step) { self.step = step }

    public func encode(into w: inout ByteWriter) { w.write(step) }

    public init(from r: inout ByteReader) throws(ProtocolError) { step = try r.read(Step.self, "step") }
}

/// The payload of two messages: abortSave and releaseRestore (``Message``
/// names the type of each).
public struct StepRequest: WireCodable {
    public var step: Step
    public init(step: Step) { self.step = step }

    public func encode(into w: inout ByteWriter) { w.write(step) }

    public init(from r: inout ByteReader) throws(ProtocolError) { step = try r.read(Step.self, "step") }
}

public struct LatestCommittedReply: WirePayload {
    public static let type = MessageType.latestCommittedReply
    public var step: Step?
    public init(step: Step?) { self.step = step }

    public func encode(into w: inout ByteWriter) { w.writeOptional(step) }

    public init(from r: inout ByteReader) throws(ProtocolError) { step = try r.readOptional(Step.self, "step") }
}

public struct WaitCommitted: WirePayload {
    public static let type = MessageType.waitCommitted
    public var step: Step
    public var timeoutMilliseconds: UInt32
    public init(step: Step, timeoutMilliseconds: UInt32) {
        self.step = step
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.write(timeoutMilliseconds)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        timeoutMilliseconds = try r.read(UInt32.self, "timeoutMilliseconds")
    }
}

extension ByteReader {
    /// Where each tensor of a shard starts in its segment: one per tensor at most.
    mutating func readTensorOffsets() throws(ProtocolError) -> [UInt64] {
        try readList(of: UInt64.self, "tensorOffsets", limit: ProtocolLimits.maximumTensorsPerShard)
    }

    /// Written as an optional bit pattern; a norm must be finite and ≥ 0.
    public mutating func readGradientNorm() throws(ProtocolError) -> Double? {
        guard let bits = try readOptional(UInt64.self, "gradientNorm") else { return nil }
        let norm = Double(bitPattern: bits)
        guard norm.isFinite, norm >= 0 else { throw .invalidValue(field: "gradientNorm", reason: "must be finite and ≥ 0, got \(norm)") }
        return norm
    }
}
