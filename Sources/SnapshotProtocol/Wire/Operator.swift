/// The operator's requests: a node's status, and the cluster-wide status of
/// every node, drain, verify, and the rebuild plan of a node. An operator
/// asks any daemon; it asks its peers (the same messages between daemons,
/// where `local` or the node field says "answer for yourself").

// MARK: - status → statusReply

public struct StatusRequest: WirePayload {
    public static let type = MessageType.status
    public var job: JobID?
    public init(job: JobID?) { self.job = job }

    public func encode(into w: inout ByteWriter) { w.writeOptional(job) }

    public init(from r: inout ByteReader) throws(ProtocolError) { job = try r.readOptionalJobID() }
}

public struct StepStatus: WireCodable {
    /// Where a step is on this node: the least advanced of its shards here, or committed.
    public enum Phase: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        case receiving = 0, sealing, localComplete, protected, committed, failed
        public var description: String {
            switch self {
            case .receiving: "receiving"
            case .sealing: "sealing"
            case .localComplete: "local-complete"
            case .protected: "protected"
            case .committed: "committed"
            case .failed: "failed"
            }
        }
    }

    public var step: Step
    public var committed: Bool
    public var completeRanks: UInt32
    public var bytes: UInt64
    public var phase: Phase
    /// Seconds since this node committed the step (or, before, since its first shard arrived); nil if unknown.
    public var ageSeconds: UInt64?
    public init(step: Step, committed: Bool, completeRanks: UInt32, bytes: UInt64, phase: Phase? = nil, ageSeconds: UInt64? = nil) {
        self.step = step
        self.committed = committed
        self.completeRanks = completeRanks
        self.bytes = bytes
        self.phase = phase ?? (committed ? .committed : .receiving)
        self.ageSeconds = ageSeconds
    }

    public func encode(into w: inout ByteWriter) {
        w.write(step)
        w.write(committed)
        w.write(completeRanks)
        w.write(bytes)
        w.write(phase.rawValue)
        w.writeOptional(ageSeconds)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        step = try r.read(Step.self, "step")
        committed = try r.readBool("committed")
        completeRanks = try r.read(UInt32.self, "completeRanks")
        bytes = try r.read(UInt64.self, "bytes")
        phase = try r.readEnum(Phase.self, "phase")
        ageSeconds = try r.readOptional(UInt64.self, "ageSeconds")
    }
}

public struct JobStatus: WireCodable {
    public var job: JobID
    public var world: UInt32
    public var localRanks: UInt32
    public var steps: [StepStatus]
    /// Steps complete in the durable tier (every rank's files present) as
    /// this node sees its flush directory, oldest first; the newest is what
    /// restores fall back to.
    public var flushedSteps: [Step]
    public init(job: JobID, world: UInt32, localRanks: UInt32, steps: [StepStatus], flushedSteps: [Step] = []) {
        self.job = job
        self.world = world
        self.localRanks = localRanks
        self.steps = steps
        self.flushedSteps = flushedSteps
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(world)
        w.write(localRanks)
        w.write(list: steps)
        w.write(list: flushedSteps)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        world = try r.read(UInt32.self, "world")
        localRanks = try r.read(UInt32.self, "localRanks")
        steps = try r.readList("steps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 21)
        flushedSteps = try r.readList(of: Step.self, "flushedSteps", limit: ProtocolLimits.maximumListEntries)
    }
}

public struct StatusReply: WirePayload {
    public static let type = MessageType.statusReply
    public var nodeID: NodeID
    public var daemonVersion: String
    public var budgetBytes: UInt64
    public var usedBytes: UInt64
    public var jobs: [JobStatus]
    /// Monotonic event counters since the daemon started, by name (e.g.
    /// `peers_declared_dead`): what tests and dashboards assert on instead of
    /// log lines.
    public var counters: [StatusCounter]
    public init(nodeID: NodeID, daemonVersion: String, budgetBytes: UInt64, usedBytes: UInt64, jobs: [JobStatus], counters: [StatusCounter] = []) {
        self.nodeID = nodeID
        self.daemonVersion = daemonVersion
        self.budgetBytes = budgetBytes
        self.usedBytes = usedBytes
        self.jobs = jobs
        self.counters = counters
    }

