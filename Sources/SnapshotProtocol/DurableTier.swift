/// `snapshotctl export`: write a committed step of a job to `directory` in
/// the export format (one safetensors file per rank and `manifest.json`).
/// The daemon asked writes every rank, fetching the ones other nodes hold.
public struct ExportRequest: Hashable, Sendable {
    public var job: JobID
    /// The newest committed step when nil.
    public var step: Step?
    /// An absolute path on the daemon's machine.
    public var directory: String
    public init(job: JobID, step: Step?, directory: String) {
        self.job = job
        self.step = step
        self.directory = directory
    }
}

/// What an export wrote.
public struct ExportReply: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    /// The step's own directory (`<directory>/<job>/step-<step>`).
    public var directory: String
    public var ranks: UInt32
    public var bytes: UInt64
    public init(job: JobID, step: Step, directory: String, ranks: UInt32, bytes: UInt64) {
        self.job = job
        self.step = step
        self.directory = directory
        self.ranks = ranks
        self.bytes = bytes
    }
}

extension ByteWriter {
    mutating func write(_ m: ExportRequest) {
        write(m.job)
        writeOptional(m.step)
        write(m.directory)
    }

    mutating func write(_ m: ExportReply) {
        write(m.job)
        write(m.step)
        write(m.directory)
        write(m.ranks)
        write(m.bytes)
    }

    mutating func writeOptional(_ value: String?) {
        write(value != nil)
        if let value { write(value) }
    }
}

extension ByteReader {
    mutating func readExportRequest() throws(ProtocolError) -> ExportRequest {
        ExportRequest(
            job: try readJobID(), step: try readOptional(Step.self, "step"),
            directory: try readString("directory", limitBytes: ProtocolLimits.maximumPathBytes))
    }

    mutating func readExportReply() throws(ProtocolError) -> ExportReply {
        ExportReply(
            job: try readJobID(), step: try read(Step.self, "step"), directory: try readString("directory", limitBytes: ProtocolLimits.maximumPathBytes),
            ranks: try read(UInt32.self, "ranks"), bytes: try read(UInt64.self, "bytes"))
    }

    mutating func readOptionalString(_ field: String, limitBytes: Int) throws(ProtocolError) -> String? {
        try readBool(field) ? try readString(field, limitBytes: limitBytes) : nil
    }
}
