@testable import SnapshotCore
import SnapshotProtocol
import Testing

func cluster(nodes n: Int, parity m: Int, timeout: Int64 = 1000) throws -> ClusterConfiguration {
    try ClusterConfiguration(
        nodes: (0..<n).map { ClusterConfiguration.Node(id: NodeID($0), host: "127.0.0.1", port: UInt16(7000 + $0)) },
        groups: [ClusterConfiguration.Group(index: 0, nodes: (0..<n).map { NodeID($0) }, parity: m)],
        heartbeatIntervalMilliseconds: 100, failureTimeoutMilliseconds: timeout)
}

/// Every node's monitor, a clock, and a synchronous network between live
/// nodes. Replacements rebuild as soon as an order reaches them.
struct ClusterSimulation {
    let configuration: ClusterConfiguration
    var now: Int64 = 0
    var monitors: [NodeID: ClusterMonitor] = [:]
    var live: Set<NodeID> = []
    var incarnation: [NodeID: UInt64] = [:]
    var needsRebuild: Set<NodeID> = []
    var ordersIssued: [(by: NodeID, to: NodeID)] = []
    var beyondReports: [(by: NodeID, lost: [NodeID])] = []

    init(_ configuration: ClusterConfiguration) {
        self.configuration = configuration
        for id in configuration.nodeIDs { start(id, replacement: false) }
    }

    mutating func start(_ id: NodeID, replacement: Bool) {
        monitors[id] = ClusterMonitor(selfID: id, configuration: configuration, nowMilliseconds: now, reorderIntervalMilliseconds: 500)
        incarnation[id, default: 0] += 1
        live.insert(id)
        if replacement {
            needsRebuild.insert(id)
            monitors[id]!.setSelfNeedsRebuild(true)
        }
    }

    mutating func kill(_ id: NodeID) {
        live.remove(id)
        needsRebuild.remove(id)
    }

    mutating func run(milliseconds: Int64) {
        let end = now + milliseconds
        while now < end {
            now += 100
            for sender in live.sorted() {
                for receiver in live.sorted() where receiver != sender {
                    let actions = monitors[receiver]!.handle(.heartbeat(from: sender, incarnation: incarnation[sender]!, needsRebuild: needsRebuild.contains(sender), nowMilliseconds: now))
                    apply(actions, at: receiver)
                }
            }
            for id in live.sorted() { apply(monitors[id]!.handle(.tick(nowMilliseconds: now)), at: id) }
        }
    }

    private mutating func apply(_ actions: [ClusterMonitor.Action], at node: NodeID) {
        for action in actions {
            switch action {
            case .orderRebuild(let target, _):
                ordersIssued.append((node, target))
                if live.contains(target), needsRebuild.remove(target) != nil {
                    monitors[target]!.setSelfNeedsRebuild(false)
                }
            case .beyondTolerance(_, let lost, _): beyondReports.append((node, lost))
            default: break
            }
        }
    }

    var expectedCoordinator: NodeID { live.min()! }
    func coordinator(of node: NodeID) -> NodeID { monitors[node]!.coordinator }
    func dead(of node: NodeID) -> [NodeID] { monitors[node]!.deadNodes }
}

@Suite("Coordinator state machine")
struct ClusterMonitorTests {
    @Test func lowestLiveNodeCoordinatesAndSuccessorTakesOver() throws {
        var sim = ClusterSimulation(try cluster(nodes: 4, parity: 1))
        sim.run(milliseconds: 500)
        #expect(sim.live.allSatisfy { sim.coordinator(of: $0) == 0 })
        sim.kill(0)
        sim.run(milliseconds: 1500)
        #expect(sim.live.allSatisfy { sim.coordinator(of: $0) == 1 && sim.dead(of: $0) == [0] })
        // The old coordinator comes back (replacement): it coordinates again and is rebuilt.
        sim.start(0, replacement: true)
        sim.run(milliseconds: 2000)
        #expect(sim.live.allSatisfy { sim.coordinator(of: $0) == 0 && sim.dead(of: $0).isEmpty })
        #expect(sim.needsRebuild.isEmpty)
    }

