/// Payloads of every message type. Each decodes with full validation; the
/// enum ``Message`` ties them to their ``MessageType``.

public struct Challenge: Hashable, Sendable {
    public var nonce: [UInt8]
    public init(nonce: [UInt8]) { self.nonce = nonce }
}

public struct Authenticate: Hashable, Sendable {
    /// HMAC-SHA256(secret, nonce).
    public var tag: [UInt8]
    public init(tag: [UInt8]) { self.tag = tag }
}

public struct Hello: Hashable, Sendable {
    public var role: PeerRole
    /// Required for trainers: the only job this session may touch.
    public var job: JobID?
    public var rank: Rank
    public var world: UInt32
    public var topology: Topology
    /// For peers: the sending daemon's node id.
    public var nodeID: NodeID
    /// Trainers: how many of the job's ranks use this node's daemon (torchrun's
    /// LOCAL_WORLD_SIZE). The node's share of a step is complete when that many
    /// shards are sealed. 0 means all `world` ranks are local (single node).
    public var localWorld: UInt32

    public init(role: PeerRole, job: JobID?, rank: Rank = 0, world: UInt32 = 0, topology: Topology = Topology(), nodeID: NodeID = 0, localWorld: UInt32 = 0) {
        self.role = role
        self.job = job
        self.rank = rank
        self.world = world
        self.topology = topology
        self.nodeID = nodeID
        self.localWorld = localWorld
    }
}

public struct Welcome: Hashable, Sendable {
    public var nodeID: NodeID
    public var daemonVersion: String
    public init(nodeID: NodeID, daemonVersion: String) {
        self.nodeID = nodeID
        self.daemonVersion = daemonVersion
    }
}

public struct BeginSave: Hashable, Sendable {
    public var step: Step
    public var transport: DataTransport
    public var tensors: [TensorSpec]
    public init(step: Step, transport: DataTransport, tensors: [TensorSpec]) {
        self.step = step
        self.transport = transport
        self.tensors = tensors
    }
}

/// Where each tensor goes inside the shard's arena segment. With shared
/// memory, the segment's file descriptor travels with this frame (SCM_RIGHTS).
public struct SaveReady: Hashable, Sendable {
    public var step: Step
    public var segmentSizeBytes: UInt64
    public var tensorOffsets: [UInt64]
    public init(step: Step, segmentSizeBytes: UInt64, tensorOffsets: [UInt64]) {
        self.step = step
        self.segmentSizeBytes = segmentSizeBytes
        self.tensorOffsets = tensorOffsets
    }
}

/// Bytes `offsetBytes ..< offsetBytes + bulkLength` of tensor `tensorIndex`, as bulk.
public struct PutTensor: Hashable, Sendable {
    public var step: Step
    public var tensorIndex: UInt32
    public var offsetBytes: UInt64
    public init(step: Step, tensorIndex: UInt32, offsetBytes: UInt64) {
        self.step = step
        self.tensorIndex = tensorIndex
        self.offsetBytes = offsetBytes
    }
}

public struct CommitSave: Hashable, Sendable {
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
}

public struct SaveAccepted: Hashable, Sendable {
    public var step: Step
    public var state: ShardState
    public init(step: Step, state: ShardState) {
        self.step = step
        self.state = state
    }
}

public struct StepRequest: Hashable, Sendable {
    public var step: Step
    public init(step: Step) { self.step = step }
}

public struct WaitCommitted: Hashable, Sendable {
    public var step: Step
    public var timeoutMilliseconds: UInt32
    public init(step: Step, timeoutMilliseconds: UInt32) {
        self.step = step
        self.timeoutMilliseconds = timeoutMilliseconds
    }
}

public struct LatestCommittedReply: Hashable, Sendable {
    public var step: Step?
    public init(step: Step?) { self.step = step }
}

public struct Restore: Hashable, Sendable {
    /// nil: the newest committed step.
    public var step: Step?
    public var transport: DataTransport
    public init(step: Step?, transport: DataTransport) {
        self.step = step
        self.transport = transport
    }
}

/// A shard ready to read. Stream transport: the tensors follow as bulk bytes in
/// manifest order. Shared memory: a read-only segment descriptor comes along.
public struct RestoreReady: Hashable, Sendable {
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
}

public struct StatusRequest: Hashable, Sendable {
    public var job: JobID?
    public init(job: JobID?) { self.job = job }
}

public struct StepStatus: Hashable, Sendable {
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
}

public struct JobStatus: Hashable, Sendable {
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
}

