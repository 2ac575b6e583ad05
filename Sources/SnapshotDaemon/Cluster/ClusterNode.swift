import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol

/// This daemon's part in the cluster, as an executor of pure machines:
/// ``ClusterMonitor`` decides liveness and coordination, ``ProtectionMachine``
/// decides protection, commit and what needs a rebuild. This class only feeds
/// them events (from the network, the clock and the store) and carries out the
/// actions they return, on bounded worker pools. Their state is guarded by the
/// server's lock; network work happens outside it.
final class ClusterNode: @unchecked Sendable {  // mutable state below is guarded by server.lock
    unowned let server: SnapshotServer
    let cluster: ClusterConfiguration
    let selfID: NodeID
    let group: ClusterConfiguration.Group
    let position: Int
    let layout: StripeLayout
    let code: ReedSolomon
    let mesh: PeerMesh
    let incarnation = UInt64.random(in: 1...UInt64.max)
    let logger: Logger
    /// Serializes folding into parity buffers (two sources of one stripe may arrive at once).
    let accumulateLock = NSLock()
    /// Reports, state pulls and rebuild orders: small, latency-bound messages.
    let controlPool = WorkerPool(name: "snapshotd.control", threads: 4)
    /// Fragment streams to parity holders: one per step in flight, bounded.
    let dataPool = WorkerPool(name: "snapshotd.protect", threads: 4)

    // Guarded by server.lock.
    var monitor: ClusterMonitor
    var protection: ProtectionMachine
    var paritySegments: [ParityKey: MappedSegment] = [:]
    /// Until the node has learned the cluster's committed steps it cannot say
    /// what it holds: "not committed" from a replacement would make a trainer
    /// start over, so it answers "unavailable" instead.
    var discovered = false
    var rebuild: RebuildPhase = .idle
    var stopping = false

    enum RebuildPhase: Equatable {
        case idle
        /// Ordered before discovery finished; starts when it does.
        case orderedBeforeDiscovery
        case running
    }

    init(server: SnapshotServer, cluster: ClusterConfiguration, selfID: NodeID, secret: [UInt8], keptStepsPerJob: Int, logger: Logger) throws {
        protection = try ProtectionMachine(selfID: selfID, configuration: cluster, keptStepsPerJob: keptStepsPerJob)
        self.server = server
        self.cluster = cluster
        self.selfID = selfID
        group = protection.group
        position = protection.position
        layout = protection.layout
        code = try ReedSolomon(dataFragmentCount: layout.dataFragmentCount, parityFragmentCount: layout.parityCount)
        mesh = PeerMesh(selfID: selfID, cluster: cluster, secret: secret, logger: logger)
        self.logger = logger
        monitor = ClusterMonitor(selfID: selfID, configuration: cluster, nowMilliseconds: monotonicMilliseconds())
    }

    var heartbeatTimeoutMilliseconds: Int64 { max(200, cluster.failureTimeoutMilliseconds / 2) }

    // MARK: Lifecycle

    func start() {
        Thread.detachNewThread { [self] in  // the node's one long-lived control thread
            discover()
            heartbeatLoop()
        }
    }

    func stop() {
        server.lock.withLock { stopping = true }
        mesh.closeAll()
        controlPool.stop()
        dataPool.stop()
    }