    /// Ticks every 100 ms (the heartbeat interval) over `range`, returning what they decided.
    private func ticks(_ monitor: inout ClusterMonitor, _ range: StrideThrough<Int64>) -> [ClusterMonitor.Action] {
        range.flatMap { monitor.handle(.tick(nowMilliseconds: $0)) }
    }

    @Test func declaresDeadOnlyAfterTheTimeout() throws {
        var monitor = ClusterMonitor(selfID: 1, configuration: try cluster(nodes: 3, parity: 2, timeout: 1000), nowMilliseconds: 0)
        #expect(ticks(&monitor, stride(from: 100, through: 800, by: 100)).isEmpty)
        #expect(monitor.handle(.heartbeat(from: 2, incarnation: 7, needsRebuild: false, nowMilliseconds: 900)).isEmpty)
        #expect(ticks(&monitor, stride(from: 900, through: 1000, by: 100)).isEmpty)
        #expect(monitor.handle(.tick(nowMilliseconds: 1001)) == [.declaredDead(0), .becameCoordinator])
        #expect(ticks(&monitor, stride(from: 1100, through: 1900, by: 100)).isEmpty)
        #expect(monitor.handle(.tick(nowMilliseconds: 1901)) == [.declaredDead(2)])
        #expect(monitor.handle(.heartbeat(from: 2, incarnation: 7, needsRebuild: false, nowMilliseconds: 2000)) == [.declaredAlive(2, incarnation: 7)])
        // A restart is noticed through the incarnation even without a timeout.
        #expect(monitor.handle(.heartbeat(from: 2, incarnation: 8, needsRebuild: true, nowMilliseconds: 2100)) == [.declaredAlive(2, incarnation: 8), .orderRebuild(2, incarnation: 8)])
        // Orders repeat only after the re-order interval.
        #expect(monitor.handle(.tick(nowMilliseconds: 2200)).isEmpty)
        #expect(monitor.handle(.heartbeat(from: 2, incarnation: 8, needsRebuild: true, nowMilliseconds: 4200)) == [.orderRebuild(2, incarnation: 8)])
        // Heartbeats naming an unknown node or this node are ignored.
        #expect(monitor.handle(.heartbeat(from: 9, incarnation: 1, needsRebuild: true, nowMilliseconds: 4300)).isEmpty)
        #expect(monitor.handle(.heartbeat(from: 1, incarnation: 1, needsRebuild: true, nowMilliseconds: 4300)).isEmpty)
    }

    /// A node stopped for longer than its peers' timeout (SIGSTOP, CPU
    /// starvation) resumes without declaring anyone dead: the silence was its
    /// own. A peer that stays silent after the resume is still declared dead,
    /// one timeout later.
    @Test func ownPauseIsNotCountedAgainstPeers() throws {
        var monitor = ClusterMonitor(selfID: 1, configuration: try cluster(nodes: 3, parity: 1, timeout: 1000), nowMilliseconds: 0)
        for now in stride(from: Int64(100), through: 1000, by: 100) {
            _ = monitor.handle(.heartbeat(from: 0, incarnation: 1, needsRebuild: false, nowMilliseconds: now))
            if now <= 500 { _ = monitor.handle(.heartbeat(from: 2, incarnation: 1, needsRebuild: false, nowMilliseconds: now)) }
            #expect(monitor.handle(.tick(nowMilliseconds: now)).isEmpty)
        }
        // Stopped from 1000 to 3000; node 0 was last heard at 1000, node 2 (gone silent) at 500.
        #expect(monitor.handle(.tick(nowMilliseconds: 3000)) == [.resumedAfterPause(milliseconds: 2000)])
        _ = monitor.handle(.heartbeat(from: 0, incarnation: 1, needsRebuild: false, nowMilliseconds: 3010))
        for now in stride(from: Int64(3100), through: 3400, by: 100) {
            _ = monitor.handle(.heartbeat(from: 0, incarnation: 1, needsRebuild: false, nowMilliseconds: now))
            #expect(monitor.handle(.tick(nowMilliseconds: now)).isEmpty, "at \(now) ms")
        }
        // Node 2's silence outside the pause still counts: 500 ms before it
        // (plus one interval of slack), then 500 ms after it.
        _ = monitor.handle(.heartbeat(from: 0, incarnation: 1, needsRebuild: false, nowMilliseconds: 3500))
        #expect(monitor.handle(.tick(nowMilliseconds: 3500)) == [.declaredDead(2)])
        #expect(monitor.deadNodes == [2])
        // A gap under half the timeout (a slow tick) is not a pause.
        _ = monitor.handle(.heartbeat(from: 0, incarnation: 1, needsRebuild: false, nowMilliseconds: 3900))
        #expect(monitor.handle(.tick(nowMilliseconds: 4000)).isEmpty)
    }

