/// The operator's cluster-wide requests: status of every node, drain,
/// verify, and the rebuild plan of a node. An operator asks any daemon; it
/// asks its peers (the same messages between daemons, where `local` or the
/// node field says "answer for yourself").

/// One node as the asked daemon sees it (and as the node itself reports).
public struct NodeSummary: Hashable, Sendable {
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
}

/// A protection group's health: it survives `parity − lost` more node losses.
public struct GroupHealth: Hashable, Sendable {
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
}

public struct ClusterStatusReply: Hashable, Sendable {
    public var coordinator: NodeID
    public var nodes: [NodeSummary]
    /// Empty for a single node.
    public var groups: [GroupHealth]
    public init(coordinator: NodeID, nodes: [NodeSummary], groups: [GroupHealth]) {
        self.coordinator = coordinator
        self.nodes = nodes
        self.groups = groups
    }
}

/// Take `node` out of service (or back in, with `cancel`): it refuses new
/// saves; the reply says whether stopping it now loses nothing.
public struct DrainRequest: Hashable, Sendable {
    public var node: NodeID
    public var cancel: Bool
    public init(node: NodeID, cancel: Bool = false) {
        self.node = node
        self.cancel = cancel
    }
}

public struct DrainReply: Hashable, Sendable {
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
}

/// Re-check what nodes hold: every shard's tensors against their sealed
/// CRCs, every parity fragment against its CRC and against parity
/// re-encoded from the group's data.
public struct VerifyRequest: Hashable, Sendable {
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
}

public struct NodeVerification: Hashable, Sendable {
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
}

public struct VerifyReply: Hashable, Sendable {
    public var nodes: [NodeVerification]
    public init(nodes: [NodeVerification]) { self.nodes = nodes }
}

/// What rebuilding `node` takes, step by step, and how far it has come.
public struct RebuildPlanRequest: Hashable, Sendable {
    public var node: NodeID
    public init(node: NodeID) { self.node = node }
}

public struct PlannedStep: Hashable, Sendable {
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
}

public struct RebuildPlanReply: Hashable, Sendable {
    public var node: NodeID
    public var state: NodeSummary.State
    public var steps: [PlannedStep]
    public init(node: NodeID, state: NodeSummary.State, steps: [PlannedStep]) {
        self.node = node
        self.state = state
        self.steps = steps
    }
}

extension ByteWriter {
    mutating func write(_ m: ClusterStatusReply) {
        write(m.coordinator)
        writeCount(m.nodes.count)
        for n in m.nodes {
            write(n.node)
            write(n.state.rawValue)
            write(n.isCoordinator)
            write(n.usedBytes)
            write(n.budgetBytes)
            write(n.quarantinedFiles)
            write(n.note)
        }
        writeCount(m.groups.count)
        for g in m.groups {
            write(g.index)
            writeNodes(g.nodes)
            write(g.parity)
            writeNodes(g.lost)
            writeNodes(g.unreachable)
        }
    }

    mutating func write(_ m: VerifyRequest) {
        write(m.job != nil)
        if let job = m.job { write(job) }
        writeOptional(m.step)
        writeOptional(m.node)
        write(m.local)
    }

    mutating func write(_ m: VerifyReply) {
        writeCount(m.nodes.count)
        for n in m.nodes {
            write(n.node)
            write(n.answered)
            write(n.shards)
            write(n.parityFragments)
            write(n.parityReencoded)
            write(n.bytes)
            writeStrings(n.problems)
            writeStrings(n.notes)
        }
    }

    mutating func write(_ m: RebuildPlanReply) {
        write(m.node)
        write(m.state.rawValue)
        writeCount(m.steps.count)
        for s in m.steps {
            write(s.job)
            write(s.step)
            writeCount(s.ranks.count)
            for r in s.ranks { write(r) }
            write(s.shardBytes)
            write(s.parityBytes)
            writeNodes(s.sources)
            write(s.fetchBytes)
            write(s.held)
        }
    }