    /// Learns the cluster's steps from every peer that answers; a node that
    /// took part in a committed step it does not hold needs a rebuild (it
    /// replaced a lost node, or restarted on an empty arena).
    private func discover() {
        // Silence is not an answer: a replacement that concluded "nothing to
        // rebuild" from slow peers would serve an empty node. Only when every
        // peer refuses the connection (none is running: a fresh cluster) does
        // the node go on without the cluster's view.
        var learned = false
        var round = 0
        while !learned, !server.lock.withLock({ stopping }) {
            var everyPeerRefused = true
            for peer in mesh.peers {
                do {
                    guard case .clusterStateReply(let state) = try mesh.request(peer, .control, .clusterStateRequest, timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { continue }
                    execute(server.lock.withLock { protection.merge(state, store: server.store, nowMilliseconds: monotonicMilliseconds()) })
                    learned = true
                } catch let error as IOError where error.errnoCode == ECONNREFUSED {
                    continue
                } catch {
                    everyPeerRefused = false
                }
            }
            round += 1
            if learned || (everyPeerRefused && round * 100 >= Int(cluster.failureTimeoutMilliseconds)) { break }
            if round % 50 == 0 { logger.warning("still waiting for a peer to share the cluster's state") }
            usleep(100_000)
        }
        let (missing, ordered) = server.lock.withLock {
            discovered = true
            let missing = refreshRebuildNeed()
            server.lock.broadcast()
            return (missing, rebuild == .orderedBeforeDiscovery)
        }
        if missing > 0 {
            logger.warning("this node holds less than the cluster committed for it; waiting for the coordinator's rebuild order", metadata: ["steps": "\(missing)"])
            if ordered { beginRebuild() }
        } else {
            logger.info("cluster view established", metadata: ["peersAnswered": "\(learned)", "group": "\(group.index)", "position": "\(position)"])
        }
    }

    /// Asks `peers` for their view and merges it; with `firstAnswerSuffices`,
    /// stops at the first peer that answers.
    func pullState(from peers: [NodeID], firstAnswerSuffices: Bool = false) {
        for peer in peers {
            guard case .clusterStateReply(let state)? = try? mesh.request(peer, .control, .clusterStateRequest, timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { continue }
            execute(server.lock.withLock { protection.merge(state, store: server.store, nowMilliseconds: monotonicMilliseconds()) })
            if firstAnswerSuffices { return }
        }
    }

    /// With the lock held: tells the monitor whether this node needs a
    /// rebuild; returns how many steps it misses.
    @discardableResult
    func refreshRebuildNeed() -> Int {
        let missing = discovered ? protection.missingSteps(store: server.store).count : 0
        monitor.setSelfNeedsRebuild(missing > 0)
        return missing
    }

    // MARK: Heartbeats and coordination

    private func heartbeatLoop() {
        while !server.lock.withLock({ stopping }) {
            let started = monotonicMilliseconds()
            for peer in mesh.peers {
                let beat = server.lock.withLock { ownHeartbeat() }
                guard case .heartbeat(let reply)? = try? mesh.request(peer, .heartbeat, .heartbeat(beat), timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { continue }
                observe(reply)
            }
            let now = monotonicMilliseconds()
            let (monitorActions, protectionActions) = server.lock.withLock {
                (monitor.handle(.tick(nowMilliseconds: now)), protection.tick(nowMilliseconds: now, liveNodes: Set(monitor.liveNodes)))
            }
            perform(monitorActions)
            execute(protectionActions)
            let elapsed = monotonicMilliseconds() - started
            if elapsed < cluster.heartbeatIntervalMilliseconds { usleep(useconds_t((cluster.heartbeatIntervalMilliseconds - elapsed) * 1000)) }
        }
    }

    /// With the lock held.
    private func ownHeartbeat() -> Heartbeat {
        Heartbeat(nodeID: selfID, incarnation: incarnation, liveNodes: monitor.liveNodes, needsRebuild: !discovered || refreshRebuildNeed() > 0)
    }

    private func observe(_ beat: Heartbeat) {
        let actions = server.lock.withLock {
            monitor.handle(.heartbeat(from: beat.nodeID, incarnation: beat.incarnation, needsRebuild: beat.needsRebuild, nowMilliseconds: monotonicMilliseconds()))
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
                let report = server.lock.withLock { protection.recovery(lostNodes: lostNodes()) }
                logger.critical("group beyond tolerance: nodes lost exceed its parity", metadata: [
                    "group": "\(groupIndex)", "lost": "\(lost)", "tolerated": "\(tolerated)",
                    "report": "\(report.map { "\($0.job): \($0.summary)" }.joined(separator: " | "))",
                ])
            }
        }
    }

    /// With the lock held: nodes whose data is not available now.
    func lostNodes() -> Set<NodeID> {
        Set(monitor.deadNodes).union(monitor.needsRebuild)
    }

    // MARK: What trainers may do here (lock held)

    /// Why a trainer may not start saving `step` here, if it may not.
    func refusalOfSave(job: JobID, step: Step) -> StoreError? {
        if !discovered { return StoreError(.unavailable, "node \(selfID) is joining the cluster; retry shortly") }
        return protection.refusalOfSave(job: job, step: step)
    }

    /// The step a restore of `job` without a step number gets: the newest the
    /// cluster committed, so every rank of the job restores the same one.
    func latestCommitted(job: JobID) throws(StoreError) -> Step? {
        if !discovered { throw StoreError(.unavailable, "node \(selfID) is joining the cluster; retry shortly") }
        let local = server.store.latestCommitted(job: job)
        guard let cluster = protection.newestCommitted(job: job), cluster > local ?? 0 else { return local }
        if protection.lostReason(job: job, step: cluster) != nil { return cluster }  // a restore then says why
        if protection.missingSteps(store: server.store).contains(.init(job: job, step: cluster)) {
            throw StoreError(.unavailable, "node \(selfID) is being rebuilt from its peers (step \(cluster) of \(job)); retry shortly")
        }
        return local
    }

    /// Refuses a restore of `step` that this node cannot serve, saying why.
    func checkRestorable(job: JobID, step: Step) throws(StoreError) {
        if !discovered { throw StoreError(.unavailable, "node \(selfID) is joining the cluster; retry shortly") }
        if let reason = protection.lostReason(job: job, step: step) {
            let restorable = protection.recovery(lostNodes: []).first { $0.job == job }?.newestRestorable
            throw StoreError(.unrecoverable, "step \(step) of \(job) could not be rebuilt on node \(selfID) (\(reason)); "
                + (restorable.map { "newest fully restorable step is \($0)" } ?? "no step is fully restorable from memory"))
        }
        if protection.missingSteps(store: server.store).contains(.init(job: job, step: step)) {
            throw StoreError(.unavailable, "node \(selfID) is being rebuilt from its peers (step \(step) of \(job)); retry shortly")
        }
    }

    // MARK: Requests from peers and operators

    func handleHeartbeat(_ beat: Heartbeat) -> Message {
        observe(beat)
        return .heartbeat(server.lock.withLock { ownHeartbeat() })
    }

    func handleStepReady(_ ready: StepReady) -> Message {
        execute(server.lock.withLock { protection.received(ready, store: server.store, nowMilliseconds: monotonicMilliseconds()) })
        return .ok
    }

    func handleStepProtected(_ report: StepProtected) -> Message {
        execute(server.lock.withLock { protection.received(report, store: server.store) })
        return .ok
    }

    func handleClusterState() -> Message { .clusterStateReply(server.lock.withLock { protection.ledger.clusterState() }) }

    func handleRebuildOrder(_ order: RebuildOrder) -> Message {
        logger.notice("rebuild ordered", metadata: ["coordinator": "\(order.coordinator)"])
        if order.nodeID == selfID { beginRebuild() }
        return .ok
    }

    /// This node's view; it lists itself as rebuilding until it has joined and
    /// holds everything the cluster committed for it (peers may not have heard yet).
    func recoverReport() -> RecoverReply {
        server.lock.withLock {
            var rebuilding = monitor.needsRebuild
            if !discovered || refreshRebuildNeed() > 0 { rebuilding.insert(selfID) }
            return RecoverReply(
                coordinator: monitor.coordinator, deadNodes: monitor.deadNodes,
                rebuildingNodes: rebuilding.sorted(), jobs: protection.recovery(lostNodes: lostNodes().union(rebuilding)))
        }
    }

    // MARK: Carrying out the protection machine's actions

    /// Runs `actions` (call without the lock): network work on the pools,
    /// store changes under the lock, whose own follow-up actions run next.
    func execute(_ actions: [ProtectionMachine.Action]) {
        var pending = actions[...]
        while let action = pending.popFirst() {
            switch action {
            case .broadcast(let message):
                controlPool.submit { [self] in send(message, to: mesh.peers) }
            case .send(let message, let peers):
                controlPool.submit { [self] in send(message, to: peers) }
            case .pullState(let peers):
                controlPool.submit { [self] in pullState(from: peers) }
            case .holdParity(let job, let step, let size):
                pending += holdParity(job: job, step: step, fragmentSizeBytes: size)
            case .sendFragments(let job, let step, let size):
                dataPool.submit { [self] in protect(job: job, step: step, fragmentSizeBytes: size) }
            case .commit(let job, let step, let world):
                server.lock.withLock { commit(job: job, step: step, world: world) }
            case .discardShare(let job, let step, let reason):
                logger.error("dropping this node's share of a step", metadata: ["job": "\(job)", "step": "\(step)", "reason": "\(reason)"])
                server.lock.withLock {
                    server.apply(server.store.dropUncommittedStep(job: job, step: step))
                    server.lock.broadcast()
                }
            case .log(let level, let message, let job, let step):
                let metadata: Logger.Metadata = ["job": "\(job)", "step": "\(step)"]
                switch level {
                case .info: logger.info("\(message)", metadata: metadata)
                case .warning: logger.warning("\(message)", metadata: metadata)
                case .error: logger.error("\(message)", metadata: metadata)
                }
            }
        }
    }

    /// With the lock held: the machine found the step held and committed cluster-wide.
    private func commit(job: JobID, step: Step, world: UInt32) {
        server.apply(server.store.markCommitted(job: job, step: step, world: world))
        if let oldest = server.store.jobs[job]?.committedSteps.first { protection.forget(job: job, olderThan: oldest) }
        refreshRebuildNeed()
        server.lock.broadcast()
    }

    /// Called by the server (lock held) when this node's share of a step is sealed.
    func shareSealed(job: JobID, step: Step) {
        guard !stopping, let world = server.store.jobs[job]?.world else { return }
        let shards = server.store.localShards(job: job, step: step)
        let manifests = shards.map { ManifestFile(key: ShardKey(job: job, step: step, rank: $0.rank), world: world, shard: $0.shard).encoded() }
        let dataBytes = shards.reduce(UInt64(0)) { $0 + $1.shard.segmentSizeBytes }
        let ready = StepReady(job: job, step: step, nodeID: selfID, world: world, dataSizeBytes: dataBytes, manifests: manifests)
        let actions = protection.shareSealed(ready, store: server.store, nowMilliseconds: monotonicMilliseconds())
        controlPool.submit { [self] in execute(actions) }
    }

    /// Streams this node's share to its parity holders; reports the outcome to the machine.
    private func protect(job: JobID, step: Step, fragmentSizeBytes size: UInt64) {
        let started = monotonicMilliseconds()
        let data: NodeStepData? = server.lock.withLock {
            let shards = server.store.localShards(job: job, step: step)
            let segments = shards.compactMap { server.segments[ShardKey(job: job, step: step, rank: $0.rank)] }
            return segments.count == shards.count && !shards.isEmpty ? NodeStepData(segments: segments) : nil
        }
        guard let data else {
            execute(server.lock.withLock { protection.protectionFailed(job: job, step: step, reason: "the step's shards are no longer held here") })
            return
        }
        do {
            try sendFragments(job: job, step: step, data: data, fragmentSizeBytes: size)
        } catch {
            execute(server.lock.withLock { protection.protectionFailed(job: job, step: step, reason: "\(error)") })
            return
        }
        execute(server.lock.withLock { protection.fragmentsAcknowledged(job: job, step: step, store: server.store) })
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
                    try data.write(offset: offset, count: fragmentSize, to: connection.socket)
                    let reply = try PeerMesh.reply(connection)
                    guard case .fragmentAck = reply else {
                        throw PeerError(code: nil, message: "holder \(holder) did not acknowledge fragment \(id): \(reply.type)")
                    }
                }
            }
        }
    }

    /// A few attempts (a connection may have gone stale); a holder that stays
    /// unreachable, or refuses, fails the protection and the step does not commit.
    private func sendWithRetry(to node: NodeID, _ body: (FramedConnection) throws -> Void) throws {
        var lastError: (any Error)?
        for attempt in 0..<3 {
            if attempt > 0 { usleep(200_000) }
            do {
                return try mesh.withConnection(node, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds, body)
            } catch let error as PeerError where error.code != nil {
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
    private func send(_ message: Message, to peers: [NodeID]) {
        for peer in peers {
            do {
                _ = try mesh.request(peer, .control, message, timeoutMilliseconds: heartbeatTimeoutMilliseconds)
            } catch {
                logger.debug("peer did not take a report", metadata: ["peer": "\(peer)", "type": "\(message.type)", "error": "\(error)"])
            }
        }
    }

    // MARK: Parity (holder side)

    /// Creates this node's parity buffers of the step (zeroed) and seals the
    /// complete ones (a stripe whose sources are all padding completes with
    /// no fragment arriving). Returns the machine's follow-up actions.
    private func holdParity(job: JobID, step: Step, fragmentSizeBytes size: UInt64) -> [ProtectionMachine.Action] {
        let complete: [ParityKey]
        do {
            complete = try server.lock.withLock { () throws -> [ParityKey] in
                guard !server.store.isCommitted(job: job, step: step) else { return [] }
                var complete: [ParityKey] = []
                for (stripe, row) in try layout.parityStripes(node: position) {
                    let key = ParityKey(job: job, step: step, stripe: stripe)
                    let (record, _) = try ensureParity(key, row: row, fragmentSizeBytes: size)
                    if !record.isComplete, protection.isParityComplete(job: job, step: step, stripe: stripe, record: record) { complete.append(key) }
                }
                return complete
            }
        } catch {
            logger.error("cannot hold parity for the step", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
            return [.log(.error, "this node cannot hold its parity of the step; it cannot commit here", job: job, step: step)]
        }
        return complete.flatMap(seal)
    }

    /// Computes a complete parity fragment's CRC (outside the lock: its bytes
    /// no longer change) and records it.
    private func seal(_ key: ParityKey) -> [ProtectionMachine.Action] {
        guard let (segment, size) = server.lock.withLock({ () -> (MappedSegment, Int)? in
            guard let record = server.store.parity(key), !record.isComplete, let segment = paritySegments[key] else { return nil }
            return (segment, Int(record.fragmentSizeBytes))
        }) else { return [] }
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: 0, count: size)))
        return server.lock.withLock {
            server.store.updateParity(key) { $0.crc32c = crc }
            return protection.paritySealed(job: key.job, step: key.step, store: server.store)
        }
    }

    /// With the lock held: the parity buffer for `key`, created zeroed on first use.
    private func ensureParity(_ key: ParityKey, row: Int, fragmentSizeBytes: UInt64) throws -> (ParityRecord, MappedSegment) {
        if let record = server.store.parity(key), let segment = paritySegments[key] {
            guard record.fragmentSizeBytes == fragmentSizeBytes else {
                throw StoreError(.invalidRequest, "\(key) uses \(record.fragmentSizeBytes)-byte fragments, got \(fragmentSizeBytes)")
            }
            return (record, segment)
        }
        let world = protection.ledger.entry(job: key.job, step: key.step)?.world ?? server.store.jobs[key.job]?.world ?? 1
        let record = try server.store.reserveParity(key, row: row, fragmentSizeBytes: fragmentSizeBytes, world: world)
        do {
            let segment = try server.arena.createParitySegment(key, sizeBytes: record.segmentSizeBytes)
            paritySegments[key] = segment
            return (record, segment)
        } catch {
            server.apply(server.store.releaseParity(key))
            throw StoreError(.overBudget, "cannot allocate parity for \(key): \(error)")
        }
    }

    /// A data fragment arrives at its parity holder: straight into a scratch
    /// buffer, checked against its CRC, folded into the parity (unless the
    /// machine refuses it or has it already), acknowledged.
    func handleFragmentPut(_ put: FragmentPut, header: FrameHeader, connection: FramedConnection, scratch: inout MappedSegment?) throws -> Message {
        let id = put.fragment
        let stripe = Int(id.stripe)
        let slot = Int(id.index)
        guard stripe < layout.stripeCount, slot < layout.dataFragmentCount, header.bulkLength == put.fragmentSizeBytes,
            put.fragmentSizeBytes > 0, put.fragmentSizeBytes <= UInt64(ReedSolomon.maximumFragmentSizeBytes),
            case .parity(let row) = try layout.role(node: position, stripe: stripe),
            try layout.dataSource(stripe: stripe, slot: slot) == group.position(of: put.sourceNode)
        else {
            throw SessionEnd(reason: "fragment \(id) from node \(put.sourceNode) does not belong on this node")
        }
        let key = ParityKey(job: id.job, step: id.step, stripe: stripe)
        let admitted: Result<MappedSegment?, StoreError> = server.lock.withLock {
            switch protection.admit(put, record: server.store.parity(key), store: server.store) {
            case .refuse(let error): return .failure(error)
            case .duplicate: return .success(nil)
            case .fold:
                do {
                    return .success(try ensureParity(key, row: row, fragmentSizeBytes: put.fragmentSizeBytes).1)
                } catch let error as StoreError {
                    return .failure(error)
                } catch {
                    return .failure(StoreError(.internalError, "\(error)"))
                }
            }
        }
        guard case .success(let segment) = admitted else {
            // Refused before its bytes were read: drain them so the stream stays framed.
            try connection.socket.discard(count: header.bulkLength, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
            if case .failure(let error) = admitted {
                logger.error("fragment refused", metadata: ["fragment": "\(id)", "source": "\(put.sourceNode)", "reason": "\(error.message)"])
                throw error
            }
            return .error(ErrorReply(code: .internalError, message: "unreachable"))
        }
        let size = Int(put.fragmentSizeBytes)
        if scratch == nil || scratch!.sizeBytes < size { scratch = try MappedSegment.anonymous(sizeBytes: size) }
        let buffer = scratch!.bytes(offset: 0, count: size)
        try connection.socket.readExact(into: buffer.baseAddress!, count: size, deadlineMilliseconds: connection.bulkDeadline(UInt64(size)))
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(buffer))
        guard crc == put.crc32c else {
            logger.error("fragment arrived corrupted", metadata: ["fragment": "\(id)", "source": "\(put.sourceNode)"])
            throw StoreError(.checksumMismatch, "fragment \(key) slot \(slot) failed its CRC check")
        }
        if let segment {
            try fold(put, key: key, row: row, from: buffer.baseAddress!, into: segment)
        }
        return .fragmentAck(FragmentAck(fragment: id, holderNode: selfID))
    }

    /// Folds a checked fragment into its parity, once; seals the parity when
    /// it was the last slot, before the fragment is acknowledged (so a step
    /// every source reports protected has all its parity sealed).
    private func fold(_ put: FragmentPut, key: ParityKey, row: Int, from buffer: UnsafeMutableRawPointer, into segment: MappedSegment) throws {
        let slot = Int(put.fragment.index)
        let actions: [ProtectionMachine.Action] = try accumulateLock.withLock {
            // Admission again: another session may have folded this slot meanwhile.
            let admission = server.lock.withLock { protection.admit(put, record: server.store.parity(key), store: server.store) }
            switch admission {
            case .refuse(let error): throw error
            case .duplicate: return []
            case .fold: break
            }
            try [segment.base!].withUnsafeBufferPointer {
                try code.accumulate(dataIndex: slot, data: buffer, intoParityRowsFrom: row, parity: $0, fragmentSizeBytes: Int(put.fragmentSizeBytes))
            }
            let complete = server.lock.withLock { () -> Bool in
                server.store.updateParity(key) { $0.foldedSlots[slot] = put.crc32c }
                guard let record = server.store.parity(key) else { return false }
                return protection.isParityComplete(job: key.job, step: key.step, stripe: key.stripe, record: record)
            }
            return complete ? seal(key) : []
        }
        execute(actions)
    }

    // MARK: Serving fragments for a rebuild

    /// Sends a data fragment of this node, or a parity fragment it holds, whole.
    func serveFragment(_ request: FragmentGet, requestID: UInt64, connection: FramedConnection) throws {
        let local = try localFragment(request.fragment)
        let crc = local.storedCRC32C ?? local.checksum()
        try connection.send(.fragmentData(FragmentData(fragment: request.fragment, fragmentSizeBytes: UInt64(local.sizeBytes), crc32c: crc)), requestID: requestID, bulkLength: UInt64(local.sizeBytes))
        try local.bytes.write(offset: local.offsetBytes, count: local.sizeBytes, to: connection.socket)
    }

    /// Fragment `id` as this node holds it: a range of its step data (zero
    /// padded), or a complete parity fragment with the CRC it was stored with.
    func localFragment(_ id: FragmentID) throws -> LocalFragment {
        let stripe = Int(id.stripe)
        let index = Int(id.index)
        let k = layout.dataFragmentCount
        guard stripe < layout.stripeCount, index < layout.groupSize else {
            throw StoreError(.invalidRequest, "fragment \(index) of stripe \(stripe) is outside the layout")
        }
        if index < k {
            guard try layout.dataSource(stripe: stripe, slot: index) == position,
                case .data(_, let fragment) = try layout.role(node: position, stripe: stripe)
            else { throw StoreError(.invalidRequest, "data slot \(index) of stripe \(stripe) is not on node \(selfID)") }
            let held: (LocalFragment, [(ShardRecord, MappedSegment)])? = server.lock.withLock {
                guard discovered, server.store.isCommitted(job: id.job, step: id.step),
                    let size = protection.ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group)
                else { return nil }
                let shards = server.store.localShards(job: id.job, step: id.step)
                let segments = shards.compactMap { server.segments[ShardKey(job: id.job, step: id.step, rank: $0.rank)] }
                guard segments.count == shards.count else { return nil }
                let fragment = LocalFragment(bytes: NodeStepData(segments: segments), offsetBytes: fragment * Int(size), sizeBytes: Int(size), storedCRC32C: nil)
                return (fragment, Array(zip(shards.map(\.shard), segments)))
            }
            guard let (found, shards) = held else { throw StoreError(.unavailable, "node \(selfID) does not hold step \(id.step) of \(id.job)") }
            let corrupted = corruptedTensors(of: shards, overlapping: found.offsetBytes..<found.offsetBytes + found.sizeBytes)
            guard corrupted.isEmpty else {
                logger.error("refusing to serve a data fragment: tensors fail their sealed CRCs", metadata: ["fragment": "\(id)", "tensors": "\(corrupted)"])
                throw StoreError(.checksumMismatch, "node \(selfID): data fragment \(id) covers tensor(s) \(corrupted) that fail their sealed CRCs")
            }
            return found
        }
        let key = ParityKey(job: id.job, step: id.step, stripe: stripe)
        let found: LocalFragment? = server.lock.withLock {
            guard discovered, let record = server.store.parity(key), record.isComplete, record.row == index - k,
                let segment = paritySegments[key]
            else { return nil }
            return LocalFragment(bytes: NodeStepData(segments: [segment]), offsetBytes: 0, sizeBytes: Int(record.fragmentSizeBytes), storedCRC32C: record.crc32c)
        }
        guard let found else { throw StoreError(.unavailable, "node \(selfID) holds no complete parity for \(key)") }
        return found
    }
}

/// A fragment in place: `sizeBytes` of `bytes` from `offsetBytes`. Parity
/// carries the CRC computed when it was completed; data fragments are
/// checksummed as they are read (their tensors' own CRCs are checked after
/// any rebuild).
struct LocalFragment {
    let bytes: NodeStepData
    let offsetBytes: Int
    let sizeBytes: Int
    let storedCRC32C: UInt32?

    func checksum() -> UInt32 { bytes.checksum(offset: offsetBytes, count: sizeBytes) }
}