    public func counter(_ name: String) -> UInt64? { counters.first { $0.name == name }?.value }

    public func encode(into w: inout ByteWriter) {
        w.write(nodeID)
        w.write(daemonVersion)
        w.write(budgetBytes)
        w.write(usedBytes)
        w.write(list: jobs)
        w.write(list: counters)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nodeID = try r.read(NodeID.self, "nodeID")
        daemonVersion = try r.readString("daemonVersion", limitBytes: ProtocolLimits.maximumNameBytes)
        budgetBytes = try r.read(UInt64.self, "budgetBytes")
        usedBytes = try r.read(UInt64.self, "usedBytes")
        jobs = try r.readList("jobs", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 15)
        counters = try r.readList("counters", limit: ProtocolLimits.maximumCounters, minimumElementBytes: 10)
    }
}

public struct StatusCounter: WireCodable {
    public var name: String
    public var value: UInt64
    public init(name: String, value: UInt64) {
        self.name = name
        self.value = value
    }

    public func encode(into w: inout ByteWriter) {
        w.write(name)
        w.write(value)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        name = try r.readString("counter.name", limitBytes: ProtocolLimits.maximumNameBytes)
        value = try r.read(UInt64.self, "counter.value")
    }
}

// MARK: - clusterStatus (no payload) → clusterStatusReply

/// One node as the asked daemon sees it (and as the node itself reports).
public struct NodeSummary: WireCodable {
    public enum State: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        /// `joining`: just started, still learning the cluster's state (not a loss).
        case alive = 0, dead, rebuilding, draining, unreachable, joining
        public var description: String {
            switch self {
            case .alive: "alive"
            case .dead: "dead"
            case .rebuilding: "rebuilding"
            case .draining: "draining"
            case .unreachable: "unreachable"
            case .joining: "joining"
            }
        }
    }

    public var node: NodeID
    public var state: State
    public var isCoordinator: Bool
    public var usedBytes: UInt64
    public var budgetBytes: UInt64
    public var quarantinedFiles: UInt64
    /// Why the node could not be asked, when it could not.
    public var note: String
    public init(node: NodeID, state: State, isCoordinator: Bool, usedBytes: UInt64, budgetBytes: UInt64, quarantinedFiles: UInt64, note: String = "") {
        self.node = node
        self.state = state
        self.isCoordinator = isCoordinator
        self.usedBytes = usedBytes
        self.budgetBytes = budgetBytes
        self.quarantinedFiles = quarantinedFiles
        self.note = note
    }

    public func encode(into w: inout ByteWriter) {
        w.write(node)
        w.write(state.rawValue)
        w.write(isCoordinator)
        w.write(usedBytes)
        w.write(budgetBytes)
        w.write(quarantinedFiles)
        w.write(note)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        node = try r.read(NodeID.self, "node")
        state = try r.readEnum(State.self, "state")
        isCoordinator = try r.readBool("isCoordinator")
        usedBytes = try r.read(UInt64.self, "usedBytes")
        budgetBytes = try r.read(UInt64.self, "budgetBytes")
        quarantinedFiles = try r.read(UInt64.self, "quarantinedFiles")
        note = try r.readString("note", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
    }
}

/// A protection group's health: it survives `parity − lost` more node losses.
public struct GroupHealth: WireCodable {
    public var index: UInt32
    public var nodes: [NodeID]
    public var parity: UInt32
    /// Members dead or rebuilding now.
    public var lost: [NodeID]
    /// Members the asked node could not reach (not counted as lost).
    public var unreachable: [NodeID]
    public init(index: UInt32, nodes: [NodeID], parity: UInt32, lost: [NodeID], unreachable: [NodeID] = []) {
        self.index = index
        self.nodes = nodes
        self.parity = parity
        self.lost = lost
        self.unreachable = unreachable
    }

    /// Further node losses the group survives; negative: beyond tolerance.
    public var survivesMore: Int { Int(parity) - lost.count }

