import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol

/// Membership: heartbeats to every peer and the coordinator's decisions
/// (``ClusterMonitor``), carried out.
extension ClusterNode {
    func heartbeatLoop() {
        while !isStopping {
            let started = monotonicMilliseconds()
            for peer in mesh.peers {
                let beat = state.withLock { ownHeartbeat(&$0) }
                guard case .heartbeat(let reply)? = try? mesh.request(peer, .heartbeat, .heartbeat(beat), timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { continue }
                observe(reply)
            }
            let now = monotonicMilliseconds()
            let (monitorActions, protectionActions) = state.withLock { state in
                (state.cluster!.monitor.handle(.tick(nowMilliseconds: now)),
                 state.cluster!.protection.tick(nowMilliseconds: now, liveNodes: Set(state.cluster!.monitor.liveNodes)))
            }
            perform(monitorActions)
            execute(protectionActions)
            let elapsed = monotonicMilliseconds() - started
            if elapsed < cluster.heartbeatIntervalMilliseconds { usleep(useconds_t((cluster.heartbeatIntervalMilliseconds - elapsed) * 1000)) }
        }
    }

    func handleHeartbeat(_ beat: Heartbeat) -> Message {
        observe(beat)
        return .heartbeat(state.withLock { ownHeartbeat(&$0) })
    }

    private func ownHeartbeat(_ state: inout NodeState) -> Heartbeat {
        let needsRebuild = !state.cluster!.discovered || state.cluster!.refreshRebuildNeed(store: state.store) > 0
        return Heartbeat(nodeID: selfID, incarnation: incarnation, liveNodes: state.cluster!.monitor.liveNodes, needsRebuild: needsRebuild)
    }

    private func observe(_ beat: Heartbeat) {
        let now = monotonicMilliseconds()
        let actions = state.withLock { state in
            state.cluster!.monitor.handle(.heartbeat(from: beat.nodeID, incarnation: beat.incarnation, needsRebuild: beat.needsRebuild, nowMilliseconds: now))
        }
        perform(actions)
    }

    private func perform(_ actions: [ClusterMonitor.Action]) {
        for action in actions {
            switch action {
            case .declaredDead(let node):
                logger.error("peer declared dead: no heartbeat within the failure timeout", metadata: ["peer": "\(node)", "timeoutMilliseconds": "\(cluster.failureTimeoutMilliseconds)"])
            case .declaredAlive(let node, let incarnation):
                logger.notice("peer alive", metadata: ["peer": "\(node)", "incarnation": "\(incarnation)"])
            case .becameCoordinator:
                logger.notice("this node is now the coordinator (lowest live node id)")
            case .coordinatorChanged(let node):
                logger.notice("coordinator changed", metadata: ["coordinator": "\(node)"])
            case .orderRebuild(let node, let incarnation):
                logger.notice("coordinator orders a rebuild", metadata: ["target": "\(node)"])
                if node == selfID {
                    beginRebuild()
                } else {
                    let order = RebuildOrder(nodeID: node, incarnation: incarnation, coordinator: selfID)
                    controlPool.submit { [self] in
                        _ = try? mesh.request(node, .control, .rebuildOrder(order), timeoutMilliseconds: heartbeatTimeoutMilliseconds)
                    }
                }
            case .beyondTolerance(let groupIndex, let lost, let tolerated):
                let report = state.withLock { $0.cluster!.protection.recovery(lostNodes: $0.cluster!.lostNodes) }
                logger.critical("group beyond tolerance: nodes lost exceed its parity", metadata: [
                    "group": "\(groupIndex)", "lost": "\(lost)", "tolerated": "\(tolerated)",
                    "report": "\(report.map { "\($0.job): \($0.summary)" }.joined(separator: " | "))",
                ])
            }
        }
    }
}
