import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol

/// One client connection, served on its own thread. Handles the handshake
/// (TCP: HMAC challenge first, before anything else is read), then requests.
/// Every bad input gets an error reply and a log line; the session closes only
/// when the stream can no longer be trusted to be at a frame boundary.
final class Session {
    let server: SnapshotServer
    let id: SessionID
    let connection: FramedConnection
    let isTCP: Bool
    var logger: Logger

    /// Set by hello.
    var role: PeerRole?
    var job: JobID?
    var rank: Rank = 0
    var world: UInt32 = 0
    var topology = Topology()
    /// Restores this session has mapped and not yet released.
    var pins: [ShardKey: Int] = [:]
    /// Peer sessions: where incoming fragments land before they fold into parity.
    var scratch: MappedSegment?
    var peerNode: NodeID?

    /// Bulk bytes of a refused put are read and dropped up to this size to keep
    /// the session; a larger refused put closes it instead.
    static let maximumDiscardBytes: UInt64 = 64 << 20

    init(server: SnapshotServer, id: SessionID, connection: FramedConnection, isTCP: Bool) {
        self.server = server
        self.id = id
        self.connection = connection
        self.isTCP = isTCP
        logger = server.logger
        logger[metadataKey: "session"] = "\(id)"
        logger[metadataKey: "transport"] = "\(isTCP ? "tcp" : "unix")"
    }

    func serve() {
        defer { releasePins() }
        if isTCP {
            guard authenticate() else { return }
        }
        while true {
            let header: FrameHeader
            let message: Message
            do {
                (header, message) = try connection.receive()
            } catch {
                switch error {
                case .io(let error):
                    logger.debug("session closed", metadata: ["reason": "\(error)"])
                    return
                case .malformed(let error, let framingIntact, let requestID):
                    logger.warning("malformed frame", metadata: ["error": "\(error)", "closing": "\(!framingIntact)"])
                    reply(.error(ErrorReply(code: .malformedFrame, message: error.description)), to: requestID)
                    if framingIntact { continue } else { return }
                }
            }
            do {
                try handle(message, header: header)
            } catch let error as StoreError {
                logger.notice("request refused", metadata: ["type": "\(header.type)", "error": "\(error.message)"])
                reply(.error(ErrorReply(code: error.code, message: error.message)), to: header.requestID)
            } catch let error as SessionEnd {
                logger.warning("closing session", metadata: ["reason": "\(error.reason)"])
                return
            } catch {
                logger.error("request failed", metadata: ["type": "\(header.type)", "error": "\(error)"])
                reply(.error(ErrorReply(code: .internalError, message: "\(error)")), to: header.requestID)
            }
        }
    }



    private func reply(_ message: Message, to requestID: UInt64, passing descriptors: [Int32] = []) {
        do {
            try connection.send(message, requestID: requestID, passing: descriptors)
        } catch {
            logger.debug("reply not delivered", metadata: ["error": "\(error)"])
        }
    }

    // MARK: Handshake

    private func authenticate() -> Bool {
        guard let secret = server.secret else { return false }
        let nonce = Authentication.makeNonce()
        reply(.challenge(Challenge(nonce: nonce)), to: 0)
        // The answer must come promptly, and it is the only frame read before it is checked.
        let header: FrameHeader
        let message: Message
        do {
            (header, message) = try connection.receive()
        } catch {
            if case .io = error {
                logger.debug("TCP connection closed before authenticating (a reachability probe?)")
            } else {
                logger.warning("TCP client did not answer the authentication challenge", metadata: ["error": "\(error)"])
                reply(.error(ErrorReply(code: .unauthenticated, message: "expected an authenticate frame: \(error)")), to: 0)
            }
            return false
        }
        guard case .authenticate(let answer) = message, Authentication.verify(tag: answer.tag, secret: secret, nonce: nonce) else {
            logger.warning("TCP client failed authentication", metadata: ["firstFrame": "\(header.type)"])
            reply(.error(ErrorReply(code: .unauthenticated, message: "authentication failed: wrong or missing shared secret")), to: header.requestID)
            return false
        }
        reply(.ok, to: header.requestID)
        return true
    }