public struct StatusReply: Hashable, Sendable {
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
}

public struct StatusCounter: Hashable, Sendable {
    public var name: String
    public var value: UInt64
    public init(name: String, value: UInt64) {
        self.name = name
        self.value = value
    }
}

/// Identifies one fragment of one stripe of a node's step data.
/// `index` is the RS fragment index: `0..<k` data slots, `k..<k+m` parity rows.
public struct FragmentID: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var stripe: UInt16
    public var index: UInt16
    public init(job: JobID, step: Step, stripe: UInt16, index: UInt16) {
        self.job = job
        self.step = step
        self.stripe = stripe
        self.index = index
    }
}

/// A data fragment on its way to a parity holder (bulk = the fragment).
public struct FragmentPut: Hashable, Sendable {
    public var fragment: FragmentID
    public var sourceNode: NodeID
    public var fragmentSizeBytes: UInt64
    public var crc32c: UInt32
    public init(fragment: FragmentID, sourceNode: NodeID, fragmentSizeBytes: UInt64, crc32c: UInt32) {
        self.fragment = fragment
        self.sourceNode = sourceNode
        self.fragmentSizeBytes = fragmentSizeBytes
        self.crc32c = crc32c
    }
}

public struct FragmentAck: Hashable, Sendable {
    public var fragment: FragmentID
    public var holderNode: NodeID
    public init(fragment: FragmentID, holderNode: NodeID) {
        self.fragment = fragment
        self.holderNode = holderNode
    }
}

public struct FragmentGet: Hashable, Sendable {
    public var fragment: FragmentID
    public init(fragment: FragmentID) { self.fragment = fragment }
}

/// A fragment served for a rebuild (bulk = the fragment).
public struct FragmentData: Hashable, Sendable {
    public var fragment: FragmentID
    public var fragmentSizeBytes: UInt64
    public var crc32c: UInt32
    public init(fragment: FragmentID, fragmentSizeBytes: UInt64, crc32c: UInt32) {
        self.fragment = fragment
        self.fragmentSizeBytes = fragmentSizeBytes
        self.crc32c = crc32c
    }
}

/// One survivor of a pipelined repair: its node, the fragment index it holds
/// in the stripe, and the GF(2^8) coefficient of that fragment in the sum
/// that rebuilds the target.
public struct RepairHop: Hashable, Sendable {
    public var nodeID: NodeID
    public var index: UInt16
    public var coefficient: UInt8
    public init(nodeID: NodeID, index: UInt16, coefficient: UInt8) {
        self.nodeID = nodeID
        self.index = index
        self.coefficient = coefficient
    }
}

/// Asks `chain.last` for the partial repair sum Σ coefficient · fragment over
/// the whole chain, for rebuilding `fragment` (its `index` is the target). The
/// receiver asks `chain.dropLast()` of the hop before it the same way, adds
/// its own term and streams the result back, one ``RepairSlice`` per
/// `sliceSizeBytes` (the last may be shorter).
public struct RepairRequest: Hashable, Sendable {
    public var fragment: FragmentID
    public var fragmentSizeBytes: UInt64
    public var sliceSizeBytes: UInt32
    public var chain: [RepairHop]
    public init(fragment: FragmentID, fragmentSizeBytes: UInt64, sliceSizeBytes: UInt32, chain: [RepairHop]) {
        self.fragment = fragment
        self.fragmentSizeBytes = fragmentSizeBytes
        self.sliceSizeBytes = sliceSizeBytes
        self.chain = chain
    }

    /// Slices in the stream: at least one, even for an empty fragment.
    public var sliceCount: Int { max(1, Int((fragmentSizeBytes + UInt64(sliceSizeBytes) - 1) / UInt64(sliceSizeBytes))) }

    /// Byte range of slice `number` within the fragment.
    public func slice(_ number: Int) -> (offsetBytes: UInt64, countBytes: Int) {
        let offset = UInt64(number) * UInt64(sliceSizeBytes)
        return (offset, Int(min(UInt64(sliceSizeBytes), fragmentSizeBytes - min(offset, fragmentSizeBytes))))
    }
}

/// One slice of a partial repair sum (bulk = the slice).
public struct RepairSlice: Hashable, Sendable {
    public var offsetBytes: UInt64
    public var crc32c: UInt32
    public init(offsetBytes: UInt64, crc32c: UInt32) {
        self.offsetBytes = offsetBytes
        self.crc32c = crc32c
    }
}