    mutating func writeNodes(_ nodes: [NodeID]) {
        writeCount(nodes.count)
        for n in nodes { write(n) }
    }

    mutating func writeStrings(_ strings: [String]) {
        writeCount(strings.count)
        for s in strings { write(s) }
    }
}

extension ByteReader {
    mutating func readClusterStatusReply() throws(ProtocolError) -> ClusterStatusReply {
        let coordinator = try read(NodeID.self, "coordinator")
        let count = try readCount("nodes", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 34)
        var nodes: [NodeSummary] = []
        for _ in 0..<count {
            nodes.append(NodeSummary(
                node: try read(NodeID.self, "node"), state: try readEnum(NodeSummary.State.self, "state"), isCoordinator: try readBool("isCoordinator"),
                usedBytes: try read(UInt64.self, "usedBytes"), budgetBytes: try read(UInt64.self, "budgetBytes"),
                quarantinedFiles: try read(UInt64.self, "quarantinedFiles"),
                note: try readString("note", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)))
        }
        let groupCount = try readCount("groups", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 20)
        var groups: [GroupHealth] = []
        for _ in 0..<groupCount {
            groups.append(GroupHealth(
                index: try read(UInt32.self, "index"), nodes: try readNodeList("nodes"), parity: try read(UInt32.self, "parity"), lost: try readNodeList("lost"),
                unreachable: try readNodeList("unreachable")))
        }
        return ClusterStatusReply(coordinator: coordinator, nodes: nodes, groups: groups)
    }

    mutating func readVerifyRequest() throws(ProtocolError) -> VerifyRequest {
        VerifyRequest(
            job: try readBool("hasJob") ? try readJobID() : nil, step: try readOptional(Step.self, "step"),
            node: try readOptional(NodeID.self, "node"), local: try readBool("local"))
    }

    mutating func readVerifyReply() throws(ProtocolError) -> VerifyReply {
        let count = try readCount("nodes", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 33)
        var nodes: [NodeVerification] = []
        for _ in 0..<count {
            nodes.append(NodeVerification(
                node: try read(NodeID.self, "node"), answered: try readBool("answered"), shards: try read(UInt32.self, "shards"),
                parityFragments: try read(UInt32.self, "parityFragments"), parityReencoded: try read(UInt32.self, "parityReencoded"),
                bytes: try read(UInt64.self, "bytes"), problems: try readStrings("problems"), notes: try readStrings("notes")))
        }
        return VerifyReply(nodes: nodes)
    }

    mutating func readRebuildPlanReply() throws(ProtocolError) -> RebuildPlanReply {
        let node = try read(NodeID.self, "node")
        let state = try readEnum(NodeSummary.State.self, "state")
        let count = try readCount("steps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 40)
        var steps: [PlannedStep] = []
        for _ in 0..<count {
            let job = try readJobID()
            let step = try read(Step.self, "step")
            let rankCount = try readCount("ranks", limit: Int(ProtocolLimits.maximumWorldSize), minimumElementBytes: 4)
            var ranks: [Rank] = []
            for _ in 0..<rankCount { ranks.append(try read(Rank.self, "ranks")) }
            steps.append(PlannedStep(
                job: job, step: step, ranks: ranks, shardBytes: try read(UInt64.self, "shardBytes"), parityBytes: try read(UInt64.self, "parityBytes"),
                sources: try readNodeList("sources"), fetchBytes: try read(UInt64.self, "fetchBytes"), held: try readBool("held")))
        }
        return RebuildPlanReply(node: node, state: state, steps: steps)
    }

    mutating func readStrings(_ field: String) throws(ProtocolError) -> [String] {
        let count = try readCount(field, limit: ProtocolLimits.maximumProblemsPerNode, minimumElementBytes: 4)
        var strings: [String] = []
        for _ in 0..<count { strings.append(try readString(field, limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)) }
        return strings
    }
}