    @Test func aFreshMonitorOrdersNothingUntilItCanTellSilentFromDead() throws {
        var monitor = ClusterMonitor(selfID: 0, configuration: try cluster(nodes: 4, parity: 1, timeout: 1000), nowMilliseconds: 0)
        // Node 2 needs a rebuild, but node 3 has not been heard from: it may be dead too.
        #expect(monitor.handle(.heartbeat(from: 2, incarnation: 1, needsRebuild: true, nowMilliseconds: 100)).isEmpty)
        #expect(ticks(&monitor, stride(from: 100, through: 1000, by: 100)).isEmpty)
        #expect(monitor.handle(.heartbeat(from: 1, incarnation: 1, needsRebuild: false, nowMilliseconds: 1000)).isEmpty)
        #expect(monitor.handle(.heartbeat(from: 2, incarnation: 1, needsRebuild: true, nowMilliseconds: 1000)).isEmpty)
        #expect(monitor.handle(.tick(nowMilliseconds: 1100)) == [.declaredDead(3), .beyondTolerance(group: 0, lost: [2, 3], tolerated: 1)])
    }

    /// A rebuild asks peers it has heard from first: before the timeout, a
    /// silent peer is "alive" only by assumption.
    @Test func unheardPeersAreKnownAsSuch() throws {
        var monitor = ClusterMonitor(selfID: 0, configuration: try cluster(nodes: 4, parity: 1, timeout: 1000), nowMilliseconds: 0)
        #expect(monitor.unheardNodes == [1, 2, 3])
        _ = monitor.handle(.heartbeat(from: 2, incarnation: 1, needsRebuild: false, nowMilliseconds: 100))
        #expect(monitor.unheardNodes == [1, 3])
        #expect(monitor.liveNodes == [0, 1, 2, 3], "still alive by assumption")
    }

    @Test func nonCoordinatorsNeverOrder() throws {
        var monitor = ClusterMonitor(selfID: 2, configuration: try cluster(nodes: 3, parity: 1), nowMilliseconds: 0)
        let actions = monitor.handle(.heartbeat(from: 1, incarnation: 3, needsRebuild: true, nowMilliseconds: 10))
        #expect(actions.isEmpty)
        #expect(!monitor.isCoordinator)
    }

