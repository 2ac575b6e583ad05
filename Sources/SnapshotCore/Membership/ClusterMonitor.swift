public import SnapshotProtocol

/// Failure detection and coordination as a deterministic state machine
/// (etcd/raft style): events in, actions out. The clock and the network live
/// outside; tests drive every interleaving.
///
/// Every node runs one. Each declares a peer dead when it has not heard from
/// it for `failureTimeoutMilliseconds`, and alive again on the next heartbeat.
/// The live node with the lowest id is the coordinator; only the coordinator
/// orders rebuilds, and it re-issues an outstanding order every
/// `reorderIntervalMilliseconds`, so an order lost with a dead coordinator is
/// given again by its successor. A rebuild is ordered only while the group is
/// within tolerance (at most m members dead or rebuilding); beyond it the
/// coordinator reports instead of ordering, since a rebuild could not succeed.
/// A monitor decides nothing for one failure timeout after it starts: until
/// then it cannot tell a silent peer from a dead one (a replacement that
/// started believing everyone alive would order rebuilds beyond tolerance).
///
/// A node judges a peer silent only for time it was awake to listen: when
/// its own ticks stop for more than half a failure timeout (the process was
/// stopped, or starved of CPU), the pause is not counted against its peers —
/// their heartbeats were queued behind it, not missing. Without this, a node
/// resuming from SIGSTOP declared live peers dead before reading their
/// heartbeats (found by the simulation, seeds 24066 and 65685).
public struct ClusterMonitor: Sendable {
    public enum PeerState: Sendable, Equatable {
        case alive
        case dead
    }

    public enum Event: Sendable, Equatable {
        case tick(nowMilliseconds: Int64)
        case heartbeat(from: NodeID, incarnation: UInt64, needsRebuild: Bool, nowMilliseconds: Int64)
    }

    public enum Action: Sendable, Equatable {
        case declaredDead(NodeID)
        /// This node's ticks stopped for this long; the pause was not counted against its peers.
        case resumedAfterPause(milliseconds: Int64)
        case declaredAlive(NodeID, incarnation: UInt64)
        case becameCoordinator
        case coordinatorChanged(to: NodeID)
        case orderRebuild(NodeID, incarnation: UInt64)
        case beyondTolerance(group: Int, lost: [NodeID], tolerated: Int)
    }

    public let selfID: NodeID
    public let groups: [ClusterConfiguration.Group]
    public let failureTimeoutMilliseconds: Int64
    public let heartbeatIntervalMilliseconds: Int64
    public let reorderIntervalMilliseconds: Int64
    /// A gap between ticks longer than this is a pause of this node.
    public var pauseThresholdMilliseconds: Int64 { failureTimeoutMilliseconds / 2 }

    public private(set) var states: [NodeID: PeerState] = [:]
    public private(set) var lastHeard: [NodeID: Int64] = [:]
    public private(set) var incarnations: [NodeID: UInt64] = [:]
    public private(set) var needsRebuild: Set<NodeID> = []
    public private(set) var coordinator: NodeID
    private var lastOrder: [NodeID: Int64] = [:]
    private var reportedBeyond: Set<Int> = []
    /// No orders before this: one failure timeout after start or after a
    /// pause, the node cannot yet tell a silent peer from a dead one.
    private var ordersFromMilliseconds: Int64
    private var lastTickMilliseconds: Int64

    /// Peers start alive as of `nowMilliseconds`: a node that never answers is
    /// declared dead one timeout after start.
    public init(selfID: NodeID, configuration: ClusterConfiguration, nowMilliseconds: Int64, reorderIntervalMilliseconds: Int64 = 2000) {
        self.selfID = selfID
        groups = configuration.groups
        failureTimeoutMilliseconds = configuration.failureTimeoutMilliseconds
        heartbeatIntervalMilliseconds = configuration.heartbeatIntervalMilliseconds
        self.reorderIntervalMilliseconds = reorderIntervalMilliseconds
        ordersFromMilliseconds = nowMilliseconds + configuration.failureTimeoutMilliseconds
        lastTickMilliseconds = nowMilliseconds
        for id in configuration.nodeIDs {
            states[id] = .alive
            lastHeard[id] = nowMilliseconds
        }
        coordinator = configuration.nodeIDs.min() ?? selfID
    }

