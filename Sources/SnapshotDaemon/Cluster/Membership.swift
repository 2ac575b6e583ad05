import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Membership: heartbeats to every peer and the coordinator's decisions
/// (``ClusterMonitor``), carried out.
extension ClusterNode {
    /// Failure detection never waits on one peer: each peer has its own
    /// heartbeat thread (a frozen or black-holed peer stalls only its own,
    /// for at most one connect or reply timeout), and the clock ticks the
    /// monitor on this thread at a fixed interval whatever the peers do.
    /// Threads: one per peer, bounded by ``ClusterConfiguration``'s node limit.
    func heartbeatLoop() {
        for peer in mesh.peers {
            Thread.detachNewThread { [self] in peerHeartbeatLoop(peer) }
        }
        while !isStopping {
            let started = monotonicMilliseconds()
            let (monitorActions, protectionActions) = withClusterState { cluster, state in
                cluster.lastClockTickMilliseconds = started  // the systemd watchdog's proof that the clock runs
                return (cluster.monitor.handle(.tick(nowMilliseconds: started)),
                        cluster.protection.tick(nowMilliseconds: started, liveNodes: Set(cluster.monitor.liveNodes), store: state.store))
            }
            perform(monitorActions)
            execute(protectionActions)
            checkFreeTick()  // CheckFree claims past their deadline refused, shares past their lifetime freed
            sleepRestOfInterval(since: started)
        }
    }

    private func peerHeartbeatLoop(_ peer: NodeID) {
        while !isStopping {
            let started = monotonicMilliseconds()
            let beat = withClusterState { cluster, state in ownHeartbeat(&cluster, state.store) }
            if case .heartbeat(let reply)? = try? mesh.request(peer, .heartbeat, .heartbeat(beat), timeoutMilliseconds: heartbeatTimeoutMilliseconds) {
                observe(reply)
            }
            sleepRestOfInterval(since: started)
        }
    }

    private func sleepRestOfInterval(since started: Int64) {
        let elapsed = monotonicMilliseconds() - started
        if elapsed < cluster.heartbeatIntervalMilliseconds { usleep(useconds_t((cluster.heartbeatIntervalMilliseconds - elapsed) * 1000)) }
    }

    func handleHeartbeat(_ beat: Heartbeat) -> Message {
        observe(beat)
        return .heartbeat(withClusterState { cluster, state in ownHeartbeat(&cluster, state.store) })
    }

    private func ownHeartbeat(_ cluster: inout ClusterState, _ store: SnapshotStore) -> Heartbeat {
        let needsRebuild = !cluster.discovered || cluster.refreshRebuildNeed(store: store) > 0
        return Heartbeat(nodeID: selfID, incarnation: incarnation, needsRebuild: needsRebuild)
    }

    private func observe(_ beat: Heartbeat) {
        let now = monotonicMilliseconds()
        let actions = withClusterState { cluster, _ in
            cluster.monitor.handle(.heartbeat(from: beat.nodeID, incarnation: beat.incarnation, needsRebuild: beat.needsRebuild, nowMilliseconds: now))
        }
        perform(actions)
    }

    private func perform(_ actions: [ClusterMonitor.Action]) {
        for action in actions {
            switch action {
            case .declaredDead(let node):
                counters.increment(.peersDeclaredDead)
                logger.error("peer declared dead: no heartbeat within the failure timeout", metadata: ["peer": "\(node)", "timeoutMilliseconds": "\(cluster.failureTimeoutMilliseconds)"])
            case .resumedAfterPause(let milliseconds):
                counters.increment(.ownPausesDiscounted)
                logger.warning("this node was paused (stopped or starved of CPU); the pause is not counted against its peers", metadata: ["pausedMilliseconds": "\(milliseconds)"])
            case .declaredAlive(let node, let incarnation):
                logger.notice("peer alive", metadata: ["peer": "\(node)", "incarnation": "\(incarnation)"])
            case .becameCoordinator:
                logger.notice("this node is now the coordinator (lowest live node id)")
            case .coordinatorChanged(let node):
                logger.notice("coordinator changed", metadata: ["coordinator": "\(node)"])
            case .orderRebuild(let node, _):
                logger.notice("coordinator orders a rebuild", metadata: ["target": "\(node)"])
                if node == selfID {
                    beginRebuild()
                } else {
                    let order = RebuildOrder(nodeID: node, coordinator: selfID)
                    controlPool.submit { [self] in
                        _ = try? mesh.request(node, .control, .rebuildOrder(order), timeoutMilliseconds: heartbeatTimeoutMilliseconds)
                    }
                }
            case .beyondTolerance(let groupIndex, let lost, let tolerated):
                let report = withClusterState { cluster, _ in cluster.protection.recovery(lostNodes: cluster.lostNodes) }
                logger.critical("group beyond tolerance: nodes lost exceed its parity", metadata: [
                    "group": "\(groupIndex)", "lost": "\(lost)", "tolerated": "\(tolerated)",
                    "report": "\(report.map { "\($0.job): \($0.summary)" }.joined(separator: " | "))",
                ])
            }
        }
    }
}
