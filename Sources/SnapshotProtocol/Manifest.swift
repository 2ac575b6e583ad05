/// Element type of a tensor. `bytes` is an opaque blob (RNG state, loader position).
public enum DType: UInt8, Sendable, CaseIterable, Codable, CustomStringConvertible {
    case bytes = 0, bool, uint8, int8, int16, int32, int64, uint16, uint32, uint64
    case float16, bfloat16, float32, float64, float8e4m3, float8e5m2

    public var elementSizeBytes: UInt64 {
        switch self {
        case .bytes, .bool, .uint8, .int8, .float8e4m3, .float8e5m2: 1
        case .int16, .uint16, .float16, .bfloat16: 2
        case .int32, .uint32, .float32: 4
        case .int64, .uint64, .float64: 8
        }
    }

    /// safetensors dtype names, used by export and by logs.
    public var description: String {
        switch self {
        case .bytes: "U8"
        case .bool: "BOOL"
        case .uint8: "U8"
        case .int8: "I8"
        case .int16: "I16"
        case .int32: "I32"
        case .int64: "I64"
        case .uint16: "U16"
        case .uint32: "U32"
        case .uint64: "U64"
        case .float16: "F16"
        case .bfloat16: "BF16"
        case .float32: "F32"
        case .float64: "F64"
        case .float8e4m3: "F8_E4M3"
        case .float8e5m2: "F8_E5M2"
        }
    }

    /// The case's own name ("bytes", "uint8", "bfloat16"): unambiguous where
    /// the safetensors name is not (both raw bytes and uint8 are "U8").
    public var name: String {
        switch self {
        case .bytes: "bytes"
        case .bool: "bool"
        case .uint8: "uint8"
        case .int8: "int8"
        case .int16: "int16"
        case .int32: "int32"
        case .int64: "int64"
        case .uint16: "uint16"
        case .uint32: "uint32"
        case .uint64: "uint64"
        case .float16: "float16"
        case .bfloat16: "bfloat16"
        case .float32: "float32"
        case .float64: "float64"
        case .float8e4m3: "float8e4m3"
        case .float8e5m2: "float8e5m2"
        }
    }
}

/// What a blob is for; recovery treats kinds differently (CheckFree rebuilds
/// parameters, resets optimizer state, takes RNG and extra state from the
/// neighbour it used). `carried` marks a copy of a tensor that another stage
/// owns (the embedding or LM head that the second or second-to-last stage
/// carries for the first or last, CheckFree+): it has the owner's name, and a
/// lost owner takes it from here.
public enum TensorKind: UInt8, Sendable, CaseIterable, Codable {
    case parameter = 0, optimizer, rng, extra, carried
}

/// A tensor as declared at begin-save: everything but its checksum.
public struct TensorSpec: Hashable, Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int64]
    public var kind: TensorKind
    public var byteLength: UInt64

    /// Validates the name and that shape × element size equals `byteLength`.
    public init(name: String, dtype: DType, shape: [Int64], kind: TensorKind, byteLength: UInt64? = nil)
        throws(ProtocolError)
    {
        let nameBytes = name.utf8.count
        guard nameBytes > 0 else { throw .emptyField("tensor.name") }
        guard nameBytes <= ProtocolLimits.maximumNameBytes else {
            throw .tooLong(field: "tensor.name", bytes: nameBytes, limitBytes: ProtocolLimits.maximumNameBytes)
        }
        guard shape.count <= ProtocolLimits.maximumShapeRank else {
            throw .tooMany(field: "tensor.shape", count: shape.count, limit: ProtocolLimits.maximumShapeRank)
        }
        var elements: UInt64 = 1
        for (dimension, extent) in shape.enumerated() {
            guard extent >= 0 else { throw .negativeDimension(tensor: name, dimension: dimension, value: extent) }
            let (product, overflow) = elements.multipliedReportingOverflow(by: UInt64(extent))
            guard !overflow else { throw .shapeOverflow(tensor: name) }
            elements = product
        }
        let (shapeBytes, overflow) = elements.multipliedReportingOverflow(by: dtype.elementSizeBytes)
        guard !overflow else { throw .shapeOverflow(tensor: name) }
        let declared = byteLength ?? shapeBytes
        guard declared == shapeBytes else {
            throw .byteLengthMismatch(tensor: name, shapeBytes: shapeBytes, declaredBytes: declared)
        }
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.kind = kind
        self.byteLength = declared
    }

    /// An opaque byte blob of `byteCount` bytes (shape `[byteCount]`, dtype `bytes`).
    public static func blob(name: String, byteCount: Int, kind: TensorKind = .extra) throws(ProtocolError) -> TensorSpec {
        try TensorSpec(name: name, dtype: .bytes, shape: [Int64(byteCount)], kind: kind)
    }
}

