import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol

/// This daemon's part in the cluster: failure detection and coordination
/// (through the pure ``ClusterMonitor``), protection of its steps across its
/// group (through the pure ``ClusterLedger``), serving fragments, and rebuilding
/// itself when it replaces a lost node. State is guarded by the server's lock;
/// network work happens on background threads outside it.
final class ClusterNode: @unchecked Sendable {
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
    /// Serializes accumulation into parity buffers (two sources of one stripe may arrive at once).
    let accumulateLock = NSLock()
    /// How long a protection waits for the group's readiness reports.
    let protectionTimeoutMilliseconds: Int64 = 120_000

    // Guarded by server.lock.
    var monitor: ClusterMonitor
    var ledger: ClusterLedger
    var paritySegments: [ParityKey: MappedSegment] = [:]
    var needsRebuild = false
    /// Until the node has learned the cluster's committed steps it cannot say
    /// what it holds: "not committed" from a replacement would make a trainer
    /// start over, so it answers "unavailable" instead.
    var discovered = false
    /// A rebuild order that arrived before discovery finished; acted on after it.
    var rebuildOrderPending = false
    var rebuilding = false
    var stopping = false

    init(server: SnapshotServer, cluster: ClusterConfiguration, selfID: NodeID, secret: [UInt8], logger: Logger) throws {
        guard let group = cluster.group(of: selfID), let position = group.position(of: selfID) else {
            throw ConfigurationError("node \(selfID) is not in the cluster file")
        }
        self.server = server
        self.cluster = cluster
        self.selfID = selfID
        self.group = group
        self.position = position
        layout = group.layout
        code = try ReedSolomon(dataFragmentCount: layout.dataFragmentCount, parityFragmentCount: layout.parityCount)
        mesh = PeerMesh(selfID: selfID, cluster: cluster, secret: secret, logger: logger)
        self.logger = logger
        monitor = ClusterMonitor(selfID: selfID, configuration: cluster, nowMilliseconds: monotonicMilliseconds())
        ledger = ClusterLedger(configuration: cluster)
    }

    var heartbeatTimeoutMilliseconds: Int64 { max(200, cluster.failureTimeoutMilliseconds / 2) }

    // MARK: Lifecycle

    func start() {
        Thread.detachNewThread { [self] in
            discover()
            heartbeatLoop()
        }
    }

    func stop() {
        server.lock.withLock { stopping = true }
        mesh.closeAll()
    }