    public var isCoordinator: Bool { coordinator == selfID }
    public var deadNodes: [NodeID] { states.filter { $0.value == .dead }.map(\.key).sorted() }
    public var liveNodes: [NodeID] { states.filter { $0.value == .alive }.map(\.key).sorted() }
    /// Peers not heard from since this node started: alive by assumption
    /// only (a fresh replacement cannot yet tell a slow peer from a dead one).
    public var unheardNodes: Set<NodeID> { Set(states.keys.filter { $0 != selfID && incarnations[$0] == nil }) }

    /// This node's own need for a rebuild (it learns it from its peers' state).
    public mutating func setSelfNeedsRebuild(_ value: Bool) {
        if value { needsRebuild.insert(selfID) } else { needsRebuild.remove(selfID) }
    }

    public mutating func handle(_ event: Event) -> [Action] {
        var actions: [Action] = []
        switch event {
        case .heartbeat(let from, let incarnation, let rebuild, let now):
            guard from != selfID, states[from] != nil else { return [] }
            lastHeard[from] = now
            let restarted = incarnations[from].map { $0 != incarnation } ?? false
            incarnations[from] = incarnation
            if rebuild { needsRebuild.insert(from) } else { needsRebuild.remove(from) }
            if states[from] == .dead || restarted {
                states[from] = .alive
                lastOrder[from] = nil
                actions.append(.declaredAlive(from, incarnation: incarnation))
            }
            actions += electAndOrder(now: now)
        case .tick(let now):
            actions += discountOwnPause(now: now)
            for (id, state) in states.sorted(by: { $0.key < $1.key }) where id != selfID && state == .alive {
                if now - (lastHeard[id] ?? now) > failureTimeoutMilliseconds {
                    states[id] = .dead
                    actions.append(.declaredDead(id))
                }
            }
            actions += electAndOrder(now: now)
        }
        return actions
    }

    /// Moves every peer's last-heard time forward by the part of the gap since
    /// the last tick that exceeds one heartbeat interval, if the gap shows a pause.
    private mutating func discountOwnPause(now: Int64) -> [Action] {
        defer { lastTickMilliseconds = max(lastTickMilliseconds, now) }
        let gap = now - lastTickMilliseconds
        guard gap > pauseThresholdMilliseconds else { return [] }
        let credit = gap - heartbeatIntervalMilliseconds
        for (id, heard) in lastHeard { lastHeard[id] = min(now, heard + credit) }
        ordersFromMilliseconds = max(ordersFromMilliseconds, now + failureTimeoutMilliseconds)
        return [.resumedAfterPause(milliseconds: gap)]
    }

    private mutating func electAndOrder(now: Int64) -> [Action] {
        var actions: [Action] = []
        let elected = liveNodes.min() ?? selfID
        if elected != coordinator {
            coordinator = elected
            actions.append(elected == selfID ? .becameCoordinator : .coordinatorChanged(to: elected))
        }
        guard isCoordinator, now > ordersFromMilliseconds else { return actions }
        for group in groups {
            let lost = group.nodes.filter { states[$0] == .dead || needsRebuild.contains($0) }.sorted()
            if lost.count > group.parity {
                if reportedBeyond.insert(group.index).inserted {
                    actions.append(.beyondTolerance(group: group.index, lost: lost, tolerated: group.parity))
                }
                continue
            }
            reportedBeyond.remove(group.index)
            for node in lost where needsRebuild.contains(node) && states[node] == .alive {
                if let last = lastOrder[node], now - last < reorderIntervalMilliseconds { continue }
                lastOrder[node] = now
                actions.append(.orderRebuild(node, incarnation: incarnations[node] ?? 0))
            }
        }
        return actions
    }
}
