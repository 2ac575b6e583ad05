import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// The cluster's view of its steps: learning it when the node joins, pulling
/// what was missed (anti-entropy), taking peers' reports, and answering for
/// the whole cluster to peers and operators.
extension ClusterNode {
    /// Learns the cluster's steps from every peer that answers; a node that
    /// took part in a committed step it does not hold needs a rebuild (it
    /// replaced a lost node, or restarted on an empty arena).
    func discover() {
        // Silence is not an answer: a replacement that concluded "nothing to
        // rebuild" from slow peers would serve an empty node. Only when every
        // peer refuses the connection (none is running: a fresh cluster) does
        // the node go on without the cluster's view.
        var learned = false
        var round = 0
        while !learned, !isStopping {
            var everyPeerRefused = true
            for peer in mesh.peers {
                do {
                    guard try pull(from: peer) else { continue }
                    learned = true
                } catch let error as IOError where error.errnoCode == ECONNREFUSED {
                    continue
                } catch let error as PeerError where error.code == .unavailable {
                    continue  // joining too: like a peer not running, it knows nothing yet
                } catch {
                    everyPeerRefused = false
                }
            }
            round += 1
            let waitedMilliseconds = Int64(round) * Limits.discoveryPollMilliseconds
            if learned || (everyPeerRefused && waitedMilliseconds >= cluster.failureTimeoutMilliseconds) { break }
            if waitedMilliseconds % Limits.discoveryWarningIntervalMilliseconds == 0 { logger.warning("still waiting for a peer to share the cluster's state") }
            usleep(useconds_t(Limits.discoveryPollMilliseconds * 1000))
        }
        let (missing, rebuildActions) = withClusterState { cluster, state in
            cluster.discovered = true
            for share in cluster.sealedBeforeDiscovery { shareSealed(job: share.job, step: share.step, cluster: &cluster, state: &state) }
            cluster.sealedBeforeDiscovery = []
            let missing = cluster.refreshRebuildNeed(store: state.store)
            return (missing, cluster.rebuild.discovered(rebuildable: cluster.rebuildableSteps(store: state.store)))
        }
        state.broadcast()
        executeRebuild(rebuildActions)
        if missing > 0 {
            logger.warning("this node holds less than the cluster committed for it; waiting for the coordinator's rebuild order", metadata: ["steps": "\(missing)"])
        } else {
            logger.info("cluster view established", metadata: ["peersAnswered": "\(learned)", "group": "\(group.index)", "position": "\(position)"])
        }
    }

    /// Asks each of `peers` for its view and merges it.
    func pullState(from peers: [NodeID]) {
        for peer in peers { _ = try? pull(from: peer) }
    }

    /// Pulls `peer`'s whole view, page by page: each request names the
    /// reports this node now holds, so each page brings only new ones.
    /// True once a complete page arrived.
    private func pull(from peer: NodeID) throws -> Bool {
        // Reports already sent in this pull count as known even if this node
        // did not keep them (too old, or not the first of their node): every
        // page brings something new, so the pull always ends.
        var received: [ReportID] = []
        for _ in 0..<Limits.maximumClusterStatePages {
            let request = ClusterStateRequest(known: Array(Set(withClusterState { cluster, _ in cluster.protection.ledger.knownReports } + received)))
            guard case .clusterStateReply(let reply) = try mesh.request(peer, .control, .clusterStateRequest(request), timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { return false }
            merge(reply)
            if reply.complete { return true }
            received += reply.steps.flatMap { step in step.ready.map { ReportID(job: step.job, step: step.step, node: $0.nodeID) } }
        }
        logger.warning("a peer's cluster view did not fit the page limit; the rest is pulled later", metadata: ["peer": "\(peer)", "pages": "\(Limits.maximumClusterStatePages)"])
        return false
    }

    private func merge(_ reply: ClusterStateReply) {
        let now = monotonicMilliseconds()
        decide { cluster, store in cluster.protection.merge(reply, store: store, nowMilliseconds: now) }
    }

    func handleStepReady(_ ready: StepReady) -> Message {
        let now = monotonicMilliseconds()
        decide { cluster, store in cluster.protection.received(ready, store: store, nowMilliseconds: now) }
        return .ok
    }

    func handleStepProtected(_ report: StepProtected) -> Message {
        decide { cluster, store in cluster.protection.received(report, store: store) }
        return .ok
    }

    /// A node that is itself joining has no view to give: an empty one would
    /// tell a joining peer that nothing was committed.
    func handleClusterState(_ request: ClusterStateRequest) -> Message {
        let known = Set(request.known)
        return withClusterState { cluster, _ in
            guard cluster.discovered else { return .error(ErrorReply(code: .unavailable, message: "node \(selfID) is joining the cluster itself")) }
            return .clusterStateReply(cluster.protection.ledger.clusterState(omitting: known, pageBytes: Limits.clusterStatePageBytes))
        }
    }

    func handleRebuildOrder(_ order: RebuildOrder) -> Message {
        logger.notice("rebuild ordered", metadata: ["coordinator": "\(order.coordinator)"])
        if order.nodeID == selfID { beginRebuild() }
        return .ok
    }

    /// This node's view; it lists itself as rebuilding until it has joined,
    /// holds everything the cluster committed for it (peers may not have
    /// heard yet) and its rebuild has finished.
    func recoverReport() -> RecoverReply {
        var report = recoverPicture()
        // Outside the state lock: planning decodes the step's manifests.
        for index in report.jobs.indices {
            let job = report.jobs[index].job
            var lines = report.jobs[index].lostRanks.isEmpty ? [] : [checkFreeSummary(job: job)]
            lines += approximateShards(job: job).map { "rank \($0.rank) of step \($0.step) on node \(selfID) is \($0.reconstruction)" }
            report.jobs[index].checkFree = lines.filter { !$0.isEmpty }.joined(separator: "; ")
        }
        return report
    }

    /// The newest committed step's shards on this node that CheckFree rebuilt.
    func approximateShards(job: JobID) -> [(rank: Rank, step: Step, reconstruction: Reconstruction)] {
        state.withLock { state in
            guard let step = state.store.latestCommitted(job: job) else { return [] }
            return state.store.localShards(job: job, step: step).compactMap { rank, shard in shard.reconstruction.map { (rank, step, $0) } }
        }
    }

    func recoverPicture() -> RecoverReply {
        withClusterState { cluster, state in
            var rebuilding = cluster.monitor.needsRebuild
            if !cluster.discovered || cluster.rebuild.isRunning || cluster.refreshRebuildNeed(store: state.store) > 0 {
                rebuilding.insert(selfID)
            }
            return RecoverReply(
                coordinator: cluster.monitor.coordinator, deadNodes: cluster.monitor.deadNodes,
                rebuildingNodes: rebuilding.sorted(), jobs: cluster.protection.recovery(lostNodes: cluster.lostNodes.union(rebuilding)))
        }
    }
}
