import Foundation
import Glibc
public import Logging
import ServiceLifecycle
import SnapshotIO
import SnapshotProtocol

/// The per-node daemon: owns the arena, serves trainers over the Unix socket
/// (file descriptors, zero copy) and TCP (bulk bytes straight into the arena),
/// seals shards off the trainers' critical path, commits and retains steps.
///
/// Concurrency: one thread per connection (bounded by `maximumConnections`)
/// doing blocking I/O, a concurrent queue for sealing, and one lock (an
/// NSCondition, so waiters can sleep on commits) around the store, the mapped
/// segments and the arena's pool. Byte-moving work (socket reads into the
/// arena, CRCs) happens outside the lock.
public final class SnapshotServer: Service, @unchecked Sendable {
    public static let version = "0.1.0"

    let configuration: DaemonConfiguration
    let logger: Logger
    let secret: [UInt8]?
    let arena: Arena
    /// Set in cluster mode (a cluster file was given).
    private(set) var cluster: ClusterNode?
    let clusterConfiguration: ClusterConfiguration?

    /// Guards everything below it.
    let lock = NSCondition()
    var store: SnapshotStore
    var segments: [ShardKey: MappedSegment] = [:]
    var sessions: [SessionID: Socket] = [:]
    var nextSessionID: SessionID = 1
    var listeners: [Socket] = []
    var stopping = false
    public private(set) var boundTCPPort: UInt16?

    let sealQueue = DispatchQueue(label: "snapshotd.seal", attributes: .concurrent)
    /// Bounds concurrent sealing to the core count: CRC work is CPU-bound.
    let sealSlots = DispatchSemaphore(value: max(1, ProcessInfo.processInfo.activeProcessorCount))

    public init(configuration: DaemonConfiguration, logger: Logger) throws {
        try configuration.validate()
        var configuration = configuration
        clusterConfiguration = try configuration.clusterFile.map(Self.loadCluster)
        if let cluster = clusterConfiguration {
            guard let node = cluster.node(configuration.nodeID) else {
                throw ConfigurationError("node id \(configuration.nodeID) is not in the cluster file \(configuration.clusterFile!)")
            }
            // Peers reach this node at its cluster address.
            if configuration.tcpListen == nil { configuration.tcpListen = node.address }
        }
        self.configuration = configuration
        self.logger = logger
        secret = try configuration.sharedSecretFile.map(Self.readSecret)
        arena = try Arena(root: configuration.arenaDirectory, logger: logger)
        store = SnapshotStore(
            budgetBytes: configuration.memoryBudgetBytes, snapshotsKeptPerJob: configuration.snapshotsKeptPerJob,
            commitsLocally: clusterConfiguration == nil)
        if let clusterConfiguration {
            cluster = try ClusterNode(
                server: self, cluster: clusterConfiguration, selfID: configuration.nodeID, secret: secret!,
                keptStepsPerJob: configuration.snapshotsKeptPerJob, logger: logger)
        }
        try recoverArena()
    }