    /// Exhaustive over small clusters: every set of killed nodes (up to m + 1),
    /// each replaced in every order, with the coordinator among them or not.
    /// Within tolerance every replacement is rebuilt and only coordinators
    /// order; beyond it nothing is ordered and the loss is reported.
    @Test(arguments: [(3, 1), (4, 1), (4, 2), (5, 2)])
    func everyLossAndRestartOrder(n: Int, m: Int) throws {
        let configuration = try cluster(nodes: n, parity: m)
        for lostCount in 1...(m + 1) {
            for lost in subsets(of: (0..<n).map { NodeID($0) }, size: lostCount) {
                for order in permutations(lost) {
                    var sim = ClusterSimulation(configuration)
                    sim.run(milliseconds: 300)
                    for node in lost { sim.kill(node) }
                    sim.run(milliseconds: 1500)  // detected dead, a successor coordinates
                    #expect(sim.live.allSatisfy { sim.coordinator(of: $0) == sim.expectedCoordinator })
                    for node in order {
                        sim.start(node, replacement: true)
                        sim.run(milliseconds: 300)
                    }
                    sim.run(milliseconds: 1500)
                    let context = "n=\(n) m=\(m) lost=\(lost) order=\(order)"
                    for (by, _) in sim.ordersIssued {
                        #expect(by == sim.coordinator(of: by) || sim.live.contains(by), "\(context)")
                    }
                    #expect(sim.live.allSatisfy { sim.coordinator(of: $0) == sim.expectedCoordinator }, "\(context): coordinators disagree")
                    if lostCount <= m {
                        #expect(sim.needsRebuild.isEmpty, "\(context): replacements not rebuilt")
                        #expect(sim.beyondReports.isEmpty, "\(context)")
                    } else {
                        #expect(sim.needsRebuild == Set(lost), "\(context): a rebuild was ordered beyond tolerance")
                        #expect(!sim.beyondReports.isEmpty, "\(context): the loss was not reported")
                        #expect(sim.beyondReports.allSatisfy { Set($0.lost) == Set(lost) }, "\(context)")
                    }
                }
            }
        }
    }
}

func subsets<T>(of items: [T], size: Int) -> [[T]] {
    guard size > 0 else { return [[]] }
    guard items.count >= size else { return [] }
    let head = items[0], tail = Array(items.dropFirst())
    return subsets(of: tail, size: size - 1).map { [head] + $0 } + subsets(of: tail, size: size)
}

func permutations<T>(_ items: [T]) -> [[T]] {
    guard items.count > 1 else { return [items] }
    return items.indices.flatMap { i -> [[T]] in
        var rest = items
        let item = rest.remove(at: i)
        return permutations(rest).map { [item] + $0 }
    }
}

@Suite("Cluster file and ledger")
struct ClusterLedgerTests {
    @Test func commitNeedsEveryNodeProtectedKnownEverywhereAndEveryRankCovered() throws {
        var ledger = ClusterLedger(configuration: try cluster(nodes: 3, parity: 1))
        let job = try JobID("j")
        for node in 0..<3 as Range<NodeID> {
            ledger.recordReady(StepReady(job: job, step: 5, nodeID: node, world: 6, dataSizeBytes: 100, manifests: []), ranks: [node * 2, node * 2 + 1])
        }
        var committed = ledger.commitIfComplete(job: job, step: 5)
        #expect(!committed, "no node has protected its share yet")
        ledger.recordProtected(job: job, step: 5, node: 0)
        ledger.recordProtected(job: job, step: 5, node: 1)
        committed = ledger.commitIfComplete(job: job, step: 5)
        #expect(!committed, "node 2 has not protected its share")
        ledger.recordProtected(job: job, step: 5, node: 2)
        #expect(ledger.isFullyProtected(job: job, step: 5))
        committed = ledger.commitIfComplete(job: job, step: 5)
        #expect(!committed, "no node has said it knows every protected report")
        ledger.recordStable(job: job, step: 5, node: 0)
        ledger.recordStable(job: job, step: 5, node: 1)
        committed = ledger.commitIfComplete(job: job, step: 5)
        #expect(!committed, "node 2 has not said it knows every report")
        ledger.recordStable(job: job, step: 5, node: 2)
        committed = ledger.commitIfComplete(job: job, step: 5)
        #expect(committed)
        committed = ledger.commitIfComplete(job: job, step: 5)
        #expect(!committed, "the transition is reported once")
        let group = ledger.configuration.groups[0]
        #expect(ledger.fragmentSizeBytes(job: job, step: 5, group: group) == 50)
        let recovery = ledger.recovery(lostNodes: [1, 2])
        #expect(recovery.first?.lostRanks == [2, 3, 4, 5])
        #expect(recovery.first?.newestRestorable == nil)
        #expect(ledger.recovery(lostNodes: [2]).first?.newestRestorable == 5)
    }
}