    public func encode(into w: inout ByteWriter) {
        w.write(index)
        w.write(list: nodes)
        w.write(parity)
        w.write(list: lost)
        w.write(list: unreachable)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        index = try r.read(UInt32.self, "index")
        nodes = try r.readNodeList("nodes")
        parity = try r.read(UInt32.self, "parity")
        lost = try r.readNodeList("lost")
        unreachable = try r.readNodeList("unreachable")
    }
}

public struct ClusterStatusReply: WirePayload {
    public static let type = MessageType.clusterStatusReply
    public var coordinator: NodeID
    public var nodes: [NodeSummary]
    /// Empty for a single node.
    public var groups: [GroupHealth]
    public init(coordinator: NodeID, nodes: [NodeSummary], groups: [GroupHealth]) {
        self.coordinator = coordinator
        self.nodes = nodes
        self.groups = groups
    }

    public func encode(into w: inout ByteWriter) {
        w.write(coordinator)
        w.write(list: nodes)
        w.write(list: groups)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        coordinator = try r.read(NodeID.self, "coordinator")
        nodes = try r.readList("nodes", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 32)  // 4 + 1 + 1 + 8 + 8 + 8, and an empty note's length
        groups = try r.readList("groups", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 20)
    }
}

// MARK: - drain → drainReply

/// Take `node` out of service (or back in, with `cancel`): it refuses new
/// saves; the reply says whether stopping it now loses nothing.
public struct DrainRequest: WirePayload {
    public static let type = MessageType.drain
    public var node: NodeID
    public var cancel: Bool
    public init(node: NodeID, cancel: Bool = false) {
        self.node = node
        self.cancel = cancel
    }

    public func encode(into w: inout ByteWriter) {
        w.write(node)
        w.write(cancel)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        node = try r.read(NodeID.self, "node")
        cancel = try r.readBool("cancel")
    }
}

public struct DrainReply: WirePayload {
    public static let type = MessageType.drainReply
    public var node: NodeID
    public var draining: Bool
    public var safeToStop: Bool
    /// What stopping it now would cost, or why it is safe.
    public var reason: String
    public init(node: NodeID, draining: Bool, safeToStop: Bool, reason: String) {
        self.node = node
        self.draining = draining
        self.safeToStop = safeToStop
        self.reason = reason
    }

    public func encode(into w: inout ByteWriter) {
        w.write(node)
        w.write(draining)
        w.write(safeToStop)
        w.write(reason)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        node = try r.read(NodeID.self, "node")
        draining = try r.readBool("draining")
        safeToStop = try r.readBool("safeToStop")
        reason = try r.readString("reason", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
    }
}

// MARK: - verify → verifyReply

/// Re-check what nodes hold: every shard's tensors against their sealed
/// CRCs, every parity fragment against its CRC and against parity
/// re-encoded from the group's data.
public struct VerifyRequest: WirePayload {
    public static let type = MessageType.verify
    public var job: JobID?
    public var step: Step?
    /// Only this node; nil: every node.
    public var node: NodeID?
    /// Between daemons: verify what you hold and answer for yourself only.
    public var local: Bool
    public init(job: JobID? = nil, step: Step? = nil, node: NodeID? = nil, local: Bool = false) {
        self.job = job
        self.step = step
        self.node = node
        self.local = local
    }

    public func encode(into w: inout ByteWriter) {
        w.writeOptional(job)
        w.writeOptional(step)
        w.writeOptional(node)
        w.write(local)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readOptionalJobID()
        step = try r.readOptional(Step.self, "step")
        node = try r.readOptional(NodeID.self, "node")
        local = try r.readBool("local")
    }
}

public struct NodeVerification: WireCodable {
    public var node: NodeID
    public var answered: Bool
    public var shards: UInt32
    public var parityFragments: UInt32
    /// Parity fragments compared with parity re-encoded from the group's data.
    public var parityReencoded: UInt32
    public var bytes: UInt64
    /// Each inconsistency, naming node, job, step and rank, tensor or stripe.
    public var problems: [String]
    /// What could not be checked, and why (a peer down, no answer).
    public var notes: [String]
    public init(node: NodeID, answered: Bool, shards: UInt32 = 0, parityFragments: UInt32 = 0, parityReencoded: UInt32 = 0, bytes: UInt64 = 0, problems: [String] = [], notes: [String] = []) {
        self.node = node
        self.answered = answered
        self.shards = shards
        self.parityFragments = parityFragments
        self.parityReencoded = parityReencoded
        self.bytes = bytes
        self.problems = problems
        self.notes = notes
    }