    // MARK: Dispatch

    private func handle(_ message: Message, header: FrameHeader) throws {
        if case .hello(let hello) = message { return try handleHello(hello, requestID: header.requestID) }
        guard let role else {
            if header.bulkLength > 0 { throw SessionEnd(reason: "\(header.type) with bulk bytes before hello") }
            throw StoreError(.helloRequired, "send hello before \(header.type)")
        }
        switch (role, message) {
        case (.trainer, .beginSave(let m)): try beginSave(m, requestID: header.requestID)
        case (.trainer, .putTensor(let m)): try putTensor(m, header: header)
        case (.trainer, .commitSave(let m)): try commitSave(m, requestID: header.requestID)
        case (.trainer, .abortSave(let m)): try abortSave(m, requestID: header.requestID)
        case (.trainer, .latestCommitted):
            let latest = try server.lock.withLock { () throws -> Step? in try latestCommitted(job: job!) }
            reply(.latestCommittedReply(LatestCommittedReply(step: latest)), to: header.requestID)
        case (.trainer, .waitCommitted(let m)): try waitCommitted(m, requestID: header.requestID)
        case (.trainer, .restore(let m)): try restore(m, requestID: header.requestID)
        case (.trainer, .releaseRestore(let m)): release(ShardKey(job: job!, step: m.step, rank: rank), requestID: header.requestID)
        case (_, .status(let m)): status(m, requestID: header.requestID)
        case (.operatorTool, .recover): reply(.recoverReply(recoverReport()), to: header.requestID)
        case (.peer, _): try handlePeer(message, header: header)
        default:
            if header.bulkLength > 0 { throw SessionEnd(reason: "unexpected \(header.type) with bulk bytes") }
            throw StoreError(.invalidRequest, "\(header.type) is not a request a \(role) session can make")
        }
    }

    private func handleHello(_ hello: Hello, requestID: UInt64) throws {
        guard role == nil else { throw StoreError(.invalidRequest, "hello was already sent on this session") }
        switch hello.role {
        case .trainer:
            let job = hello.job!  // the decoder guarantees trainers name a job
            if server.cluster != nil, hello.localWorld == 0, hello.world > 1 {
                throw StoreError(.invalidRequest, "in a cluster, trainers must say how many ranks use this node (localWorld)")
            }
            try server.lock.withLock { try server.store.attach(session: id, job: job, rank: hello.rank, world: hello.world, localWorld: hello.localWorld) }
            self.job = job
            rank = hello.rank
            world = hello.world
            topology = hello.topology
            logger[metadataKey: "job"] = "\(job)"
            logger[metadataKey: "rank"] = "\(rank)"
            logger.info("trainer connected", metadata: ["world": "\(world)"])
        case .operatorTool:
            logger.info("operator connected")
        case .peer:
            guard isTCP, let cluster = server.clusterConfiguration, cluster.node(hello.nodeID) != nil, hello.nodeID != server.configuration.nodeID else {
                throw StoreError(.invalidRequest, "node \(hello.nodeID) is not a peer of this daemon")
            }
            peerNode = hello.nodeID
            logger[metadataKey: "peer"] = "\(hello.nodeID)"
            logger.debug("peer connected")
        }
        role = hello.role
        reply(.welcome(Welcome(nodeID: server.configuration.nodeID, daemonVersion: SnapshotServer.version)), to: requestID)
    }

    // MARK: Saving

