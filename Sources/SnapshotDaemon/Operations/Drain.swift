import SnapshotProtocol

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
            reply = try cluster.mesh.request(request.node, .control, .drain(request), timeoutMilliseconds: cluster.heartbeatTimeoutMilliseconds)
        } catch {
            throw StoreError(.unavailable, "node \(request.node) does not answer: \(error)")
        }
        guard case .drainReply(let answer) = reply else { throw StoreError(.internalError, "node \(request.node) answered \(reply.type) to a drain") }
        return answer
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
        let picture = cluster?.recoverPicture()
        return state.withLock { state in
            // Only saves still arriving block: a step not yet committed is no
            // restorable state (and with this node drained it may never commit).
            for (job, record) in state.store.jobs.sorted(by: { $0.key < $1.key }) {
                for (step, shards) in record.steps.sorted(by: { $0.key < $1.key }) {
                    if let (rank, _) = shards.first(where: { $0.value.state == .receiving || $0.value.state == .sealing }) {
                        return (false, "a save is in flight: step \(step) of \(job), rank \(rank)")
                    }
                }
            }
            guard let picture, let cluster else {
                return (true, "no save in flight; a single node's snapshots stay in its arena across a daemon restart, not across a reboot")
            }
            if picture.rebuildingNodes.contains(configuration.nodeID) { return (false, "this node is still being rebuilt") }
            let lost = Set(picture.deadNodes + picture.rebuildingNodes).subtracting([configuration.nodeID])
            let others = cluster.group.nodes.filter(lost.contains)
            guard others.count < cluster.group.parity else {
                return (false, "group \(cluster.group.index) has already lost nodes \(others) and tolerates \(cluster.group.parity): stopping this node loses data")
            }
            return (true, "no save in flight; group \(cluster.group.index) survives losing this node (\(cluster.group.parity - others.count - 1) more after it)")
        }
    }
}