    static func loadCluster(path: String) throws -> ClusterConfiguration {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ConfigurationError("cannot read cluster file \(path)")
        }
        return try ClusterConfiguration.load(tomlText: text)
    }

    static func readSecret(path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigurationError("cannot read shared secret file \(path)")
        }
        let secret = Array(String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
        guard secret.count >= 16 else { throw ConfigurationError("shared secret in \(path) is shorter than 16 bytes") }
        return secret
    }

    // MARK: Lifecycle

    /// Runs until graceful shutdown (SIGTERM/SIGINT through the service group).
    public func run() async throws {
        try start()
        let watchdog = Task.detached { [logger] in
            guard let interval = SystemdNotifier.watchdogIntervalSeconds else { return }
            logger.debug("systemd watchdog enabled", metadata: ["intervalSeconds": "\(interval)"])
            while !Task.isCancelled {
                SystemdNotifier.notify("WATCHDOG=1")
                try? await Task.sleep(for: .seconds(interval))
            }
        }
        try? await gracefulShutdown()
        watchdog.cancel()
        SystemdNotifier.notify("STOPPING=1")
        stop()
    }

    /// Opens the listeners and starts accepting. Separate from `run` so tests
    /// and benchmarks can host a server in-process.
    public func start() throws {
        let unix = try Socket.listenUnix(path: configuration.unixSocketPath, mode: 0o660)
        var opened = [(unix, false)]
        if let listen = configuration.tcpListen {
            do {
                let (host, port) = try DaemonConfiguration.parseHostPort(listen)
                let tcp = try Socket.listenTCP(host: host, port: port)
                boundTCPPort = tcp.localPort()
                opened.append((tcp, true))
            } catch {
                // Do not leave a socket file behind that no one will ever answer.
                unix.close()
                unlink(configuration.unixSocketPath)
                throw error
            }
        }
        lock.withLock { listeners = opened.map(\.0) }
        for (listener, isTCP) in opened {
            Thread.detachNewThread { [self] in acceptLoop(listener, isTCP: isTCP) }
        }
        if let clusterConfiguration { warnAboutUnreachablePeers(clusterConfiguration) }
        cluster?.start()
        let devices = RDMADevices.list()
        logger.info(
            "snapshotd ready",
            metadata: [
                "node": "\(configuration.nodeID)", "unixSocket": "\(configuration.unixSocketPath)",
                "tcp": "\(boundTCPPort.map { "\(configuration.tcpListen!.split(separator: ":").first!):\($0)" } ?? "off")",
                "arena": "\(arena.root)", "budgetBytes": "\(configuration.memoryBudgetBytes)",
                "rdma": "\(devices.isEmpty ? "no RDMA device, using TCP" : devices.map(\.name).joined(separator: ","))",
            ])
        SystemdNotifier.notify("READY=1")
    }

    public func stop() {
        cluster?.stop()
        let open = lock.withLock {
            stopping = true
            return (listeners, Array(sessions.values))
        }
        for listener in open.0 {
            listener.shutdownBoth()
            listener.close()
        }
        unlink(configuration.unixSocketPath)
        for session in open.1 { session.shutdownBoth() }
        sealQueue.sync(flags: .barrier) {}  // let sealing in flight finish: its shards become durable
        logger.info("snapshotd stopped", metadata: ["heldBytes": "\(lock.withLock { store.heldBytes })"])
    }

    private func acceptLoop(_ listener: Socket, isTCP: Bool) {
        while true {
            let socket: Socket
            do {
                socket = try listener.accept()
            } catch {
                if lock.withLock({ stopping }) { return }
                logger.warning("accept failed", metadata: ["error": "\(error)"])
                usleep(10_000)
                continue
            }
            let id: SessionID? = lock.withLock {
                guard !stopping, sessions.count < configuration.maximumConnections else { return nil }
                defer { nextSessionID += 1 }
                sessions[nextSessionID] = socket
                return nextSessionID
            }
            guard let id else {
                logger.warning("refusing connection: session limit reached", metadata: ["limit": "\(configuration.maximumConnections)"])
                try? FramedConnection(socket: socket).send(.error(ErrorReply(code: .tooManyConnections, message: "snapshotd has \(configuration.maximumConnections) sessions, the configured maximum")), requestID: 0)
                socket.close()
                continue
            }
            Thread.detachNewThread { [self] in
                let session = Session(server: self, id: id, connection: FramedConnection(socket: socket, frameTimeoutMilliseconds: configuration.frameTimeoutMilliseconds), isTCP: isTCP)
                session.serve()
                endSession(id)
                socket.close()
            }
        }
    }

    private func endSession(_ id: SessionID) {
        lock.withLock {
            sessions[id] = nil
            apply(store.detach(session: id))
        }
    }

    /// Unreachable peers are worth a warning at start, not an error: they may
    /// simply start later.
    private func warnAboutUnreachablePeers(_ cluster: ClusterConfiguration) {
        Thread.detachNewThread { [logger, configuration] in
            for node in cluster.nodes where node.id != configuration.nodeID {
                if let socket = try? Socket.connectTCP(host: node.host, port: node.port, timeoutMilliseconds: 1000) {
                    socket.close()
                } else {
                    logger.warning("peer not reachable yet", metadata: ["peer": "\(node.id)", "address": "\(node.address)"])
                }
            }
        }
    }

    // MARK: Restart

    /// Re-attaches to every committed step in the arena and verifies it.
    private func recoverArena() throws {
        var steps = 0
        var corrupted: [String] = []
        for found in arena.scan() {
            for (rank, shard) in found.shards {
                let key = ShardKey(job: found.job, step: found.step, rank: rank)
                let segment = try arena.mapSegment(key, sizeBytes: shard.segmentSizeBytes)
                segments[key] = segment
                corrupted += corruptedTensors(shard, in: segment).map { "\(key): \($0)" }
            }
            for (stripe, record) in found.parity {
                let key = ParityKey(job: found.job, step: found.step, stripe: stripe)
                cluster?.paritySegments[key] = try arena.mapParitySegment(key, sizeBytes: record.segmentSizeBytes)
            }
            store.adoptCommitted(job: found.job, step: found.step, world: found.world, shards: found.shards, parity: cluster == nil ? [:] : found.parity)
            steps += 1
        }
        arena.trimPool(toBytes: store.freeBytes)
        logger.info("arena recovered", metadata: ["committedSteps": "\(steps)", "heldBytes": "\(store.heldBytes)", "pooledBytes": "\(arena.pooledBytes)"])
        for entry in corrupted {
            logger.error("checksum mismatch in a recovered snapshot; it will not be served", metadata: ["tensor": "\(entry)"])
        }
    }

    // MARK: Applying store decisions (call with the lock held)

    func apply(_ effects: SnapshotStore.Effects) {
        for (job, step, world) in effects.committed {
            do {
                let record = store.jobs[job]
                try arena.writeCommitMarker(
                    job: job, step: step, world: world, ranks: Array((record?.steps[step] ?? [:]).keys),
                    parity: record?.parity[step] ?? [:])
            } catch {
                logger.error("cannot write commit marker; step will not survive a daemon restart", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
            }
            logger.info("step committed", metadata: ["job": "\(job)", "step": "\(step)", "ranks": "\(world)"])
        }
        for (job, step) in effects.uncommitted { arena.removeCommitMarker(job: job, step: step) }
        let poolLimit = store.budgetBytes > store.heldBytes ? store.budgetBytes - store.heldBytes : 0
        for key in effects.freed {
            guard let segment = segments.removeValue(forKey: key) else { continue }
            arena.release(key, segment: segment, poolLimitBytes: poolLimit)
            logger.debug("shard freed", metadata: ["shard": "\(key)"])
        }
        for key in effects.freedParity {
            guard let segment = cluster?.paritySegments.removeValue(forKey: key) else { continue }
            arena.releaseParity(key, segment: segment, poolLimitBytes: poolLimit)
        }
        for (job, step) in effects.localComplete { cluster?.shareSealed(job: job, step: step) }
        if !effects.committed.isEmpty || !effects.freed.isEmpty { lock.broadcast() }
    }

    // MARK: Sealing

    /// Computes the shard's checksums off the trainer's path, persists its
    /// manifest, and marks it local-complete (which may commit the step).
    func seal(_ key: ShardKey, clientChecksums: [UInt32]?) {
        sealQueue.async { [self] in
            sealSlots.wait()
            defer { sealSlots.signal() }
            guard let (shard, segment, world) = lock.withLock({ () -> (ShardRecord, MappedSegment, UInt32)? in
                guard let shard = store.jobs[key.job]?.steps[key.step]?[key.rank], shard.state == .sealing,
                    let segment = segments[key], let world = store.jobs[key.job]?.world
                else { return nil }
                return (shard, segment, world)
            }) else { return }
            let started = monotonicMilliseconds()
            let checksums = tensorChecksums(shard, in: segment)
            if let clientChecksums, clientChecksums != checksums {
                let bad = zip(shard.specs, zip(checksums, clientChecksums)).filter { $1.0 != $1.1 }.map(\.0.name)
                logger.error("client checksums do not match the bytes received; shard refused", metadata: ["shard": "\(key)", "tensors": "\(bad)"])
                lock.withLock {
                    store.sealFailed(key: key)
                    lock.broadcast()
                }
                return
            }
            var sealed = shard
            sealed.checksums = checksums
            do {
                try arena.writeManifest(ManifestFile(key: key, world: world, shard: sealed))
            } catch {
                logger.error("cannot write manifest; shard not sealed", metadata: ["shard": "\(key)", "error": "\(error)"])
                lock.withLock {
                    store.sealFailed(key: key)
                    lock.broadcast()
                }
                return
            }
            lock.withLock {
                apply(store.sealed(key: key, checksums: checksums))
                lock.broadcast()
            }
            logger.debug("shard sealed", metadata: ["shard": "\(key)", "bytes": "\(shard.segmentSizeBytes)", "milliseconds": "\(monotonicMilliseconds() - started)"])
        }
    }
}