    private func beginSave(_ m: BeginSave, requestID: UInt64) throws {
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        guard m.transport == .stream || !isTCP else {
            throw StoreError(.invalidRequest, "shared-memory transport needs the Unix socket; use stream over TCP")
        }
        let (record, segment) = try server.lock.withLock { () throws -> (ShardRecord, MappedSegment) in
            if let refusal = server.cluster?.refusalOfSave(job: key.job, step: key.step) { throw refusal }
            let (record, effects) = try server.store.beginSave(session: id, key: key, specs: m.tensors, topology: topology)
            server.apply(effects)
            // The pool is memory too: keep held + pooled within the budget.
            server.arena.trimPool(toBytes: server.store.freeBytes)
            do {
                let segment = try server.arena.createSegment(key, sizeBytes: record.segmentSizeBytes)
                server.segments[key] = segment
                return (record, segment)
            } catch {
                server.apply(try server.store.abort(session: id, key: key))
                throw StoreError(.overBudget, "cannot allocate \(record.segmentSizeBytes) bytes in the arena: \(error)")
            }
        }
        logger.debug("save begun", metadata: ["step": "\(m.step)", "bytes": "\(record.segmentSizeBytes)", "tensors": "\(m.tensors.count)"])
        let ready = Message.saveReady(SaveReady(step: m.step, segmentSizeBytes: record.segmentSizeBytes, tensorOffsets: record.tensorOffsets))
        reply(ready, to: requestID, passing: m.transport == .sharedMemory ? [segment.fd] : [])
    }

