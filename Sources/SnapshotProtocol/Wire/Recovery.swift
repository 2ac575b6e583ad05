/// The operator's recovery requests: the recovery picture (recover, which has
/// no payload, → recoverReply), a CheckFree rebuild of lost pipeline stages
/// (checkFree → checkFreeReply, also between daemons in phases) and an export
/// of a committed step (export → exportReply).

// MARK: - recover (no payload) → recoverReply

/// The recovery picture for operators: per job, what is lost and what can be restored.
public struct RecoverReply: WirePayload {
    public static let type = MessageType.recoverReply
    public var coordinator: NodeID
    public var deadNodes: [NodeID]
    public var rebuildingNodes: [NodeID]
    public var jobs: [JobRecovery]
    public init(coordinator: NodeID, deadNodes: [NodeID], rebuildingNodes: [NodeID], jobs: [JobRecovery]) {
        self.coordinator = coordinator
        self.deadNodes = deadNodes
        self.rebuildingNodes = rebuildingNodes
        self.jobs = jobs
    }

    public func encode(into w: inout ByteWriter) {
        w.write(coordinator)
        w.write(list: deadNodes)
        w.write(list: rebuildingNodes)
        w.write(list: jobs)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        coordinator = try r.read(NodeID.self, "coordinator")
        deadNodes = try r.readNodeList("deadNodes")
        rebuildingNodes = try r.readNodeList("rebuildingNodes")
        jobs = try r.readList("jobs", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 12)
    }
}

public struct JobRecovery: WireCodable {
    public var job: JobID
    public var latestCommitted: Step?
    /// Newest committed step every rank of which can be restored (directly or by rebuild).
    public var newestRestorable: Step?
    /// Ranks of `latestCommitted` whose shards cannot be restored.
    public var lostRanks: [Rank]
    public var summary: String
    /// When ranks are lost: whether CheckFree can rebuild their pipeline
    /// stages approximately, and from what (or why not). Empty otherwise.
    public var checkFree: String
    /// The newest step this node finds complete in the durable tier: what a
    /// job beyond tolerance can fall back to.
    public var newestFlushed: Step?
    public init(job: JobID, latestCommitted: Step?, newestRestorable: Step?, lostRanks: [Rank], summary: String, checkFree: String = "", newestFlushed: Step? = nil) {
        self.newestFlushed = newestFlushed
        self.job = job
        self.latestCommitted = latestCommitted
        self.newestRestorable = newestRestorable
        self.lostRanks = lostRanks
        self.summary = summary
        self.checkFree = checkFree
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.writeOptional(latestCommitted)
        w.writeOptional(newestRestorable)
        w.write(list: lostRanks)
        w.write(summary)
        w.write(checkFree)
        w.writeOptional(newestFlushed)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        latestCommitted = try r.readOptional(Step.self, "latestCommitted")
        newestRestorable = try r.readOptional(Step.self, "newestRestorable")
        lostRanks = try r.readList(of: Rank.self, "lostRanks", limit: Int(ProtocolLimits.maximumWorldSize))
        summary = try r.readString("summary", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
        checkFree = try r.readString("checkFree", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
        newestFlushed = try r.readOptional(Step.self, "newestFlushed")
    }
}

// MARK: - checkFree → checkFreeReply

/// Rebuild a job's lost pipeline stages approximately (CheckFree). From an
/// operator (`request`): plan with the cluster's view and drive the nodes
/// that host the lost ranks. Between daemons, all or nothing: every such
/// node first computes its share (`prepare`), and only when all succeeded
/// installs it (`commit`); otherwise each drops what it computed (`abort`).
public struct CheckFreeRequest: WirePayload {
    public static let type = MessageType.checkFree
    public enum Phase: UInt8, Sendable, CaseIterable {
        case request = 0, prepare, commit, abort
    }

    public var job: JobID
    public var phase: Phase
    /// The step the planner chose; nil in an operator's request.
    public var step: Step?
    /// Names one rebuild across its phases (0 in an operator's request).
    public var token: UInt64
    public init(job: JobID, phase: Phase = .request, step: Step? = nil, token: UInt64 = 0) {
        self.job = job
        self.phase = phase
        self.step = step
        self.token = token
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(phase.rawValue)
        w.writeOptional(step)
        w.write(token)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        phase = try r.readEnum(Phase.self, "phase")
        step = try r.readOptional(Step.self, "step")
        token = try r.read(UInt64.self, "token")
    }
}

/// One rank that was rebuilt approximately.
public struct RankReconstruction: WireCodable {
    public var rank: Rank
    public var stage: UInt32
    public var node: NodeID
    public var reconstruction: Reconstruction
    public init(rank: Rank, stage: UInt32, node: NodeID, reconstruction: Reconstruction) {
        self.rank = rank
        self.stage = stage
        self.node = node
        self.reconstruction = reconstruction
    }

    public func encode(into w: inout ByteWriter) {
        w.write(rank)
        w.write(stage)
        w.write(node)
        w.write(reconstruction)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        rank = try r.read(Rank.self, "rank")
        stage = try r.read(UInt32.self, "stage")
        node = try r.read(NodeID.self, "node")
        reconstruction = try r.readReconstruction()
    }
}

/// What a CheckFree rebuild did.
public struct CheckFreeReply: WirePayload {
    public static let type = MessageType.checkFreeReply
    public var job: JobID
    public var step: Step
    public var ranks: [RankReconstruction]
    public var summary: String
    public init(job: JobID, step: Step, ranks: [RankReconstruction], summary: String) {
        self.job = job
        self.step = step
        self.ranks = ranks
        self.summary = summary
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(list: ranks)
        w.write(summary)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        ranks = try r.readList("ranks", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 12)
        summary = try r.readString("summary", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
    }
}

// MARK: - export → exportReply

/// `snapshotctl export`: write a committed step of a job to `directory` in
/// the export format (one safetensors file per rank and `manifest.json`).
/// The daemon asked writes every rank, fetching the ones other nodes hold.
public struct ExportRequest: WirePayload {
    public static let type = MessageType.export
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

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.writeOptional(step)
        w.write(directory)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.readOptional(Step.self, "step")
        directory = try r.readString("directory", limitBytes: ProtocolLimits.maximumPathBytes)
    }
}

/// What an export wrote.
public struct ExportReply: WirePayload {
    public static let type = MessageType.exportReply
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

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(directory)
        w.write(ranks)
        w.write(bytes)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        directory = try r.readString("directory", limitBytes: ProtocolLimits.maximumPathBytes)
        ranks = try r.read(UInt32.self, "ranks")
        bytes = try r.read(UInt64.self, "bytes")
    }
}
