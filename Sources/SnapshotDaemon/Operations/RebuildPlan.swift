import SnapshotProtocol
import SnapshotCore

/// `snapshotctl recover --node X`: what rebuilding X takes, per committed
/// step the cluster knows X had a share of (its ranks' shards and its
/// parity), where the fragments come from, and whether X holds it by now.
/// Asked repeatedly, it is the rebuild's progress.
extension SnapshotServer {
    func rebuildPlan(_ request: RebuildPlanRequest) throws -> RebuildPlanReply {
        let node = request.node
        guard let cluster, let clusterConfiguration else { throw StoreError(.invalidRequest, "a single node has nothing to rebuild from: no cluster file") }
        guard let group = clusterConfiguration.group(of: node) else { throw StoreError(.invalidRequest, "node \(node) is not in this cluster") }
        let picture = cluster.recoverPicture()
        let held: (state: NodeSummary.State, steps: Set<String>)
        if picture.deadNodes.contains(node) {
            held = (.dead, [])
        } else {
            let status: StatusReply
            if node == configuration.nodeID {
                status = self.status(job: nil, readingDisk: false)
            } else {
                // A peer's failure is not this session's: it becomes an error reply.
                let reply: Message
                do {
                    reply = try cluster.mesh.request(node, .control, .status(StatusRequest(job: nil)), timeoutMilliseconds: Limits.operatorPeerTimeoutMilliseconds)
                } catch {
                    throw StoreError(.unavailable, "node \(node) does not answer: \(error)")
                }
                guard case .statusReply(let answer) = reply else { throw StoreError(.internalError, "node \(node) answered \(reply.type) to a status request") }
                status = answer
            }
            let steps = Set(status.jobs.flatMap { job in job.steps.filter(\.committed).map { "\(job.job)/\($0.step)" } })
            held = (picture.rebuildingNodes.contains(node) ? .rebuilding : .alive, steps)
        }
        let (k, m) = (group.layout.dataFragmentCount, group.parity)
        let steps = cluster.withClusterState { clusterState, _ -> [PlannedStep] in
            let ledger = clusterState.protection.ledger
            return ledger.steps.filter { $0.value.committed && $0.value.ready[node] != nil }.sorted { ($0.key.job, $0.key.step) < ($1.key.job, $1.key.step) }
                .map { id, entry in
                    let fragment = ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group) ?? 0
                    let ranks = entry.ranksByNode[node] ?? []
                    return PlannedStep(
                        job: id.job, step: id.step, ranks: ranks, shardBytes: entry.ready[node]!.dataSizeBytes, parityBytes: UInt64(m) * fragment,
                        sources: group.nodes.filter { $0 != node }, fetchBytes: UInt64((k + m) * k) * fragment,
                        held: ranks.isEmpty ? held.state == .alive : held.steps.contains("\(id.job)/\(id.step)"))
                }
        }
        return RebuildPlanReply(node: node, state: held.state, steps: steps)
    }
}