    /// Bulk bytes go straight from the socket into the arena segment.
    private func putTensor(_ m: PutTensor, header: FrameHeader) throws {
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        let target: (MappedSegment, Int)? = server.lock.withLock {
            guard let shard = server.store.jobs[key.job]?.steps[key.step]?[key.rank], shard.writer == id,
                shard.state == .receiving, let segment = server.segments[key],
                Int(m.tensorIndex) < shard.specs.count,
                m.offsetBytes <= shard.specs[Int(m.tensorIndex)].byteLength,
                header.bulkLength <= shard.specs[Int(m.tensorIndex)].byteLength - m.offsetBytes
            else { return nil }
            return (segment, Int(shard.tensorOffsets[Int(m.tensorIndex)] + m.offsetBytes))
        }
        guard let (segment, offset) = target else {
            guard header.bulkLength <= Self.maximumDiscardBytes else {
                throw SessionEnd(reason: "refused put of \(header.bulkLength) bulk bytes for \(key) tensor \(m.tensorIndex)")
            }
            try connection.socket.discard(count: header.bulkLength, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
            throw StoreError(.invalidRequest, "put for \(key) tensor \(m.tensorIndex) at \(m.offsetBytes)+\(header.bulkLength) is outside any save in progress on this session")
        }
        let destination = segment.bytes(offset: offset, count: Int(header.bulkLength))
        if let base = destination.baseAddress {
            try connection.socket.readExact(into: base, count: destination.count, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
        }
    }

    private func commitSave(_ m: CommitSave, requestID: UInt64) throws {
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        _ = try server.lock.withLock {
            try server.store.commit(session: id, key: key, clientChecksums: m.checksums, gradientNorm: m.gradientNorm, metadata: m.metadata)
        }
        server.seal(key, clientChecksums: m.checksums)
        reply(.saveAccepted(SaveAccepted(step: m.step, state: .sealing)), to: requestID)
    }

    private func abortSave(_ m: StepRequest, requestID: UInt64) throws {
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        try server.lock.withLock { server.apply(try server.store.abort(session: id, key: key)) }
        logger.info("save aborted by the client", metadata: ["step": "\(m.step)"])
        reply(.ok, to: requestID)
    }

    /// How long a waiting session sleeps on the server's condition before it
    /// lets go of the lock and looks whether its client is still there: a rank
    /// whose trainer died while waiting is detached within about this long, so
    /// its restarted trainer is not refused as a duplicate for the rest of the wait.
    static let waitCommittedSliceMilliseconds: Int = 100

    private func waitCommitted(_ m: WaitCommitted, requestID: UInt64) throws {
        let deadline = Date().addingTimeInterval(Double(min(m.timeoutMilliseconds, 3_600_000)) / 1000)
        let job = job!
        while true {
            // One slice with the lock held; nil: the slice ended before the step committed.
            let committed: Step? = try server.lock.withLock {
                let sliceEnd = min(deadline, Date().addingTimeInterval(Double(Self.waitCommittedSliceMilliseconds) / 1000))
                while true {
                    if let latest = server.store.latestCommitted(job: job), latest >= m.step { return latest }
                    let shards = server.store.jobs[job]?.steps[m.step] ?? [:]
                    if let bad = shards.first(where: { $0.value.state == .corrupted }) {
                        throw StoreError(.checksumMismatch, "step \(m.step) cannot commit: rank \(bad.key)'s shard failed its checksum check")
                    }
                    if server.stopping { throw StoreError(.shuttingDown, "snapshotd is stopping") }
                    if !server.lock.wait(until: sliceEnd) {
                        if Date() < deadline { return nil }
                        let complete = shards.values.filter { $0.state == .localComplete || $0.state == .protected }.count
                        if let latest = server.store.latestCommitted(job: job), latest >= m.step { return latest }
                        throw StoreError(.timeout, "step \(m.step) not committed within \(m.timeoutMilliseconds) ms (\(complete) of \(world) shards complete)")
                    }
                }
            }
            if let committed {
                reply(.latestCommittedReply(LatestCommittedReply(step: committed)), to: requestID)
                return
            }
            // Without the lock: a trainer that died (or hung up) while waiting
            // ends its session now, and endSession detaches its rank.
            if connection.socket.peerHasClosed() {
                throw SessionEnd(reason: "client closed the connection while waiting for step \(m.step)")
            }
        }
    }

    /// With the lock held: the job's newest committed step. In a cluster that
    /// is the cluster's (every rank restores the same step), which a node that
    /// is joining or rebuilding cannot answer for yet.
    private func latestCommitted(job: JobID) throws -> Step? {
        if let cluster = server.cluster { return try cluster.latestCommitted(job: job) }
        return server.store.latestCommitted(job: job)
    }

    // MARK: Restoring

    private func restore(_ m: Restore, requestID: UInt64) throws {
        guard m.transport == .stream || !isTCP else {
            throw StoreError(.invalidRequest, "shared-memory transport needs the Unix socket; use stream over TCP")
        }
        let job = job!
        let (step, shard, segment) = try server.lock.withLock { () throws -> (Step, ShardRecord, MappedSegment) in
            let chosen = try m.step ?? latestCommitted(job: job)
            if let cluster = server.cluster, let chosen { try cluster.checkRestorable(job: job, step: chosen) }
            let (step, shard) = try server.store.restorable(job: job, rank: rank, step: chosen)
            let key = ShardKey(job: job, step: step, rank: rank)
            guard let segment = server.segments[key] else { throw StoreError(.internalError, "\(key) has no segment") }
            server.store.pin(key)
            return (step, shard, segment)
        }
        let key = ShardKey(job: job, step: step, rank: rank)
        // Checksums are verified before anything is served, every time.
        let corrupted = corruptedTensors(shard, in: segment)
        guard corrupted.isEmpty else {
            unpin(key)
            logger.error("refusing to serve a corrupted shard", metadata: ["step": "\(step)", "tensors": "\(corrupted)"])
            throw StoreError(.checksumMismatch, "step \(step) rank \(rank): tensor(s) \(corrupted.map { "'\($0)'" }.joined(separator: ", ")) failed the checksum check and are not served")
        }
        let ready = RestoreReady(
            step: step, entries: shard.manifest, tensorOffsets: shard.tensorOffsets, segmentSizeBytes: shard.segmentSizeBytes,
            gradientNorm: shard.gradientNorm, metadata: shard.metadata)
        if m.transport == .sharedMemory {
            let fd = try server.arena.openReadOnly(key)
            defer { close(fd) }
            pins[key, default: 0] += 1  // released by releaseRestore or when the session ends
            reply(.restoreReady(ready), to: requestID, passing: [fd])
        } else {
            defer { unpin(key) }
            let total = shard.specs.reduce(UInt64(0)) { $0 + $1.byteLength }
            try connection.send(.restoreReady(ready), requestID: requestID, bulkLength: total)
            for (spec, offset) in zip(shard.specs, shard.tensorOffsets) where spec.byteLength > 0 {
                let bytes = segment.bytes(offset: Int(offset), count: Int(spec.byteLength))
                try connection.socket.writeAll(bytes.baseAddress!, count: bytes.count)
            }
        }
        logger.info("shard restored", metadata: ["step": "\(step)", "transport": "\(m.transport)"])
    }

    private func release(_ key: ShardKey, requestID: UInt64) {
        if let count = pins[key] {
            pins[key] = count > 1 ? count - 1 : nil
            unpin(key)
        }
        reply(.ok, to: requestID)
    }

    private func unpin(_ key: ShardKey) {
        server.lock.withLock { server.apply(server.store.unpin(key)) }
    }

    private func releasePins() {
        for (key, count) in pins {
            for _ in 0..<count { unpin(key) }
        }
        pins = [:]
    }

    // MARK: Peers

    private func handlePeer(_ message: Message, header: FrameHeader) throws {
        guard let cluster = server.cluster else { throw StoreError(.invalidRequest, "not in cluster mode") }
        switch message {
        case .heartbeat(let beat):
            guard beat.nodeID == peerNode else { throw StoreError(.invalidRequest, "heartbeat for node \(beat.nodeID) on node \(peerNode!)'s session") }
            reply(cluster.handleHeartbeat(beat), to: header.requestID)
        case .stepReady(let ready): reply(cluster.handleStepReady(ready), to: header.requestID)
        case .stepProtected(let report): reply(cluster.handleStepProtected(report), to: header.requestID)
        case .clusterStateRequest: reply(cluster.handleClusterState(), to: header.requestID)
        case .rebuildOrder(let order): reply(cluster.handleRebuildOrder(order), to: header.requestID)
        case .fragmentPut(let put):
            reply(try cluster.handleFragmentPut(put, header: header, connection: connection, scratch: &scratch), to: header.requestID)
        case .fragmentGet(let get): try cluster.serveFragment(get, requestID: header.requestID, connection: connection)
        case .repairRequest(let request): try cluster.serveRepair(request, requestID: header.requestID, connection: connection)
        default:
            if header.bulkLength > 0 { throw SessionEnd(reason: "unexpected \(header.type) with bulk bytes from a peer") }
            throw StoreError(.invalidRequest, "\(header.type) is not a peer request")
        }
    }

    /// A node answers for the whole cluster from its own view; on a single
    /// node, from its store.
    private func recoverReport() -> RecoverReply {
        if let cluster = server.cluster { return cluster.recoverReport() }
        let jobs = server.lock.withLock {
            server.store.jobs.keys.sorted().map { job in
                let latest = server.store.latestCommitted(job: job)
                return JobRecovery(job: job, latestCommitted: latest, newestRestorable: latest, lostRanks: [], summary: latest == nil ? "no committed step" : "single node: all ranks intact")
            }
        }
        return RecoverReply(coordinator: server.configuration.nodeID, deadNodes: [], rebuildingNodes: [], jobs: jobs)
    }

    // MARK: Operators

    private func status(_ m: StatusRequest, requestID: UInt64) {
        // A trainer sees only its own job.
        let filter = role == .trainer ? job : m.job
        let reply: StatusReply = server.lock.withLock {
            let store = server.store
            let jobs = store.jobs.keys.sorted().filter { filter == nil || $0 == filter }.map { name -> JobStatus in
                let record = store.jobs[name]!
                let steps = record.steps.keys.sorted().map { step -> StepStatus in
                    let shards = record.steps[step]!
                    return StepStatus(
                        step: step, committed: record.committedSteps.contains(step),
                        completeRanks: UInt32(shards.values.filter { $0.state == .localComplete || $0.state == .protected }.count),
                        bytes: shards.values.reduce(0) { $0 + $1.segmentSizeBytes })
                }
                return JobStatus(job: name, world: record.world, localRanks: UInt32(record.sessions.count), steps: steps)
            }
            return StatusReply(nodeID: server.configuration.nodeID, daemonVersion: SnapshotServer.version, budgetBytes: store.budgetBytes, usedBytes: store.heldBytes, jobs: jobs)
        }
        self.reply(.statusReply(reply), to: requestID)
    }
}

/// The session must close: the stream is no longer at a trustworthy frame boundary.
struct SessionEnd: Error { let reason: String }
