import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Protection, source side: this node's sealed share reported to the cluster
/// and streamed, fragment by fragment, to its parity holders.
extension ClusterNode {
    /// Inside state.withLock, when this node's share of a step is sealed.
    func shareSealed(job: JobID, step: Step, state: inout NodeState) {
        state.withClusterPart { cluster, state in shareSealed(job: job, step: step, cluster: &cluster, state: &state) }
    }

    /// The same, inside a transaction that holds the cluster part already.
    func shareSealed(job: JobID, step: Step, cluster: inout ClusterState, state: inout NodeState) {
        guard !state.stopping, let world = state.store.jobs[job]?.world else { return }
        // Timed from now even while joining: the share is local-complete, the wait for discovery is part of its protection.
        metrics.protectionStarted(job: job, step: step)
        guard cluster.discovered else {
            cluster.sealedBeforeDiscovery.append(.init(job: job, step: step))
            return
        }
        let shards = state.store.localShards(job: job, step: step)
        let manifests = shards.map { ManifestFile(key: ShardKey(job: job, step: step, rank: $0.rank), world: world, shard: $0.shard).encoded() }
        let dataBytes = shards.reduce(UInt64(0)) { $0 + $1.shard.segmentSizeBytes }
        let ready = StepReady(job: job, step: step, nodeID: selfID, world: world, dataSizeBytes: dataBytes, manifests: manifests)
        var actions = cluster.protection.shareSealed(ready, store: state.store, nowMilliseconds: monotonicMilliseconds())
        // A share the cluster already has from an earlier incarnation is dropped
        // now, under this lock: a rebuild may be about to adopt the same step.
        actions.removeAll { action in
            guard case .discardShare(let job, let step, let reason) = action else { return false }
            logger.error("dropping this node's share of a step", metadata: ["job": "\(job)", "step": "\(step)", "reason": "\(reason)"])
            storeEffects.apply(state.store.dropUncommittedStep(job: job, step: step), to: &state)
            return true
        }
        let rest = actions
        controlPool.submit { [self] in execute(rest) }
    }

    /// Streams this node's share to its parity holders; reports the outcome to the machine.
    func protect(job: JobID, step: Step, fragmentSizeBytes size: UInt64) {
        let started = monotonicMilliseconds()
        let data: NodeStepData? = state.withLock { state in
            let shards = state.store.localShards(job: job, step: step)
            let segments = shards.compactMap { state.segments[ShardKey(job: job, step: step, rank: $0.rank)] }
            return segments.count == shards.count && !shards.isEmpty ? NodeStepData(segments: segments) : nil
        }
        guard let data else {
            return decide { cluster, _ in cluster.protection.protectionFailed(job: job, step: step, reason: "the step's shards are no longer held here") }
        }
        do {
            try sendFragments(job: job, step: step, data: data, fragmentSizeBytes: size)
        } catch {
            return decide { cluster, _ in cluster.protection.protectionFailed(job: job, step: step, reason: "\(error)") }
        }
        decide { cluster, store in cluster.protection.fragmentsAcknowledged(job: job, step: step, store: store) }
        logger.info("step protected on this node", metadata: [
            "job": "\(job)", "step": "\(step)", "dataBytes": "\(data.totalBytes)", "fragmentBytes": "\(size)",
            "milliseconds": "\(max(1, monotonicMilliseconds() - started))",
        ])
    }

    private func sendFragments(job: JobID, step: Step, data: NodeStepData, fragmentSizeBytes size: UInt64) throws {
        let fragmentSize = Int(size)
        for fragment in 0..<layout.dataFragmentCount where fragment * fragmentSize < data.totalBytes {
            let placement = try layout.placement(node: position, fragment: fragment)
            let offset = fragment * fragmentSize
            let crc = data.checksum(offset: offset, count: fragmentSize)
            let id = FragmentID(job: job, step: step, stripe: UInt16(placement.stripe), index: UInt16(placement.slot))
            for holderPosition in placement.parityHolders {
                let holder = group.nodes[holderPosition]
                try sendWithRetry(to: holder) { connection in
                    try connection.send(
                        .fragmentPut(FragmentPut(fragment: id, sourceNode: selfID, fragmentSizeBytes: size, crc32c: crc)),
                        requestID: 1, bulkLength: size)
                    try data.write(offset: offset, count: fragmentSize, to: connection)
                    let reply = try PeerMesh.reply(connection)
                    guard case .fragmentAck = reply else {
                        throw PeerError(code: nil, message: "holder \(holder) did not acknowledge fragment \(id): \(reply.type)")
                    }
                }
            }
        }
    }

    /// A few attempts (a connection may have gone stale, or the holder has
    /// not yet received the step's reports: `unavailable`); a holder that
    /// stays unreachable, or refuses, fails the protection and the step does
    /// not commit.
    private func sendWithRetry(to node: NodeID, _ body: (FramedConnection) throws -> Void) throws {
        var lastError: (any Error)?
        for attempt in 0..<Limits.fragmentSendAttempts {
            if attempt > 0 { usleep(useconds_t(Limits.fragmentSendRetryMilliseconds * 1000)) }
            do {
                return try mesh.withConnection(node, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds, body)
            } catch let error as PeerError where error.code != nil && error.code != .unavailable {
                throw error  // the holder said no: retrying cannot change its mind
            } catch {
                lastError = error
            }
        }
        throw lastError!
    }

    /// Sends a report to each of `peers` (the mesh retries a stale connection
    /// once). A peer that still misses it is sent it again or pulls it later
    /// (``ProtectionMachine/tick(nowMilliseconds:liveNodes:)``).
    func send(_ message: Message, to peers: [NodeID]) {
        for peer in peers {
            do {
                _ = try mesh.request(peer, .control, message, timeoutMilliseconds: heartbeatTimeoutMilliseconds)
            } catch {
                logger.debug("peer did not take a report", metadata: ["peer": "\(peer)", "type": "\(message.type)", "error": "\(error)"])
            }
        }
    }
}
