/// A training job's name. Validated once at the edge so every other layer can
/// use it in file names and log lines without escaping: 1...128 bytes of
/// `[A-Za-z0-9._-]`, not starting with a dot.
public struct JobID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: String

    public init(_ rawValue: String) throws(ProtocolError) {
        let utf8 = rawValue.utf8
        guard !utf8.isEmpty else { throw .emptyField("job") }
        guard utf8.count <= ProtocolLimits.maximumJobIDBytes else {
            throw .tooLong(field: "job", bytes: utf8.count, limitBytes: ProtocolLimits.maximumJobIDBytes)
        }
        guard utf8.first != UInt8(ascii: "."), utf8.allSatisfy(Self.isAllowed) else {
            throw .invalidValue(field: "job", reason: "'\(rawValue)' must be [A-Za-z0-9._-] and not start with '.'")
        }
        self.rawValue = rawValue
    }

    private static func isAllowed(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
            true
        default: false
        }
    }

    public var description: String { rawValue }
    public static func < (lhs: JobID, rhs: JobID) -> Bool { lhs.rawValue < rhs.rawValue }
}

public typealias Step = UInt64
public typealias Rank = UInt32
public typealias NodeID = UInt32

/// Where a rank sits in the job's parallelism (docs/architecture.md, "Data model").
public struct Topology: Hashable, Sendable, Codable {
    public var pipelineStage: UInt32
    public var tensorParallelIndex: UInt32
    public var dataParallelIndex: UInt32

    public init(pipelineStage: UInt32 = 0, tensorParallelIndex: UInt32 = 0, dataParallelIndex: UInt32 = 0) {
        self.pipelineStage = pipelineStage
        self.tensorParallelIndex = tensorParallelIndex
        self.dataParallelIndex = dataParallelIndex
    }
}

extension ByteWriter {
    public mutating func write(_ job: JobID) { write(job.rawValue) }

    public mutating func write(_ topology: Topology) {
        write(topology.pipelineStage)
        write(topology.tensorParallelIndex)
        write(topology.dataParallelIndex)
    }
}

extension ByteReader {
    public mutating func readJobID() throws(ProtocolError) -> JobID {
        try JobID(readString("job", limitBytes: ProtocolLimits.maximumJobIDBytes))
    }

    public mutating func readTopology() throws(ProtocolError) -> Topology {
        Topology(
            pipelineStage: try read(UInt32.self, "topology.pipelineStage"),
            tensorParallelIndex: try read(UInt32.self, "topology.tensorParallelIndex"),
            dataParallelIndex: try read(UInt32.self, "topology.dataParallelIndex"))
    }
}

extension ByteWriter {
    /// A presence flag (the reader's field `hasJob`), then the job.
    public mutating func writeOptional(_ job: JobID?) {
        write(job != nil)
        if let job { write(job) }
    }
}

extension ByteReader {
    public mutating func readOptionalJobID() throws(ProtocolError) -> JobID? {
        try readBool("hasJob") ? try readJobID() : nil
    }
}
