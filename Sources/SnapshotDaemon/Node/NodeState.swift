import ErasureCoding
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Everything a node changes while it runs, as one value with one owner
/// (``SnapshotServer/state``, a ``Locked``): the store's bookkeeping, the
/// mapped segments it decided about, the sessions and listeners, and in a
/// cluster the machines that decide membership, protection, commit and
/// rebuild. Code holding the lock does bookkeeping only; threads carry out
/// what it decided (socket I/O, fragment streams, CRCs) without it.
struct NodeState: Sendable {
    var store: SnapshotStore
    /// The mapped segment of every shard the store holds.
    var segments: [ShardKey: MappedSegment] = [:]
    /// The mapped segment of every parity fragment the store holds (cluster mode).
    var paritySegments: [ParityKey: MappedSegment] = [:]
    var sessions: [SessionID: OpenSession] = [:]
    var nextSessionID: SessionID = 1
    /// The seal each shard awaits, by the ticket its commitSave was given: a
    /// rank that saves the same uncommitted step again replaces the shard, and
    /// the first save's seal, still running, must neither write its manifest
    /// over the new one nor apply its checksums (or its failure) to it. A new
    /// save of the key withdraws the ticket; otherwise each ticket is removed
    /// by its own seal.
    var sealTickets: [ShardKey: UInt64] = [:]
    var nextSealTicket: UInt64 = 1
    var listeners: [Socket] = []
    var stopping = false
    /// `snapshotctl drain`: new saves are refused (restores and protection go on).
    var draining = false
    /// Cluster mode (a cluster file was given). Cluster-only code reaches it
    /// through ``withClusterPart(_:)``, never by unwrapping.
    var cluster: ClusterState?
    /// Set while ``withClusterPart(_:)`` has lent the cluster part out.
    private(set) var clusterPartLent = false

    /// Runs `body` with the cluster part beside the rest of the state, so a
    /// transaction changes both (the part is lent out while `body` runs: no
    /// copy, and no overlapping access to `self`). Code called from `body`
    /// takes the part as a parameter.
    ///
    /// Preconditions (programming errors, never input): this is a cluster
    /// node's state (a ``ClusterNode`` exists only beside a state built with
    /// its cluster part) and the part is not already lent out.
    mutating func withClusterPart<Result>(_ body: (inout ClusterState, inout NodeState) throws -> Result) rethrows -> Result {
        precondition(!clusterPartLent, "withClusterPart called inside itself: pass the cluster part down instead")
        guard var part = cluster else { preconditionFailure("cluster-only code ran on a node without a cluster part") }
        cluster = nil
        clusterPartLent = true
        defer {
            cluster = part
            clusterPartLent = false
        }
        return try body(&part, &self)
    }
}

/// Which pool of connection slots a session occupies. Remote strangers can
/// only ever hold handshake slots (few, each cut at the authentication
/// deadline), so they cannot exhaust the slots of local clients or of
/// authenticated peers and remote trainers.
enum ConnectionSlot: Sendable, Hashable {
    /// The Unix socket: this node's trainers and operators.
    case local
    /// TCP or RDMA, not yet authenticated.
    case handshake
    /// TCP or RDMA, authenticated: peers and remote clients.
    case remote
    /// Shut down to make room, ending; counted in no pool.
    case evicted
}

struct OpenSession: Sendable {
    let stream: any ByteStream
    var slot: ConnectionSlot
}

extension NodeState {
    func sessionCount(_ slot: ConnectionSlot) -> Int { sessions.values.count { $0.slot == slot } }

    /// Takes a slot of `slot`'s pool for a new session. A full handshake pool
    /// evicts its oldest member instead of refusing (a real client
    /// authenticates within milliseconds, so under a flood of strangers the
    /// oldest handshake is the likeliest stranger); a full local or remote
    /// pool refuses. Returns the new session's id and the evicted stream to
    /// shut down, or nil when refused.
    mutating func admit(_ stream: any ByteStream, to slot: ConnectionSlot, limit: Int) -> (id: SessionID, evicted: (any ByteStream)?)? {
        guard !stopping else { return nil }
        var evicted: (any ByteStream)?
        if sessionCount(slot) >= limit {
            guard slot == .handshake, let oldest = sessions.filter({ $0.value.slot == .handshake }).keys.min() else { return nil }
            sessions[oldest]!.slot = .evicted
            evicted = sessions[oldest]!.stream
        }
        let id = nextSessionID
        nextSessionID += 1
        sessions[id] = OpenSession(stream: stream, slot: slot)
        return (id, evicted)
    }
}

/// A cluster node's part of ``NodeState``.
struct ClusterState: Sendable {
    var monitor: ClusterMonitor
    var protection: ProtectionMachine
    /// Until the node has learned the cluster's committed steps it cannot say
    /// what it holds: "not committed" from a replacement would make a trainer
    /// start over, so it answers "unavailable" instead.
    var discovered = false
    var rebuild = RebuildMachine()
    /// Shares whose tensors were checked against their sealed CRCs for
    /// serving, and when: a rebuild asks for every fragment of a share, and
    /// checking the whole share once serves them all.
    var verifiedShares: [ProtectionMachine.StepID: Int64] = [:]
    /// CheckFree rebuilds this node takes part in: waiting for the exact
    /// rebuild, computing, or computed and awaiting the planner's commit or abort.
    var checkFree = CheckFreeState()
    /// When the membership clock last ticked (monotonic ms; 0 before its first tick).
    var lastClockTickMilliseconds: Int64 = 0
    /// Shares sealed while the node was still joining: reported once it knows
    /// the cluster (a replacement's share of a step its predecessor reported is
    /// then dropped, never reported twice).
    var sealedBeforeDiscovery: [ProtectionMachine.StepID] = []

    /// Nodes whose data is not available now.
    var lostNodes: Set<NodeID> { Set(monitor.deadNodes).union(monitor.needsRebuild) }

    /// The steps this node misses that a rebuild can work on now.
    /// Missing committed steps the exact rebuild may work on: not those a
    /// CheckFree rebuild has claimed (they still count as missing).
    func rebuildableSteps(store: SnapshotStore) -> [ProtectionMachine.StepID] {
        protection.rebuildableSteps(store: store).filter { !checkFree.machine.claims($0) }
    }

    /// Tells the monitor whether this node needs a rebuild; returns how many steps it misses.
    @discardableResult
    mutating func refreshRebuildNeed(store: SnapshotStore) -> Int {
        let missing = discovered ? protection.missingSteps(store: store).count : 0
        monitor.setSelfNeedsRebuild(missing > 0)
        return missing
    }
}
