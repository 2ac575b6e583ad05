import SnapshotProtocol
import SnapshotCore

/// `snapshotctl drain --node X`: X refuses new saves (restores and
/// protection go on) and says when stopping it loses nothing. The asked
/// daemon forwards to X. Draining lasts until cancelled or X restarts.
extension SnapshotServer {
    func drain(_ request: DrainRequest) throws -> DrainReply {
        guard request.node != configuration.nodeID else { return drainHere(request) }
        guard let cluster, clusterConfiguration?.node(request.node) != nil else {
            throw StoreError(.invalidRequest, "node \(request.node) is not in this cluster")
        }
        let reply: Message
        do {
            reply = try cluster.mesh.request(request.node, .control, .drain(request), timeoutMilliseconds: Limits.operatorPeerTimeoutMilliseconds)
        } catch {
            throw StoreError(.unavailable, "node \(request.node) does not answer: \(error)")
        }
        guard case .drainReply(var answer) = reply else { throw StoreError(.internalError, "node \(request.node) answered \(reply.type) to a drain") }
        // Failure detection is each node's own: a loss either side has seen makes it unsafe.
        if answer.safeToStop, let refusal = groupLossRefusal(stopping: request.node, picture: cluster.recoverPicture(), as: "node \(configuration.nodeID) sees") {
            answer.safeToStop = false
            answer.reason = refusal
        }
        return answer
    }

    /// Why stopping `node` would take its group beyond tolerance, as `picture` shows the cluster; nil when it would not.
    func groupLossRefusal(stopping node: NodeID, picture: RecoverReply, as who: String) -> String? {
        guard let group = clusterConfiguration?.group(of: node) else { return nil }
        let others = lostOthers(in: group, besides: node, picture: picture)
        guard others.count >= group.parity else { return nil }
        return "\(who) group \(group.index) has already lost nodes \(others) and tolerates \(group.parity): stopping node \(node) loses data"
    }

    private func lostOthers(in group: ClusterConfiguration.Group, besides node: NodeID, picture: RecoverReply) -> [NodeID] {
        group.nodes.filter { $0 != node && (picture.deadNodes.contains($0) || picture.rebuildingNodes.contains($0)) }
    }

    /// Sets or clears this node's drain and judges whether it may stop now.
    func drainHere(_ request: DrainRequest) -> DrainReply {
        let changed = state.withLock { state -> Bool in
            defer { state.draining = !request.cancel }
            return state.draining == request.cancel
        }
        if changed {
            logger.notice(request.cancel ? "drain cancelled: saves are taken again" : "draining: new saves are refused until the drain is cancelled")
        }
        let (safe, reason) = stopSafety()
        return DrainReply(node: configuration.nodeID, draining: !request.cancel, safeToStop: safe, reason: reason)
    }

    /// Whether stopping this node now loses nothing, and why (not).
    func stopSafety() -> (safe: Bool, reason: String) {
        // Only saves still arriving block: a step not yet committed is no
        // restorable state (and with this node drained it may never commit).
        let inFlight: String? = state.withLock { state in
            for (job, record) in state.store.jobs.sorted(by: { $0.key < $1.key }) {
                for (step, shards) in record.steps.sorted(by: { $0.key < $1.key }) {
                    if let (rank, _) = shards.first(where: { $0.value.state == .receiving || $0.value.state == .sealing }) {
                        return "a save is in flight: step \(step) of \(job), rank \(rank)"
                    }
                }
            }
            return nil
        }
        if let inFlight { return (false, inFlight) }
        guard let cluster else { return (true, "no save in flight; a single node's snapshots stay in its arena across a daemon restart, not across a reboot") }
        let node = configuration.nodeID
        let picture = cluster.recoverPicture()
        if picture.rebuildingNodes.contains(node) { return (false, "this node is still being rebuilt") }
        if let refusal = groupLossRefusal(stopping: node, picture: picture, as: "this node sees") { return (false, refusal) }
        let left = cluster.group.parity - lostOthers(in: cluster.group, besides: node, picture: picture).count - 1
        return (true, "no save in flight; group \(cluster.group.index) survives losing this node (\(left) more after it)")
    }
}