/// A tensor in a sealed shard: its spec plus the CRC-32C of its bytes.
public struct ManifestEntry: Hashable, Sendable {
    public var spec: TensorSpec
    public var crc32c: UInt32

    public init(spec: TensorSpec, crc32c: UInt32) {
        self.spec = spec
        self.crc32c = crc32c
    }
}

extension ByteWriter {
    public mutating func write(_ spec: TensorSpec) {
        write(spec.name)
        write(spec.dtype.rawValue)
        write(spec.kind.rawValue)
        write(UInt8(spec.shape.count))
        for extent in spec.shape { write(extent) }
        write(spec.byteLength)
    }

    public mutating func write(_ specs: [TensorSpec]) {
        writeCount(specs.count)
        for spec in specs { write(spec) }
    }

    public mutating func write(_ entry: ManifestEntry) {
        write(entry.spec)
        write(entry.crc32c)
    }
}

extension ByteReader {
    /// The smallest encoding of a spec: empty-name length, dtype, kind, rank, length.
    static let minimumSpecBytes = 2 + 1 + 1 + 1 + 8

    public mutating func readTensorSpec() throws(ProtocolError) -> TensorSpec {
        let name = try readString("tensor.name", limitBytes: ProtocolLimits.maximumNameBytes)
        let rawDType = try read(UInt8.self, "tensor.dtype")
        guard let dtype = DType(rawValue: rawDType) else {
            throw .invalidValue(field: "tensor.dtype", reason: "unknown dtype \(rawDType)")
        }
        let rawKind = try read(UInt8.self, "tensor.kind")
        guard let kind = TensorKind(rawValue: rawKind) else {
            throw .invalidValue(field: "tensor.kind", reason: "unknown kind \(rawKind)")
        }
        let rank = Int(try read(UInt8.self, "tensor.shape"))
        guard rank <= ProtocolLimits.maximumShapeRank else {
            throw .tooMany(field: "tensor.shape", count: rank, limit: ProtocolLimits.maximumShapeRank)
        }
        var shape: [Int64] = []
        shape.reserveCapacity(rank)
        for _ in 0..<rank { shape.append(try read(Int64.self, "tensor.shape")) }
        let byteLength = try read(UInt64.self, "tensor.byteLength")
        return try TensorSpec(name: name, dtype: dtype, shape: shape, kind: kind, byteLength: byteLength)
    }

    public mutating func readTensorSpecs() throws(ProtocolError) -> [TensorSpec] {
        let count = try readCount("tensors", limit: ProtocolLimits.maximumTensorsPerShard, minimumElementBytes: Self.minimumSpecBytes)
        var specs: [TensorSpec] = []
        specs.reserveCapacity(count)
        var names = Set<String>()
        for _ in 0..<count {
            let spec = try readTensorSpec()
            guard names.insert(spec.name).inserted else {
                throw .invalidValue(field: "tensors", reason: "tensor name '\(spec.name)' appears twice")
            }
            specs.append(spec)
        }
        return specs
    }

    public mutating func readManifestEntry() throws(ProtocolError) -> ManifestEntry {
        ManifestEntry(spec: try readTensorSpec(), crc32c: try read(UInt32.self, "tensor.crc32c"))
    }
}