    public func encode(into w: inout ByteWriter) {
        w.write(node)
        w.write(answered)
        w.write(shards)
        w.write(parityFragments)
        w.write(parityReencoded)
        w.write(bytes)
        w.write(list: problems)
        w.write(list: notes)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        node = try r.read(NodeID.self, "node")
        answered = try r.readBool("answered")
        shards = try r.read(UInt32.self, "shards")
        parityFragments = try r.read(UInt32.self, "parityFragments")
        parityReencoded = try r.read(UInt32.self, "parityReencoded")
        bytes = try r.read(UInt64.self, "bytes")
        problems = try r.readStrings("problems")
        notes = try r.readStrings("notes")
    }
}

public struct VerifyReply: WirePayload {
    public static let type = MessageType.verifyReply
    public var nodes: [NodeVerification]
    public init(nodes: [NodeVerification]) { self.nodes = nodes }

    public func encode(into w: inout ByteWriter) { w.write(list: nodes) }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nodes = try r.readList("nodes", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 33)
    }
}

// MARK: - rebuildPlan → rebuildPlanReply

/// What rebuilding `node` takes, step by step, and how far it has come.
public struct RebuildPlanRequest: WirePayload {
    public static let type = MessageType.rebuildPlan
    public var node: NodeID
    public init(node: NodeID) { self.node = node }

    public func encode(into w: inout ByteWriter) { w.write(node) }

    public init(from r: inout ByteReader) throws(ProtocolError) { node = try r.read(NodeID.self, "node") }
}

public struct PlannedStep: WireCodable {
    public var job: JobID
    public var step: Step
    public var ranks: [Rank]
    public var shardBytes: UInt64
    public var parityBytes: UInt64
    /// Group members the fragments come from.
    public var sources: [NodeID]
    /// Bytes read from the sources (k fragments for each one rebuilt).
    public var fetchBytes: UInt64
    /// The node holds the step already.
    public var held: Bool
    public init(job: JobID, step: Step, ranks: [Rank], shardBytes: UInt64, parityBytes: UInt64, sources: [NodeID], fetchBytes: UInt64, held: Bool) {
        self.job = job
        self.step = step
        self.ranks = ranks
        self.shardBytes = shardBytes
        self.parityBytes = parityBytes
        self.sources = sources
        self.fetchBytes = fetchBytes
        self.held = held
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(list: ranks)
        w.write(shardBytes)
        w.write(parityBytes)
        w.write(list: sources)
        w.write(fetchBytes)
        w.write(held)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        ranks = try r.readList(of: Rank.self, "ranks", limit: Int(ProtocolLimits.maximumWorldSize))
        shardBytes = try r.read(UInt64.self, "shardBytes")
        parityBytes = try r.read(UInt64.self, "parityBytes")
        sources = try r.readNodeList("sources")
        fetchBytes = try r.read(UInt64.self, "fetchBytes")
        held = try r.readBool("held")
    }
}

public struct RebuildPlanReply: WirePayload {
    public static let type = MessageType.rebuildPlanReply
    public var node: NodeID
    public var state: NodeSummary.State
    public var steps: [PlannedStep]
    public init(node: NodeID, state: NodeSummary.State, steps: [PlannedStep]) {
        self.node = node
        self.state = state
        self.steps = steps
    }

    public func encode(into w: inout ByteWriter) {
        w.write(node)
        w.write(state.rawValue)
        w.write(list: steps)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        node = try r.read(NodeID.self, "node")
        state = try r.readEnum(NodeSummary.State.self, "state")
        steps = try r.readList("steps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 40)
    }
}
