import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// One client connection, served on its own thread. Handles the handshake
/// (TCP: HMAC challenge first, before anything else is read), then requests.
/// Every bad input gets an error reply and a log line; the session closes only
/// when the stream can no longer be trusted to be at a frame boundary.
final class Session {
    let server: SnapshotServer
    let id: SessionID
    let connection: FramedConnection
    let transport: SessionTransport
    /// TCP or RDMA: authenticated by the challenge, no shared memory, no fd passing.
    var isRemote: Bool { transport != .unix }
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
    /// TCP sessions: what the session authenticated as (nil on the Unix socket).
    var credential: Credential?
    /// When each save this session began arrived, until its commitSave: the
    /// staging latency (``MetricsRegistry/saveStaging``). At most
    /// ``Limits/metricsStagingTimersPerSession``; a trainer has one or two.
    var stagingStarts: [ShardKey: ContinuousClock.Instant] = [:]

    init(server: SnapshotServer, id: SessionID, connection: FramedConnection, transport: SessionTransport) {
        self.server = server
        self.id = id
        self.connection = connection
        self.transport = transport
        logger = server.logger
        logger[metadataKey: "session"] = "\(id)"
        logger[metadataKey: "transport"] = "\(transport)"
    }

    func serve() {
        defer { releasePins() }
        if isRemote {
            guard let credential = authenticate() else { return }
            self.credential = credential
        }
        while true {
            let header: FrameHeader
            let message: Message
            do {
                // Only authenticated peers may send the large, manifests-carrying messages.
                (header, message) = try connection.receive(
                    maximumPayloadBytes: role == .peer ? ProtocolLimits.maximumLargeControlPayloadBytes : ProtocolLimits.maximumControlPayloadBytes)
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
            } catch let error as IOError {
                // Mid-request I/O failed (a write deadline passed, the client
                // left): the stream is no longer at a frame boundary.
                logger.warning("closing session: connection failed mid-request", metadata: ["type": "\(header.type)", "error": "\(error)"])
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

    /// Who a TCP session proved to be: the secret it answered with decides
    /// which roles it may take in hello.
    enum Credential {
        /// Answered with the trainers' secret: trainer or operator.
        case client
        /// Answered with the peers' secret: another snapshotd node.
        case peer
    }

    /// The challenge, and its answer within ``Limits/authenticationTimeoutMilliseconds``
    /// in a frame of at most ``Limits/unauthenticatedPayloadBytes``: a
    /// stranger cannot hold a session open or make the daemon allocate.
    private func authenticate() -> Credential? {
        let nonce = Authentication.makeNonce()
        reply(.challenge(Challenge(nonce: nonce)), to: 0)
        let header: FrameHeader
        let message: Message
        do {
            (header, message) = try connection.receiveBounded(
                deadlineMilliseconds: monotonicMilliseconds() + Limits.authenticationTimeoutMilliseconds,
                maximumPayloadBytes: Limits.unauthenticatedPayloadBytes)
        } catch {
            server.counters.increment(.authenticationFailures)
            if case .io(let error) = error {
                logger.debug("TCP connection closed or cut before authenticating", metadata: ["error": "\(error)"])
            } else {
                logger.warning("TCP client did not answer the authentication challenge", metadata: ["error": "\(error)"])
                reply(.error(ErrorReply(code: .unauthenticated, message: "expected an authenticate frame: \(error)")), to: 0)
            }
            return nil
        }
        let credential: Credential?
        switch message {
        case .authenticate(let answer) where server.secret.map({ Authentication.verify(tag: answer.tag, secret: $0, nonce: nonce) }) == true:
            credential = .client
        case .authenticate(let answer) where server.peerSecret.map({ Authentication.verify(tag: answer.tag, secret: $0, nonce: nonce) }) == true:
            credential = .peer
        default:
            credential = nil
        }
        guard let credential else {
            server.counters.increment(.authenticationFailures)
            logger.warning("TCP client failed authentication", metadata: ["firstFrame": "\(header.type)"])
            reply(.error(ErrorReply(code: .unauthenticated, message: "authentication failed: wrong or missing shared secret")), to: header.requestID)
            return nil
        }
        guard server.promoteToRemote(id) else {
            logger.warning("refusing authenticated TCP session: remote slots full", metadata: ["limit": "\(server.configuration.maximumConnections)"])
            reply(.error(ErrorReply(code: .tooManyConnections, message: "snapshotd has \(server.configuration.maximumConnections) remote sessions, the maximum")), to: header.requestID)
            return nil
        }
        reply(.ok, to: header.requestID)
        return credential
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
            let latest = try server.latestCommitted(job: job!)
            reply(.latestCommittedReply(LatestCommittedReply(step: latest)), to: header.requestID)
        case (.trainer, .waitCommitted(let m)): try waitCommitted(m, requestID: header.requestID)
        case (.trainer, .restore(let m)): try restore(m, requestID: header.requestID)
        case (.trainer, .releaseRestore(let m)): release(ShardKey(job: job!, step: m.step, rank: rank), requestID: header.requestID)
        case (_, .status(let m)): status(m, requestID: header.requestID)
        case (.operatorTool, .recover): reply(.recoverReply(server.recoverReport()), to: header.requestID)
        case (.operatorTool, .export(let m)):
            // It writes files where the operator says: only someone on the daemon's machine may.
            guard !isRemote else { throw StoreError(.invalidRequest, "export writes files on the daemon's machine: run snapshotctl export there, over its Unix socket") }
            reply(.exportReply(try server.export(m)), to: header.requestID)
        case (.operatorTool, .clusterStatus): reply(.clusterStatusReply(server.clusterStatus()), to: header.requestID)
        case (.operatorTool, .drain(let m)): reply(.drainReply(try server.drain(m)), to: header.requestID)
        case (.operatorTool, .verify(let m)): reply(.verifyReply(server.verify(m)), to: header.requestID)
        case (.operatorTool, .rebuildPlan(let m)): reply(.rebuildPlanReply(try server.rebuildPlan(m)), to: header.requestID)
        case (.operatorTool, .checkFree(let m)) where m.phase == .request:
            guard let cluster = server.cluster else { throw StoreError(.invalidRequest, "CheckFree rebuilds stages across a cluster; this daemon runs a single node") }
            reply(try cluster.handleCheckFreeRequest(m), to: header.requestID)
        case (.peer, _): try handlePeer(message, header: header)
        default:
            if header.bulkLength > 0 { throw SessionEnd(reason: "unexpected \(header.type) with bulk bytes") }
            throw StoreError(.invalidRequest, "\(header.type) is not a request a \(role) session can make")
        }
    }

    private func handleHello(_ hello: Hello, requestID: UInt64) throws {
        guard role == nil else { throw StoreError(.invalidRequest, "hello was already sent on this session") }
        // A session's role is what it authenticated as: only the peers' secret
        // speaks for a node, and peers come over TCP.
        guard (hello.role == .peer) == (credential == .peer) else {
            server.counters.increment(.rolesRefused)
            logger.warning("hello refused: claimed role does not match the credential", metadata: [
                "claimed": "\(hello.role)", "authenticatedAs": "\(credential.map { "\($0)" } ?? "local (Unix socket)")",
            ])
            throw StoreError(.unauthenticated, hello.role == .peer
                ? "only a session authenticated with the peers' secret may act as a peer"
                : "a session authenticated with the peers' secret may act only as a peer")
        }
        switch hello.role {
        case .trainer:
            let job = hello.job!  // the decoder guarantees trainers name a job
            try server.attachTrainer(session: id, job: job, rank: hello.rank, world: hello.world, localWorld: hello.localWorld)
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
            guard isRemote, let cluster = server.clusterConfiguration, cluster.node(hello.nodeID) != nil, hello.nodeID != server.configuration.nodeID else {
                throw StoreError(.invalidRequest, "node \(hello.nodeID) is not a peer of this daemon")
            }
            peerNode = hello.nodeID
            logger[metadataKey: "peer"] = "\(hello.nodeID)"
            logger.debug("peer connected")
        }
        role = hello.role
        reply(.welcome(Welcome(nodeID: server.configuration.nodeID)), to: requestID)
    }

    // MARK: Saving

    private func beginSave(_ m: BeginSave, requestID: UInt64) throws {
        let received = ContinuousClock.now
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        guard m.transport == .stream || !isRemote else {
            throw StoreError(.invalidRequest, "shared-memory transport needs the Unix socket; use stream over TCP")
        }
        let (record, segment) = try server.beginSave(session: id, key: key, specs: m.tensors, topology: topology)
        startStagingTimer(key, at: received)
        logger.debug("save begun", metadata: ["step": "\(m.step)", "bytes": "\(record.segmentSizeBytes)", "tensors": "\(m.tensors.count)"])
        let ready = Message.saveReady(SaveReady(step: m.step, segmentSizeBytes: record.segmentSizeBytes, tensorOffsets: record.tensorOffsets))
        reply(ready, to: requestID, passing: m.transport == .sharedMemory ? [segment.fd] : [])
    }

    /// Bulk bytes go straight from the socket into the arena segment.
    private func putTensor(_ m: PutTensor, header: FrameHeader) throws {
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        let target = server.putDestination(session: id, key: key, tensorIndex: Int(m.tensorIndex), offsetBytes: m.offsetBytes, lengthBytes: header.bulkLength)
        guard let (segment, offset) = target else {
            guard header.bulkLength <= Limits.maximumDiscardBytes else {
                throw SessionEnd(reason: "refused put of \(header.bulkLength) bulk bytes for \(key) tensor \(m.tensorIndex)")
            }
            try connection.stream.discard(count: header.bulkLength, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
            throw StoreError(.invalidRequest, "put for \(key) tensor \(m.tensorIndex) at \(m.offsetBytes)+\(header.bulkLength) is outside any save in progress on this session")
        }
        let destination = segment.bytes(offset: offset, count: Int(header.bulkLength))
        if let base = destination.baseAddress {
            try connection.stream.readExact(into: base, count: destination.count, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
        }
    }

    private func commitSave(_ m: CommitSave, requestID: UInt64) throws {
        let received = ContinuousClock.now
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        try server.commitSave(session: id, key: key, checksums: m.checksums, gradientNorm: m.gradientNorm, metadata: m.metadata, received: received)
        if let started = stagingStarts.removeValue(forKey: key) { server.metrics.recordSaveStaging(seconds: (received - started).seconds) }
        reply(.saveAccepted(SaveAccepted(step: m.step)), to: requestID)
    }

    /// A save begun: its staging is timed from when its beginSave arrived
    /// (a re-save of the same step starts over).
    private func startStagingTimer(_ key: ShardKey, at received: ContinuousClock.Instant) {
        if stagingStarts[key] == nil, stagingStarts.count >= Limits.metricsStagingTimersPerSession,
            let oldest = stagingStarts.min(by: { $0.value < $1.value })
        {
            stagingStarts[oldest.key] = nil
        }
        stagingStarts[key] = received
    }

    private func abortSave(_ m: StepRequest, requestID: UInt64) throws {
        let key = ShardKey(job: job!, step: m.step, rank: rank)
        stagingStarts[key] = nil
        try server.abortSave(session: id, key: key)
        logger.info("save aborted by the client", metadata: ["step": "\(m.step)"])
        reply(.ok, to: requestID)
    }

    /// Waits in slices of ``Limits/commitWaitSliceMilliseconds``: between
    /// two, without the lock, it looks whether its client is still there, so
    /// the session of a trainer that died while waiting ends within a slice.
    private func waitCommitted(_ m: WaitCommitted, requestID: UInt64) throws {
        let deadline = Date().addingTimeInterval(Double(min(m.timeoutMilliseconds, Limits.longestCommitWaitMilliseconds)) / 1000)
        let job = job!
        while true {
            // One slice with the lock held; nil: the slice ended before the step committed.
            let sliceEnd = min(deadline, Date().addingTimeInterval(Double(Limits.commitWaitSliceMilliseconds) / 1000))
            let committed = try server.waitForCommit(job: job, step: m.step, world: world, sliceEnd: sliceEnd, deadline: deadline, timeoutMilliseconds: m.timeoutMilliseconds)
            if let committed {
                reply(.latestCommittedReply(LatestCommittedReply(step: committed)), to: requestID)
                return
            }
            // Without the lock: a trainer that died (or hung up) while waiting
            // ends its session now, and endSession detaches its rank.
            if connection.stream.peerHasClosed() {
                throw SessionEnd(reason: "client closed the connection while waiting for step \(m.step)")
            }
        }
    }

    // MARK: Restoring

    private func restore(_ m: Restore, requestID: UInt64) throws {
        guard m.transport == .stream || !isRemote else {
            throw StoreError(.invalidRequest, "shared-memory transport needs the Unix socket; use stream over TCP")
        }
        // Part of the newest step lost somewhere: every rank of the job goes to
        // the same step, from memory where this node holds it, else from the
        // durable tier (the fallback below).
        let wanted = m.step ?? server.jobWideRestoreTarget(job: job!)
        let (step, shard, segment): (Step, ShardRecord, MappedSegment)
        do {
            (step, shard, segment) = try server.pinForRestore(job: job!, rank: rank, step: wanted)
        } catch let error as StoreError where [.unrecoverable, .unknownStep, .notCommitted, .unavailable].contains(error.code) {
            // What memory cannot serve for good (lost beyond tolerance, or not
            // held), the durable tier may (docs/operations.md, "The durable tier"); not
            // while a rebuild that will serve the step is still possible.
            let memory = server.memoryLoss(job: job!, rank: rank, step: m.step)
            guard error.code != .unavailable || memory.lost,
                let durable = try server.durableRestore(job: job!, rank: rank, step: wanted, world: world, memoryNewest: memory.newestRestorable)
            else { throw error }
            return try serveDurable(durable, transport: m.transport, requestID: requestID, memoryError: error)
        }
        let key = ShardKey(job: job!, step: step, rank: rank)
        let ready = RestoreReady(
            step: step, entries: shard.manifest, tensorOffsets: shard.tensorOffsets, segmentSizeBytes: shard.segmentSizeBytes,
            gradientNorm: shard.gradientNorm, metadata: shard.metadata, reconstruction: shard.reconstruction)
        if m.transport == .sharedMemory {
            let fd: Int32
            do {
                fd = try server.arena.openReadOnly(key)
            } catch {
                unpin(key)
                throw error
            }
            defer { close(fd) }
            pins[key, default: 0] += 1  // released by releaseRestore or when the session ends
            reply(.restoreReady(ready), to: requestID, passing: [fd])
        } else {
            defer { unpin(key) }
            let total = shard.specs.reduce(UInt64(0)) { $0 + $1.byteLength }
            try connection.send(.restoreReady(ready), requestID: requestID, bulkLength: total)
            // One deadline for the whole shard: a client that stops reading
            // frees this thread and the restore's pin when it passes.
            let deadline = connection.bulkDeadline(total)
            for (spec, offset) in zip(shard.specs, shard.tensorOffsets) where spec.byteLength > 0 {
                let bytes = segment.bytes(offset: Int(offset), count: Int(spec.byteLength))
                try connection.stream.writeAll(bytes.baseAddress!, count: bytes.count, deadlineMilliseconds: deadline)
            }
        }
        logger.info("shard restored", metadata: ["step": "\(step)", "transport": "\(m.transport)", "approximate": "\(shard.reconstruction.map { "\($0)" } ?? "no")"])
    }

    /// Serves a rank's durable copy: the file itself is the segment (its fd
    /// over the Unix socket, its bytes on a stream); nothing to pin, since a
    /// newer flush replaces the file by rename and this one stays readable.
    private func serveDurable(_ durable: DurableFiles.DurableShard, transport: DataTransport, requestID: UInt64, memoryError: StoreError) throws {
        let ready = durable.ready
        if transport == .sharedMemory {
            let fd = dup(durable.file.fd)
            guard fd >= 0 else { throw StoreError(.internalError, "dup of \(durable.path): \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            reply(.restoreReady(ready), to: requestID, passing: [fd])
        } else {
            let total = ready.entries.reduce(UInt64(0)) { $0 + $1.spec.byteLength }
            try connection.send(.restoreReady(ready), requestID: requestID, bulkLength: total)
            let deadline = connection.bulkDeadline(total)
            for (entry, offset) in zip(ready.entries, ready.tensorOffsets) where entry.spec.byteLength > 0 {
                let bytes = durable.file.bytes(offset: Int(offset), count: Int(entry.spec.byteLength))
                try connection.stream.writeAll(bytes.baseAddress!, count: bytes.count, deadlineMilliseconds: deadline)
            }
        }
        server.counters.increment(.durableRestores)
        logger.warning("shard restored from the durable tier: memory could not serve it", metadata: [
            "step": "\(ready.step)", "transport": "\(transport)", "file": "\(durable.path)", "memory": "\(memoryError)",
        ])
    }

    private func release(_ key: ShardKey, requestID: UInt64) {
        if let count = pins[key] {
            pins[key] = count > 1 ? count - 1 : nil
            unpin(key)
        }
        reply(.ok, to: requestID)
    }

    private func unpin(_ key: ShardKey) { server.unpin(key) }

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
        case .clusterStateRequest(let request): reply(cluster.handleClusterState(request), to: header.requestID)
        case .rebuildOrder(let order): reply(cluster.handleRebuildOrder(order), to: header.requestID)
        case .fragmentPut(let put):
            reply(try cluster.handleFragmentPut(put, header: header, connection: connection, scratch: &scratch), to: header.requestID)
        case .fragmentGet(let get): try cluster.serveFragment(get, requestID: header.requestID, connection: connection)
        case .shardGet(let get): try cluster.serveShard(get, requestID: header.requestID, connection: connection)
        // An operator asked a peer, which asks this node about itself.
        case .clusterStatus:
            let own = server.ownSummary()
            reply(.clusterStatusReply(ClusterStatusReply(coordinator: own.node, nodes: [own], groups: [])), to: header.requestID)
        case .drain(let request) where request.node == server.configuration.nodeID: reply(.drainReply(server.drainHere(request)), to: header.requestID)
        case .verify(let request) where request.local: reply(.verifyReply(server.verify(request)), to: header.requestID)
        case .checkFree(let order) where order.phase != .request: reply(try cluster.handleCheckFreeOrder(order), to: header.requestID)
        case .repairRequest(let request): try cluster.serveRepair(request, requestID: header.requestID, connection: connection)
        default:
            if header.bulkLength > 0 { throw SessionEnd(reason: "unexpected \(header.type) with bulk bytes from a peer") }
            throw StoreError(.invalidRequest, "\(header.type) is not a peer request")
        }
    }

    // MARK: Operators

    private func status(_ m: StatusRequest, requestID: UInt64) {
        // A trainer sees only its own job.
        reply(.statusReply(server.status(job: role == .trainer ? job : m.job)), to: requestID)
    }
}

/// What a session runs over.
enum SessionTransport: String, Sendable {
    case unix, tcp, rdma
}

/// The session must close: the stream is no longer at a trustworthy frame boundary.
struct SessionEnd: Error { let reason: String }