    /// Learns the cluster's steps from a live peer; a node that took part in a
    /// committed step it does not hold needs a rebuild (it replaced a lost node,
    /// or restarted on an empty arena).
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
                    server.lock.withLock { merge(state) }
                    learned = true
                    break
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
        server.lock.withLock {
            needsRebuild = !missingSteps().isEmpty
            monitor.setSelfNeedsRebuild(needsRebuild)
            discovered = true
            server.lock.broadcast()
        }
        if needsRebuild {
            logger.warning("this node holds less than the cluster committed for it; waiting for the coordinator's rebuild order", metadata: ["steps": "\(server.lock.withLock { missingSteps().count })"])
            if server.lock.withLock({ rebuildOrderPending }) { beginRebuild() }
        } else {
            logger.info("cluster view established", metadata: ["peersAnswered": "\(learned)", "group": "\(group.index)", "position": "\(position)"])
        }
    }

    /// With the lock held: merges a peer's view of the cluster's steps (its
    /// reports fill in any broadcast this node missed).
    func merge(_ state: ClusterStateReply) {
        for step in state.steps {
            for ready in step.ready where ledger.entry(job: step.job, step: step.step)?.ready[ready.nodeID] == nil {
                ledger.recordReady(ready, ranks: Self.ranks(of: ready))
            }
            for node in step.protectedNodes { ledger.recordProtected(job: step.job, step: step.step, node: node) }
            if step.committed {
                ledger.markCommitted(job: step.job, step: step.step)
                commitLocallyIfHeld(job: step.job, step: step.step)
            }
            afterLedgerChange(job: step.job, step: step.step)
        }
    }

    /// With the lock held: the cluster committed a step; if this node holds its
    /// whole share sealed (it missed the last report), commit it here too. A
    /// node lacking its shards must not: it needs a rebuild instead.
    private func commitLocallyIfHeld(job: JobID, step: Step) {
        guard !server.store.isCommitted(job: job, step: step), let record = server.store.jobs[job], record.localWorld > 0,
            let shards = record.steps[step], shards.count == Int(record.localWorld),
            shards.values.allSatisfy({ $0.state == .localComplete || $0.state == .protected })
        else { return }
        server.apply(server.store.markCommitted(job: job, step: step, world: record.world))
    }

    /// Asks `peers` for their view and merges it; with `firstAnswerSuffices`,
    /// stops at the first peer that answers.
    func pullState(from peers: [NodeID], firstAnswerSuffices: Bool = false) {
        for peer in peers {
            guard case .clusterStateReply(let state)? = try? mesh.request(peer, .control, .clusterStateRequest, timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { continue }
            server.lock.withLock { merge(state) }
            if firstAnswerSuffices { return }
        }
    }

    /// With the lock held: committed steps this node took part in but does not hold.
    private func missingSteps() -> [ClusterLedger.StepID] {
        ledger.steps.filter { id, entry in
            entry.committed && entry.ready[selfID] != nil && !server.store.isCommitted(job: id.job, step: id.step)
        }.map(\.key).sorted()
    }

    static func ranks(of ready: StepReady) -> [Rank] {
        ready.manifests.compactMap { try? ManifestFile(decoding: $0).key.rank }
    }

    // MARK: Heartbeats and coordination

    private func heartbeatLoop() {
        var round = 0
        while !server.lock.withLock({ stopping }) {
            let started = monotonicMilliseconds()
            round += 1
            if round % 10 == 0 { catchUp() }
            for peer in mesh.peers {
                let beat = server.lock.withLock { ownHeartbeat() }
                guard case .heartbeat(let reply)? = try? mesh.request(peer, .heartbeat, .heartbeat(beat), timeoutMilliseconds: heartbeatTimeoutMilliseconds) else { continue }
                observe(reply)
            }
            let actions = server.lock.withLock { monitor.handle(.tick(nowMilliseconds: monotonicMilliseconds())) }
            perform(actions)
            let elapsed = monotonicMilliseconds() - started
            if elapsed < cluster.heartbeatIntervalMilliseconds { usleep(useconds_t((cluster.heartbeatIntervalMilliseconds - elapsed) * 1000)) }
        }
    }

    /// Anti-entropy: for steps this node protected but has not seen commit,
    /// pull the reports of the live nodes it has not heard from.
    private func catchUp() {
        let missing: [NodeID] = server.lock.withLock {
            var peers = Set<NodeID>()
            let live = Set(monitor.liveNodes)
            for (_, entry) in ledger.steps where !entry.committed && entry.protectedNodes.contains(selfID) {
                peers.formUnion(cluster.nodeIDs.filter { $0 != selfID && live.contains($0) && !entry.protectedNodes.contains($0) })
            }
            return peers.sorted()
        }
        pullState(from: missing)
    }

    /// With the lock held.
    private func ownHeartbeat() -> Heartbeat {
        Heartbeat(nodeID: selfID, incarnation: incarnation, liveNodes: monitor.liveNodes, needsRebuild: needsRebuild || !discovered)
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
                    Thread.detachNewThread { [self] in
                        _ = try? mesh.request(node, .control, .rebuildOrder(order), timeoutMilliseconds: heartbeatTimeoutMilliseconds)
                    }
                }
            case .beyondTolerance(let groupIndex, let lost, let tolerated):
                let report = server.lock.withLock { ledger.recovery(lostNodes: lostNodes()) }
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

    /// With the lock held: why this node cannot answer for its snapshots now, if it cannot.
    var unavailableReason: String? {
        if !discovered { return "node \(selfID) is joining the cluster; retry shortly" }
        if needsRebuild { return "node \(selfID) is being rebuilt from its peers; retry shortly" }
        return nil
    }

    // MARK: Requests from peers and operators

    func handleHeartbeat(_ beat: Heartbeat) -> Message {
        observe(beat)
        return .heartbeat(server.lock.withLock { ownHeartbeat() })
    }

    func handleStepReady(_ ready: StepReady) -> Message {
        let mustReport = server.lock.withLock { () -> Bool in
            ledger.recordReady(ready, ranks: Self.ranks(of: ready))
            afterLedgerChange(job: ready.job, step: ready.step)
            // A node with no ranks of this job still takes part: report an empty share.
            let known = ledger.entry(job: ready.job, step: ready.step)?.ready[selfID] != nil
            return !known && (server.store.jobs[ready.job]?.localWorld ?? 0) == 0
        }
        if mustReport {
            let empty = StepReady(job: ready.job, step: ready.step, nodeID: selfID, world: ready.world, dataSizeBytes: 0, manifests: [])
            server.lock.withLock {
                ledger.recordReady(empty, ranks: [])
                afterLedgerChange(job: ready.job, step: ready.step)
            }
            Thread.detachNewThread { [self] in
                broadcast(.stepReady(empty))
                runHolderDuties(job: ready.job, step: ready.step)
            }
        }
        return .ok
    }

    func handleStepProtected(_ report: StepProtected) -> Message {
        server.lock.withLock {
            ledger.recordProtected(job: report.job, step: report.step, node: report.nodeID)
            afterLedgerChange(job: report.job, step: report.step)
        }
        return .ok
    }

    func handleClusterState() -> Message { .clusterStateReply(server.lock.withLock { ledger.clusterState() }) }

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
            if unavailableReason != nil { rebuilding.insert(selfID) }
            return RecoverReply(
                coordinator: monitor.coordinator, deadNodes: monitor.deadNodes,
                rebuildingNodes: rebuilding.sorted(), jobs: ledger.recovery(lostNodes: lostNodes().union(rebuilding)))
        }
    }

    // MARK: Commit

    /// With the lock held: the ledger changed for a step; finish parity that
    /// is now complete and commit the step if the whole cluster has protected it.
    func afterLedgerChange(job: JobID, step: Step) {
        server.lock.broadcast()  // protections may be waiting for the group's reports
        completeParity(job: job, step: step)
        guard ledger.commitIfComplete(job: job, step: step), let entry = ledger.entry(job: job, step: step) else { return }
        server.apply(server.store.markCommitted(job: job, step: step, world: entry.world))
        // Forget ledger entries below the oldest step still kept.
        if let oldest = server.store.jobs[job]?.committedSteps.first {
            for id in ledger.steps.keys where id.job == job && id.step < oldest { ledger.forget(job: id.job, step: id.step) }
        }
        server.lock.broadcast()
    }

    // MARK: Protection (source side)

    /// Called by the server (lock held) when this node's share of a step is sealed.
    func protect(job: JobID, step: Step) {
        guard !stopping else { return }
        Thread.detachNewThread { [self] in runProtection(job: job, step: step) }
    }

    private func runProtection(job: JobID, step: Step) {
        let started = monotonicMilliseconds()
        let prepared: (StepReady, NodeStepData)? = server.lock.withLock {
            let shards = server.store.localShards(job: job, step: step)
            guard let world = server.store.jobs[job]?.world, !shards.isEmpty else { return nil }
            let segments = shards.compactMap { server.segments[ShardKey(job: job, step: step, rank: $0.rank)] }
            guard segments.count == shards.count else { return nil }
            let manifests = shards.map { ManifestFile(key: ShardKey(job: job, step: step, rank: $0.rank), world: world, shard: $0.shard).encoded() }
            let data = NodeStepData(segments: segments)
            let ready = StepReady(job: job, step: step, nodeID: selfID, world: world, dataSizeBytes: UInt64(data.totalBytes), manifests: manifests)
            ledger.recordReady(ready, ranks: shards.map(\.rank))
            afterLedgerChange(job: job, step: step)
            return (ready, data)
        }
        guard let (ready, data) = prepared else { return }
        broadcast(.stepReady(ready))
        guard let fragmentSize = runHolderDuties(job: job, step: step) else { return }
        do {
            try sendFragments(job: job, step: step, data: data, fragmentSizeBytes: fragmentSize)
        } catch {
            logger.error("protection failed; the step cannot commit until it is saved again", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
            return
        }
        server.lock.withLock {
            ledger.recordProtected(job: job, step: step, node: selfID)
            afterLedgerChange(job: job, step: step)
        }
        broadcast(.stepProtected(StepProtected(job: job, step: step, nodeID: selfID)))
        let milliseconds = max(1, monotonicMilliseconds() - started)
        logger.info("step protected on this node", metadata: [
            "job": "\(job)", "step": "\(step)", "dataBytes": "\(data.totalBytes)", "fragmentBytes": "\(fragmentSize)",
            "milliseconds": "\(milliseconds)",
        ])
    }

    /// Waits for the group's readiness reports, then makes sure this node's
    /// parity buffers for the step exist (a stripe whose sources are all empty
    /// completes with no fragment arriving). Returns the fragment size.
    @discardableResult
    private func runHolderDuties(job: JobID, step: Step) -> UInt64? {
        let deadline = Date().addingTimeInterval(Double(protectionTimeoutMilliseconds) / 1000)
        var size: UInt64?
        while Date() < deadline, size == nil {
            // Wait a while for the reports; then pull them from the members that
            // have not reported (a broadcast may have been lost with a restarted peer).
            let missing: [NodeID] = server.lock.withLock {
                let slice = min(deadline, Date().addingTimeInterval(1))
                while !stopping, ledger.fragmentSizeBytes(job: job, step: step, group: group) == nil, server.lock.wait(until: slice) {}
                size = ledger.fragmentSizeBytes(job: job, step: step, group: group)
                let reported = ledger.entry(job: job, step: step)?.ready ?? [:]
                return stopping ? [] : group.nodes.filter { $0 != selfID && reported[$0] == nil }
            }
            if size == nil { pullState(from: missing) }
            if server.lock.withLock({ stopping }) { return nil }
        }
        guard let size else {
            logger.warning("protection gave up: not every member of the group reported the step", metadata: ["job": "\(job)", "step": "\(step)"])
            return nil
        }
        do {
            try server.lock.withLock {
                for (stripe, row) in try layout.parityStripes(node: position) {
                    _ = try ensureParity(ParityKey(job: job, step: step, stripe: stripe), row: row, fragmentSizeBytes: size)
                }
                completeParity(job: job, step: step)
            }
        } catch {
            logger.error("cannot hold parity for the step", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
        }
        return size
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
                    guard case .fragmentAck = try PeerMesh.reply(connection) else {
                        throw PeerError(code: nil, message: "holder \(holder) did not acknowledge")
                    }
                }
            }
        }
    }

    /// A few attempts (a connection may have gone stale); a holder that stays
    /// unreachable fails the protection, and the step does not commit.
    private func sendWithRetry(to node: NodeID, _ body: (FramedConnection) throws -> Void) throws {
        var lastError: (any Error)?
        for attempt in 0..<3 {
            if attempt > 0 { usleep(200_000) }
            do {
                return try mesh.withConnection(node, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds, body)
            } catch {
                lastError = error
            }
        }
        throw lastError!
    }

    /// Sends a report to every peer (the mesh retries a stale connection once).
    /// A peer that still misses it pulls it later (``runHolderDuties``, ``catchUp``).
    private func broadcast(_ message: Message) {
        for peer in mesh.peers {
            do {
                _ = try mesh.request(peer, .control, message, timeoutMilliseconds: heartbeatTimeoutMilliseconds)
            } catch {
                logger.debug("peer did not take a report", metadata: ["peer": "\(peer)", "type": "\(message.type)", "error": "\(error)"])
            }
        }
    }

    // MARK: Parity (holder side)

    /// With the lock held: the parity buffer for `key`, created zeroed on first use.
    private func ensureParity(_ key: ParityKey, row: Int, fragmentSizeBytes: UInt64) throws -> (ParityRecord, MappedSegment) {
        if let record = server.store.parity(key), let segment = paritySegments[key] {
            guard record.fragmentSizeBytes == fragmentSizeBytes else {
                throw StoreError(.invalidRequest, "\(key) uses \(record.fragmentSizeBytes)-byte fragments, got \(fragmentSizeBytes)")
            }
            return (record, segment)
        }
        let world = ledger.entry(job: key.job, step: key.step)?.world ?? server.store.jobs[key.job]?.world ?? 1
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

    /// With the lock held: seals every parity buffer of the step that has
    /// received all the data slots that carry bytes.
    private func completeParity(job: JobID, step: Step) {
        for (stripe, record) in server.store.jobs[job]?.parity[step] ?? [:] where !record.isComplete {
            let key = ParityKey(job: job, step: step, stripe: stripe)
            guard let expected = ledger.nonZeroSlots(job: job, step: step, group: group, stripe: stripe, fragmentSizeBytes: record.fragmentSizeBytes),
                record.receivedSlots.isSuperset(of: expected), let segment = paritySegments[key]
            else { continue }
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: 0, count: Int(record.fragmentSizeBytes))))
            server.store.updateParity(key) { $0.crc32c = crc }
        }
    }

    /// A data fragment arrives at its parity holder: straight into a scratch
    /// buffer, checked against its CRC, folded into the parity, acknowledged.
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
        let (_, segment, duplicate): (ParityRecord, MappedSegment, Bool)
        do {
            (_, segment, duplicate) = try server.lock.withLock { () throws -> (ParityRecord, MappedSegment, Bool) in
                let (record, segment) = try ensureParity(key, row: row, fragmentSizeBytes: put.fragmentSizeBytes)
                return (record, segment, record.receivedSlots.contains(slot))
            }
        } catch {
            // Refused before its bytes were read: drain them so the stream stays framed.
            try connection.socket.discard(count: header.bulkLength, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
            throw error
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
        if !duplicate {
            // Accumulating the same slot twice would corrupt the parity: duplicates are acknowledged only.
            try accumulateLock.withLock {
                let already = server.lock.withLock { server.store.parity(key)?.receivedSlots.contains(slot) ?? true }
                guard !already else { return }
                try [segment.base!].withUnsafeBufferPointer {
                    try code.accumulate(dataIndex: slot, data: buffer.baseAddress!, intoParityRowsFrom: row, parity: $0, fragmentSizeBytes: size)
                }
                server.lock.withLock {
                    server.store.updateParity(key) { _ = $0.receivedSlots.insert(slot) }
                    completeParity(job: id.job, step: id.step)
                }
            }
        }
        return .fragmentAck(FragmentAck(fragment: id, holderNode: selfID))
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
            let found: LocalFragment? = server.lock.withLock {
                guard unavailableReason == nil, server.store.isCommitted(job: id.job, step: id.step),
                    let size = ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group)
                else { return nil }
                let shards = server.store.localShards(job: id.job, step: id.step)
                let segments = shards.compactMap { server.segments[ShardKey(job: id.job, step: id.step, rank: $0.rank)] }
                guard segments.count == shards.count else { return nil }
                return LocalFragment(bytes: NodeStepData(segments: segments), offsetBytes: fragment * Int(size), sizeBytes: Int(size), storedCRC32C: nil)
            }
            guard let found else { throw StoreError(.unavailable, "node \(selfID) does not hold step \(id.step) of \(id.job)") }
            return found
        }
        let key = ParityKey(job: id.job, step: id.step, stripe: stripe)
        let found: LocalFragment? = server.lock.withLock {
            guard unavailableReason == nil, let record = server.store.parity(key), record.isComplete, record.row == index - k,
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
