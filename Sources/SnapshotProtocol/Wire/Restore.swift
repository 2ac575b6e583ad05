/// Restoring a shard: restore → restoreReady (with the tensors as bulk bytes
/// or a segment descriptor), then releaseRestore (a ``StepRequest``) → ok.

public struct Restore: WirePayload {
    public static let type = MessageType.restore
    /// nil: the newest committed step.
    public var step: Step?
    public var transport: DataTransport
    public init(step: Step?, transport: DataTransport) {
        self.step = step
        self.transport = transport
    }

    public func encode(into w: inout ByteWriter) {
        w.writeOptional(step)
        w.write(transport.rawValue)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.readOptional(Step.self, "step")
        transport = try r.readEnum(DataTransport.self, "transport")
    }
}

/// A shard ready to read. Stream transport: the tensors follow as bulk bytes in
/// manifest order. Shared memory: a read-only segment descriptor comes along.
public struct RestoreReady: WirePayload {
    public static let type = MessageType.restoreReady
    public var step: Step
    public var entries: [ManifestEntry]
    public var tensorOffsets: [UInt64]
    public var segmentSizeBytes: UInt64
    public var gradientNorm: Double?
    public var metadata: [UInt8]
    /// Set when the shard was rebuilt approximately (CheckFree): never silent.
    public var reconstruction: Reconstruction?
    /// Set when the shard came from the durable tier, not memory: the file
    /// it was read from.
    public var durableSource: String?
    public init(
        step: Step, entries: [ManifestEntry], tensorOffsets: [UInt64], segmentSizeBytes: UInt64, gradientNorm: Double?, metadata: [UInt8],
        reconstruction: Reconstruction? = nil, durableSource: String? = nil
    ) {
        self.durableSource = durableSource
        self.step = step
        self.entries = entries
        self.tensorOffsets = tensorOffsets
        self.segmentSizeBytes = segmentSizeBytes
        self.gradientNorm = gradientNorm
        self.metadata = metadata
        self.reconstruction = reconstruction
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.writeCount(entries.count)
        for entry in entries { w.write(entry) }
        w.write(list: tensorOffsets)
        w.write(segmentSizeBytes)
        w.writeOptional(gradientNorm?.bitPattern)
        w.write(blob: metadata)
        w.writeOptional(reconstruction)
        w.writeOptional(durableSource)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        let count = try r.readCount("entries", limit: ProtocolLimits.maximumTensorsPerShard, minimumElementBytes: ByteReader.minimumSpecBytes + 4)
        entries = []
        entries.reserveCapacity(count)
        for _ in 0..<count { entries.append(try r.readManifestEntry()) }
        tensorOffsets = try r.readTensorOffsets()
        guard tensorOffsets.count == entries.count else {
            throw .invalidValue(field: "tensorOffsets", reason: "\(tensorOffsets.count) offsets for \(entries.count) tensors")
        }
        segmentSizeBytes = try r.read(UInt64.self, "segmentSizeBytes")
        gradientNorm = try r.readGradientNorm()
        metadata = try r.readBlob("metadata", limitBytes: ProtocolLimits.maximumMetadataBytes)
        reconstruction = try r.readOptionalReconstruction()
        durableSource = try r.readOptionalString("durableSource", limitBytes: ProtocolLimits.maximumPathBytes)
    }
}
