import Foundation
import SnapshotProtocol
import SnapshotCore

/// `snapshotctl status`: every node and every group, as the asked daemon
/// sees them. Dead nodes are not asked; live ones report themselves (memory,
/// quarantined files, whether they drain or rebuild), concurrently and
/// within a control timeout each, so one frozen peer costs one timeout.
extension SnapshotServer {
    /// This node's own line.
    /// - Parameter picture: the cluster's recovery picture when the caller has one already.
    func ownSummary(picture: RecoverReply? = nil) -> NodeSummary {
        let rebuilding = (picture ?? cluster?.recoverPicture())?.rebuildingNodes.contains(configuration.nodeID) ?? false
        return state.withLock { state in
            let coordinator = state.cluster?.monitor.coordinator ?? configuration.nodeID
            let joining = state.cluster.map { !$0.discovered } ?? false
            let nodeState: NodeSummary.State = joining ? .joining : state.draining ? .draining : rebuilding ? .rebuilding : .alive
            return NodeSummary(
                node: configuration.nodeID, state: nodeState, isCoordinator: coordinator == configuration.nodeID, usedBytes: state.store.heldBytes + state.store.reservedBytes,
                budgetBytes: state.store.budgetBytes, quarantinedFiles: counters.value(.quarantinedFiles))
        }
    }

    func clusterStatus() -> ClusterStatusReply {
        guard let cluster, let clusterConfiguration else {
            let own = ownSummary()
            return ClusterStatusReply(coordinator: own.node, nodes: [own], groups: [])
        }
        let picture = cluster.recoverPicture()
        let own = ownSummary(picture: picture)
        let dead = Set(picture.deadNodes)
        let rebuilding = Set(picture.rebuildingNodes)
        let peers = clusterConfiguration.nodeIDs.filter { $0 != own.node }
        let answers = concurrentMap(peers) { peer -> NodeSummary in
            guard !dead.contains(peer) else {
                return NodeSummary(node: peer, state: .dead, isCoordinator: false, usedBytes: 0, budgetBytes: 0, quarantinedFiles: 0, note: "declared dead (no heartbeat)")
            }
            do {
                let reply = try cluster.mesh.request(peer, .control, .clusterStatus, timeoutMilliseconds: Limits.operatorPeerTimeoutMilliseconds)
                guard case .clusterStatusReply(let summary) = reply, let line = summary.nodes.first, line.node == peer else {
                    throw PeerError(code: nil, message: "unexpected reply \(reply.type)")
                }
                var seen = line
                if seen.state == .alive, rebuilding.contains(peer) { seen.state = .rebuilding }
                seen.isCoordinator = peer == picture.coordinator
                return seen
            } catch {
                return NodeSummary(node: peer, state: .unreachable, isCoordinator: peer == picture.coordinator, usedBytes: 0, budgetBytes: 0, quarantinedFiles: 0, note: "\(error)")
            }
        }
        var nodes = ([own] + answers).sorted { $0.node < $1.node }
        for index in nodes.indices { nodes[index].isCoordinator = nodes[index].node == picture.coordinator }
        // Unreachable is not lost: the asked node could not reach it, the cluster may well.
        let lost = Set(nodes.filter { $0.state == .dead || $0.state == .rebuilding }.map(\.node))
        let unreachable = Set(nodes.filter { $0.state == .unreachable }.map(\.node))
        let groups = clusterConfiguration.groups.map { group in
            GroupHealth(
                index: UInt32(group.index), nodes: group.nodes, parity: UInt32(group.parity), lost: group.nodes.filter(lost.contains),
                unreachable: group.nodes.filter(unreachable.contains))
        }
        return ClusterStatusReply(coordinator: picture.coordinator, nodes: nodes, groups: groups)
    }
}

/// `transform` over `items` on at most ``Limits/operatorFanOutThreads``
/// threads (each item is a node answering over the network), results in
/// input order.
func concurrentMap<Item: Sendable, Result: Sendable>(_ items: [Item], _ transform: @escaping @Sendable (Item) -> Result) -> [Result] {
    let results = Locked<(next: Int, done: [Int: Result])>((0, [:]))
    let group = DispatchGroup()
    for _ in 0..<min(items.count, Limits.operatorFanOutThreads) {
        group.enter()
        Thread.detachNewThread {
            while true {
                let index = results.withLock { state -> Int in
                    defer { state.next += 1 }
                    return state.next
                }
                guard index < items.count else { break }
                let result = transform(items[index])
                results.withLock { $0.done[index] = result }
            }
            group.leave()
        }
    }
    group.wait()
    return results.withLock { state in items.indices.map { state.done[$0]! } }
}