public struct Heartbeat: Hashable, Sendable {
    public var nodeID: NodeID
    /// Incarnation of the sender: changes on every daemon start, so a node that
    /// came back is told apart from one that never left.
    public var incarnation: UInt64
    public var liveNodes: [NodeID]
    /// The sender holds less than the cluster committed for it (a replacement
    /// or a node restarted on an empty arena) and waits for a rebuild order.
    public var needsRebuild: Bool
    public init(nodeID: NodeID, incarnation: UInt64, liveNodes: [NodeID], needsRebuild: Bool = false) {
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.liveNodes = liveNodes
        self.needsRebuild = needsRebuild
    }
}

/// A node's share of a step is sealed: its size (the bytes it protects) and
/// its shards' manifests (self-checking blobs), so any peer can commit the
/// step and any survivor can tell a replacement what it held.
public struct StepReady: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var nodeID: NodeID
    public var world: UInt32
    public var dataSizeBytes: UInt64
    public var manifests: [[UInt8]]
    public init(job: JobID, step: Step, nodeID: NodeID, world: UInt32, dataSizeBytes: UInt64, manifests: [[UInt8]]) {
        self.job = job
        self.step = step
        self.nodeID = nodeID
        self.world = world
        self.dataSizeBytes = dataSizeBytes
        self.manifests = manifests
    }
}

/// Every fragment of a node's share of a step has been acknowledged by its
/// parity holders; with `stable`, the node also knows every node's protected
/// report for the step (a step commits only once every node is stable, so a
/// commit anywhere means every node knew it could: no node's death can take
/// the knowledge with it).
public struct StepProtected: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var nodeID: NodeID
    public var stable: Bool
    public init(job: JobID, step: Step, nodeID: NodeID, stable: Bool = false) {
        self.job = job
        self.step = step
        self.nodeID = nodeID
        self.stable = stable
    }
}

/// What a node knows of the cluster's steps: the readiness and protection
/// reports it holds. A replacement learns from this what to rebuild.
/// One node's readiness report of one step.
public struct ReportID: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var node: NodeID
    public init(job: JobID, step: Step, node: NodeID) {
        self.job = job
        self.step = step
        self.node = node
    }
}

/// A request for the peer's view of the cluster's steps. `known` lists the
/// readiness reports the requester already holds: the reply leaves them out,
/// so a state pull (every tick while a step waits) carries only what is new
/// instead of every node's manifests again (tens of MiB at LLM scale).
public struct ClusterStateRequest: Hashable, Sendable {
    public var known: [ReportID]
    public init(known: [ReportID] = []) { self.known = known }
}

/// One page of a node's view: what the requester lacks, in step order, up
/// to a page size. `complete` is false when more is left; the requester asks
/// again, naming what it now knows, until a page is complete.
public struct ClusterStateReply: Hashable, Sendable {
    public var steps: [ClusterStepState]
    public var complete: Bool
    public init(steps: [ClusterStepState], complete: Bool = true) {
        self.steps = steps
        self.complete = complete
    }
}

public struct ClusterStepState: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var committed: Bool
    public var ready: [StepReady]
    public var protectedNodes: [NodeID]
    /// Nodes known to hold every node's protected report.
    public var stableNodes: [NodeID]
    public init(job: JobID, step: Step, committed: Bool, ready: [StepReady], protectedNodes: [NodeID], stableNodes: [NodeID] = []) {
        self.job = job
        self.step = step
        self.committed = committed
        self.ready = ready
        self.protectedNodes = protectedNodes
        self.stableNodes = stableNodes
    }
}

/// The coordinator tells a node to rebuild what it lost.
public struct RebuildOrder: Hashable, Sendable {
    public var nodeID: NodeID
    public var incarnation: UInt64
    public var coordinator: NodeID
    public init(nodeID: NodeID, incarnation: UInt64, coordinator: NodeID) {
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.coordinator = coordinator
    }
}

/// The recovery picture for operators: per job, what is lost and what can be restored.
public struct RecoverReply: Hashable, Sendable {
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
}

public struct JobRecovery: Hashable, Sendable {
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
}

public struct ErrorReply: Hashable, Sendable, Error, CustomStringConvertible {
    public var code: ErrorCode
    public var message: String
    public init(code: ErrorCode, message: String) {
        self.code = code
        // Truncate on a character boundary so the message always fits the protocol limit.
        var bounded = ""
        for character in message {
            if bounded.utf8.count + character.utf8.count > ProtocolLimits.maximumMessageBytes { break }
            bounded.append(character)
        }
        self.message = bounded
    }

    public var description: String { "\(code): \(message)" }
}
