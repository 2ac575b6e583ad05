import ErasureCoding
import Foundation
import Glibc
public import Logging
import RDMATransport
import ServiceLifecycle
import SnapshotIO
import SnapshotProtocol
import Synchronization
import SnapshotCore

/// The per-node daemon: owns the arena, serves trainers over the Unix socket
/// (file descriptors, zero copy) and TCP (bulk bytes straight into the arena),
/// seals shards off the trainers' critical path, commits and retains steps.
///
/// Concurrency: one thread per connection (bounded by `maximumConnections`)
/// doing blocking I/O, a concurrent queue for sealing, and one owner of all
/// mutable state: ``state``, a ``NodeState`` behind one lock that sessions
/// can wait on (commits, freed shards). Byte-moving work (socket reads into
/// the arena, CRCs) happens outside the lock.
public final class SnapshotServer: Service, Sendable {
    public static let version = SnapshotdVersion.string

    let configuration: DaemonConfiguration
    let logger: Logger
    /// What remote trainers and operators authenticate with.
    let secret: [UInt8]?
    /// What peers authenticate with (cluster mode).
    let peerSecret: [UInt8]?
    let arena: Arena
    /// Set in cluster mode (a cluster file was given).
    let cluster: ClusterNode?
    let clusterConfiguration: ClusterConfiguration?
    /// Everything the node changes while it runs.
    let state: Locked<NodeState>
    let storeEffects: StoreEffects
    let counters: Counters
    /// Latency histograms for the Prometheus endpoint (gauges are read from ``state`` at scrape time).
    let metrics = MetricsRegistry()
    /// Set while this node runs `snapshotctl verify`'s check (one at a time).
    let verifying = Mutex(false)
    /// Refusals come in floods: one log line per second says how many so far.
    let refusalLog = LogRateLimiter(intervalMilliseconds: Limits.repeatedWarningIntervalMilliseconds)
    let rdmaAcceptFailureLog = LogRateLimiter(intervalMilliseconds: Limits.repeatedWarningIntervalMilliseconds)
    /// The TCP port the listener bound (known once ``start()`` returned).
    public var boundTCPPort: UInt16? { boundPort.withLock { $0 } }
    private let boundPort = Mutex<UInt16?>(nil)
    /// The port the metrics endpoint bound (known once ``start()`` returned; nil without `metrics_listen`).
    public var boundMetricsPort: UInt16? { boundMetricsPortValue.withLock { $0 } }
    private let boundMetricsPortValue = Mutex<UInt16?>(nil)

    let sealQueue = DispatchQueue(label: "snapshotd.seal", attributes: .concurrent)
    /// One seal per shard key at a time writes the manifest and applies its outcome.
    let sealOwners = KeyedExclusion<ShardKey>()
    /// Bounds concurrent sealing to the core count: CRC work is CPU-bound.
    let sealSlots = DispatchSemaphore(value: max(1, ProcessInfo.processInfo.activeProcessorCount))

    public init(configuration: DaemonConfiguration, logger: Logger) throws {
        Limits.checkRelationships()
        if !Failpoints.active.isEmpty {
            let unknown = Failpoints.active.subtracting(Failpoints.known)
            guard unknown.isEmpty else { throw ConfigurationError("\(Failpoints.environmentVariable) names unknown failpoints: \(unknown.sorted().joined(separator: ", "))") }
            logger.warning("failpoints are set: this daemon fails on purpose (tests only)", metadata: ["failpoints": "\(Failpoints.active.sorted())"])
        }
        try configuration.validate()
        var configuration = configuration
        clusterConfiguration = try configuration.clusterFile.map { try StaticClusterFile(path: $0).load() }
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
        peerSecret = try configuration.peerSecretFile.map(Self.readSecret)
        if let secret, secret == peerSecret { throw ConfigurationError("peer_secret_file and shared_secret_file hold the same secret: peers need a secret of their own") }
        arena = try Arena(root: configuration.arenaDirectory, logger: logger)
        storeEffects = StoreEffects(arena: arena, logger: logger)
        let counters = Counters()
        self.counters = counters
        var initial = NodeState(store: SnapshotStore(
            budgetBytes: configuration.memoryBudgetBytes, snapshotsKeptPerJob: configuration.snapshotsKeptPerJob,
            commitsLocally: clusterConfiguration == nil))
        if let clusterConfiguration {
            initial.cluster = try ClusterNode.initialState(
                selfID: configuration.nodeID, cluster: clusterConfiguration, keptStepsPerJob: configuration.snapshotsKeptPerJob)
        }
        SystemdNotifier.notify(["STATUS=recovering the arena in \(configuration.arenaDirectory)", "EXTEND_TIMEOUT_USEC=\(Limits.startupExtensionMicroseconds)"])
        try Self.recoverArena(arena, into: &initial, counters: counters, logger: logger)
        let state = Locked(initial)
        self.state = state
        if let clusterConfiguration, let peerSecret {
            cluster = try ClusterNode(state: state, storeEffects: storeEffects, cluster: clusterConfiguration, selfID: configuration.nodeID, secret: peerSecret, counters: counters, metrics: metrics, logger: logger)
        } else {
            cluster = nil
        }
    }

    static func readSecret(path: String) throws -> [UInt8] {
        guard let secret = Authentication.secret(fromFile: path) else {
            throw ConfigurationError("cannot read secret file \(path)")
        }
        guard secret.count >= 16 else { throw ConfigurationError("secret in \(path) is shorter than 16 bytes") }
        return secret
    }

    // MARK: Lifecycle

    /// Runs until graceful shutdown (SIGTERM/SIGINT through the service group).
    public func run() async throws {
        try start()
        startWatchdog()
        try? await gracefulShutdown()
        SystemdNotifier.notify(["STOPPING=1", "STATUS=stopping: finishing the seals in flight"])
        stop()
    }

    /// Opens the listeners and starts accepting. Separate from `run` so tests
    /// and benchmarks can host a server in-process.
    public func start() throws {
        // The runtime directory (systemd's RuntimeDirectory, or one of our own when run by hand).
        let socketDirectory = (configuration.unixSocketPath as NSString).deletingLastPathComponent
        if !socketDirectory.isEmpty, mkdir(socketDirectory, 0o755) != 0, errno != EEXIST {
            throw IOError("cannot create the directory of unix_socket \(configuration.unixSocketPath)")
        }
        warnIfBudgetExceedsArenaFileSystem()
        let devices = RDMADevices.list()
        let transport = try TransportSelection.decide(configuration.transport, devices: devices)
        logger.notice("\(transport.logLine)")
        if let flushDirectory = configuration.flushDirectory {
            // A durable tier that cannot be written must fail at start, not at the first flush.
            try DurableFiles.createDirectory(flushDirectory)
            guard access(flushDirectory, W_OK | X_OK) == 0 else {
                throw ConfigurationError("flush_directory \(flushDirectory) is not writable by this daemon (uid \(getuid()))")
            }
        }
        let unix = try Socket.listenUnix(path: configuration.unixSocketPath, mode: 0o660)
        var opened = [(unix, false)]
        var metricsListener: Socket?
        do {
            if let listen = configuration.tcpListen {
                let (host, port) = try DaemonConfiguration.parseHostPort(listen)
                let tcp = try Socket.listenTCP(host: host, port: port)
                boundPort.withLock { $0 = tcp.localPort() }
                opened.append((tcp, true))
            }
            if let listen = configuration.metricsListen {
                let (host, port) = try DaemonConfiguration.parseHostPort(listen, key: "metrics_listen")
                let listener = try Socket.listenTCP(host: host, port: port)
                boundMetricsPortValue.withLock { $0 = listener.localPort() }
                metricsListener = listener
            }
        } catch {
            // Do not leave a socket file behind that no one will ever answer.
            for (listener, _) in opened { listener.close() }
            unlink(configuration.unixSocketPath)
            throw error
        }
        let rdmaListener: RDMAListener?
        do {
            rdmaListener = try listenRDMA(transport)
        } catch {
            for (listener, _) in opened { listener.close() }
            metricsListener?.close()
            unlink(configuration.unixSocketPath)
            throw error
        }
        state.withLock { $0.listeners = opened.map(\.0) + (metricsListener.map { [$0] } ?? []) }
        for (listener, isTCP) in opened {
            Thread.detachNewThread { [self] in acceptLoop(listener, isTCP: isTCP) }
        }
        if let rdmaListener {
            Thread.detachNewThread { [self] in rdmaAcceptLoop(rdmaListener) }
        }
        if let metricsListener {
            Thread.detachNewThread { [self] in serveMetrics(on: metricsListener) }
        }
        if let clusterConfiguration { warnAboutUnreachablePeers(clusterConfiguration) }
        cluster?.start()
        startScrub()
        startFlusher()
        logger.info(
            "snapshotd ready",
            metadata: [
                "node": "\(configuration.nodeID)", "unixSocket": "\(configuration.unixSocketPath)",
                "tcp": "\(Self.boundAddress(configuration.tcpListen, port: boundTCPPort))",
                "metrics": "\(Self.boundAddress(configuration.metricsListen, port: boundMetricsPort))",
                "arena": "\(arena.root)", "budgetBytes": "\(configuration.memoryBudgetBytes)",
                "durableTier": "\(configuration.flushDirectory.map { "\($0) every \(configuration.flushEverySteps) steps / \(configuration.flushIntervalMilliseconds) ms" } ?? "off")",
                "transport": "\(rdmaListener == nil ? "tcp" : "rdma")",
            ])
        SystemdNotifier.notify(["READY=1", "STATUS=\(statusLine())"])
    }

    /// The configured listen address with the port actually bound (port 0 picks one), or "off".
    private static func boundAddress(_ listen: String?, port: UInt16?) -> String {
        guard let listen, let port, let configured = try? HostPort(parsing: listen) else { return "off" }
        return HostPort(host: configured.host, port: port).description
    }

    /// With RDMA chosen, listens for RDMA connections on the TCP listen
    /// address and port (rdma_cm's own port space) and has the peers reached
    /// over RDMA. `auto` falls back to TCP, with one log line, when the
    /// listener cannot be opened; `rdma` fails the start.
    private func listenRDMA(_ transport: TransportSelection.Decision) throws -> RDMAListener? {
        guard transport.used == .rdma else { return nil }
        do {
            guard let listen = configuration.tcpListen, let port = boundTCPPort else {
                throw ConfigurationError("transport = \"\(configuration.transport.rawValue)\" needs tcp_listen: RDMA listens on its address and port")
            }
            let (host, _) = try DaemonConfiguration.parseHostPort(listen)
            let listener: RDMAListener
            do throws(RDMAError) {
                listener = try RDMAListener(address: host, port: port)
            } catch {
                throw ConfigurationError("cannot listen for RDMA on \(host):\(port): \(error)")
            }
            cluster?.mesh.use(configuration.transport)
            logger.notice("listening for RDMA", metadata: ["address": "\(host):\(port)"])
            return listener
        } catch {
            guard configuration.transport == .auto else { throw error }
            logger.warning("transport auto: falling back to TCP for peers and remote clients", metadata: ["reason": "\(error)"])
            return nil
        }
    }

    /// WATCHDOG=1 at half the interval systemd asked for, each beat earned:
    /// this thread sends it only after taking the state lock (no thread holds
    /// it stuck) and, in a cluster, seeing the membership clock tick within
    /// one failure timeout. A daemon wedged on its lock or clock stops beating
    /// and systemd restarts it, which a plain timer would never let happen.
    /// Each beat carries a fresh STATUS line.
    private func startWatchdog() {
        guard let interval = SystemdNotifier.watchdogIntervalSeconds else { return }
        logger.debug("systemd watchdog enabled", metadata: ["intervalSeconds": "\(interval)"])
        let failureTimeout = clusterConfiguration.map(\.failureTimeoutMilliseconds)
        Thread.detachNewThread { [self] in
            var warned = false
            while true {
                let (stopping, lastTick) = state.withLock { ($0.stopping, $0.cluster?.lastClockTickMilliseconds) }
                if stopping { return }
                let clockStuck = failureTimeout.map { timeout in monotonicMilliseconds() - (lastTick ?? 0) > timeout && lastTick != 0 } ?? false
                if clockStuck {
                    if !warned { logger.critical("the membership clock has not ticked for a failure timeout: withholding the systemd watchdog") }
                    warned = true
                } else {
                    warned = false
                    SystemdNotifier.notify(["WATCHDOG=1", "STATUS=\(statusLine())"])
                }
                usleep(useconds_t(min(interval, 3600) * 1_000_000))
            }
        }
    }

    /// One line for systemd's status: what the node holds and, in a cluster, how the cluster stands.
    func statusLine() -> String {
        state.withLock { state in
            let jobs = state.store.jobs.keys.sorted().map { job in "\(job)@\(state.store.latestCommitted(job: job).map(String.init) ?? "-")" }
            var line = "serving \(jobs.count) job(s) [\(jobs.prefix(4).joined(separator: ", "))\(jobs.count > 4 ? ", …" : "")]; "
                + "\(state.store.heldBytes >> 20) MiB held of \(state.store.budgetBytes >> 20) MiB"
            if let cluster = state.cluster {
                line += "; coordinator node \(cluster.monitor.coordinator); dead \(cluster.monitor.deadNodes.sorted()); rebuilding \(cluster.monitor.needsRebuild.sorted())"
            }
            return line
        }
    }

    public func stop() {
        cluster?.stop()
        let open = state.withLock { state in
            state.stopping = true
            return (state.listeners, state.sessions.values.map(\.stream))
        }
        state.broadcast()
        for listener in open.0 {
            listener.shutdownBoth()
            listener.close()
        }
        unlink(configuration.unixSocketPath)
        for session in open.1 { session.shutdownBoth() }
        sealQueue.sync(flags: .barrier) {}  // let sealing in flight finish: its shards become durable
        logger.info("snapshotd stopped", metadata: ["heldBytes": "\(state.withLock { $0.store.heldBytes })"])
    }

    private func acceptLoop(_ listener: Socket, isTCP: Bool) {
        while true {
            let socket: Socket
            do {
                socket = try listener.accept()
            } catch {
                if state.withLock({ $0.stopping }) { return }
                logger.warning("accept failed", metadata: ["error": "\(error)"])
                usleep(useconds_t(Limits.acceptRetryPauseMilliseconds * 1000))
                continue
            }
            serve(socket, transport: isTCP ? .tcp : .unix)
        }
    }

    /// RDMA connections, as TCP ones (the same challenge, slots and
    /// sessions) over an ``RDMAStream``. Wakes every ``Limits/rdmaAcceptWakeMilliseconds`` to see whether to stop.
    private func rdmaAcceptLoop(_ listener: RDMAListener) {
        while !state.withLock({ $0.stopping }) {
            let connection: RDMAConnection?
            do throws(RDMAError) {
                connection = try listener.accept(timeoutMilliseconds: Limits.rdmaAcceptWakeMilliseconds)
            } catch {
                if rdmaAcceptFailureLog.shouldLog(nowMilliseconds: monotonicMilliseconds()) {
                    logger.warning("RDMA accept failed", metadata: ["error": "\(error)"])
                }
                usleep(useconds_t(Limits.acceptRetryPauseMilliseconds * 1000))
                continue
            }
            guard let connection else { continue }
            let peer = connection.peerAddress
            serve(RDMAStream(connection), transport: .rdma, remote: peer)
        }
    }

    /// Admits a new connection to its pool and serves it on a thread of its own.
    private func serve(_ stream: any ByteStream, transport: SessionTransport, remote: String? = nil) {
        let slot: ConnectionSlot = transport == .unix ? .local : .handshake
        let limit = transport == .unix ? configuration.maximumConnections : Limits.maximumHandshakes
        guard let (id, evicted) = state.withLock({ $0.admit(stream, to: slot, limit: limit) }) else {
            let reason = "snapshotd has \(limit) \(transport == .unix ? "local" : "pending remote") sessions, the maximum; try again later"
            if transport == .rdma {
                // Its handshake finishes on first use: not on the accepting thread.
                Thread.detachNewThread { [self] in refuse(stream, reason, graceMilliseconds: Limits.rdmaRefusalGraceMilliseconds) }
            } else {
                refuse(stream, reason)
            }
            return
        }
        if let evicted {
            counters.increment(.handshakesEvicted)
            evicted.shutdownBoth()  // its thread's read fails at once and the session ends
        }
        Thread.detachNewThread { [self] in
            let session = Session(
                server: self, id: id, connection: FramedConnection(stream: stream, frameTimeoutMilliseconds: configuration.frameTimeoutMilliseconds), transport: transport)
            if let remote { session.logger[metadataKey: "remote"] = "\(remote)" }
            session.serve()
            endSession(id)
            stream.close()
        }
    }

    /// Answers `tooManyConnections` (without waiting on the client) and closes.
    /// `graceMilliseconds`: how long the reply may take (0 for a socket: its buffer takes it or it is dropped).
    private func refuse(_ socket: any ByteStream, _ reason: String, graceMilliseconds: Int64 = 0) {
        counters.increment(.connectionsRefused)
        if refusalLog.shouldLog(nowMilliseconds: monotonicMilliseconds()) {
            logger.warning("refusing connection: slots full", metadata: ["reason": "\(reason)", "refusedSoFar": "\(counters.value(.connectionsRefused))"])
        }
        try? socket.writeAll(Frame.encode(.error(ErrorReply(code: .tooManyConnections, message: reason)), requestID: 0), deadlineMilliseconds: monotonicMilliseconds() + graceMilliseconds)
        socket.close()
    }

    /// An authenticated TCP session moves from a handshake slot to a remote
    /// one; false (and the caller ends the session) when those are full.
    func promoteToRemote(_ id: SessionID) -> Bool {
        state.withLock { state in
            guard state.sessionCount(.remote) < configuration.maximumConnections else { return false }
            state.sessions[id]?.slot = .remote
            return true
        }
    }

    private func endSession(_ id: SessionID) {
        state.withLock { state in
            state.sessions[id] = nil
            apply(state.store.detach(session: id), to: &state)
        }
    }

    /// A budget the arena's file system cannot hold would fail saves late
    /// (ENOSPC at fallocate) instead of at the budget check: say so at start.
    private func warnIfBudgetExceedsArenaFileSystem() {
        var info = statvfs()
        guard statvfs(arena.root, &info) == 0 else { return }
        let (capacity, overflow) = UInt64(info.f_blocks).multipliedReportingOverflow(by: UInt64(info.f_frsize))
        guard !overflow, capacity < configuration.memoryBudgetBytes else { return }
        logger.warning("memory_budget exceeds the arena's file system: saves will fail with overBudget (no space) before the budget is reached", metadata: [
            "budgetBytes": "\(configuration.memoryBudgetBytes)", "fileSystemBytes": "\(capacity)", "arena": "\(arena.root)",
        ])
    }

    /// Unreachable peers are worth a warning at start, not an error: they may
    /// simply start later.
    private func warnAboutUnreachablePeers(_ cluster: ClusterConfiguration) {
        Thread.detachNewThread { [logger, configuration] in
            for node in cluster.nodes where node.id != configuration.nodeID {
                if let socket = try? Socket.connectTCP(host: node.host, port: node.port, timeoutMilliseconds: Limits.startupPeerProbeMilliseconds) {
                    socket.close()
                } else {
                    logger.warning("peer not reachable yet", metadata: ["peer": "\(node.id)", "address": "\(node.address)"])
                }
            }
        }
    }

    // MARK: Restart

    /// Re-attaches to every committed step in the arena and verifies it.
    /// Re-attaches every committed step in the arena, checking each shard's
    /// tensors and each parity fragment against their sealed CRCs. A bad
    /// file is quarantined (set aside, logged, counted), never deleted, and
    /// costs nothing else: on a single node the step's other shards are
    /// served. In a cluster a node's share of a step is rebuilt whole, so a
    /// step with anything quarantined is set aside entirely (kept on disk)
    /// and rebuilt from the peers once the node has joined.
    private static func recoverArena(_ arena: Arena, into state: inout NodeState, counters: Counters, logger: Logger) throws {
        var steps = 0
        for var found in arena.scan() {
            SystemdNotifier.notify("EXTEND_TIMEOUT_USEC=\(Limits.startupExtensionMicroseconds)")  // each step is CRC-checked: large ones take seconds
            for (rank, shard) in found.shards.sorted(by: { $0.key < $1.key }) {
                let key = ShardKey(job: found.job, step: found.step, rank: rank)
                let segment = try arena.mapSegment(key, sizeBytes: shard.segmentSizeBytes)
                let corrupted = corruptedTensors(shard, in: segment)
                guard corrupted.isEmpty else {
                    counters.increment(.crcFailures)
                    arena.quarantineShard(key, reason: "tensors fail their sealed CRC: \(corrupted.prefix(8).joined(separator: ", "))")
                    found.shards[rank] = nil
                    found.quarantinedRanks.append(rank)
                    continue
                }
                state.segments[key] = segment
            }
            if state.cluster != nil {
                for (stripe, record) in found.parity.sorted(by: { $0.key < $1.key }) {
                    let key = ParityKey(job: found.job, step: found.step, stripe: stripe)
                    let segment = try arena.mapParitySegment(key, sizeBytes: record.segmentSizeBytes)
                    let crc = CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: 0, count: Int(record.fragmentSizeBytes))))
                    guard record.crc32c == nil || record.crc32c == crc else {
                        counters.increment(.crcFailures)
                        arena.quarantine(arena.paritySegmentPath(key), as: "\(found.job)-\(found.step)", reason: "parity stripe \(stripe) fails its sealed CRC")
                        found.parity[stripe] = nil
                        found.quarantinedStripes.append(stripe)
                        continue
                    }
                    state.paritySegments[key] = segment
                }
            }
            let setAside = found.quarantinedRanks.count + found.quarantinedStripes.count
            counters.increment(.quarantinedFiles, by: UInt64(setAside))
            if state.cluster != nil, !found.isComplete {
                for rank in found.shards.keys { state.segments[ShardKey(job: found.job, step: found.step, rank: rank)] = nil }
                for stripe in found.parity.keys { state.paritySegments[ParityKey(job: found.job, step: found.step, stripe: stripe)] = nil }
                arena.quarantine(arena.stepDirectory(found.job, found.step), as: "\(found.job)", reason: "part of this node's share is quarantined; the step is rebuilt from the peers")
                continue
            }
            state.store.adoptCommitted(
                job: found.job, step: found.step, world: found.world, shards: found.shards, parity: state.cluster == nil ? [:] : found.parity)
            steps += 1
        }
        arena.trimPool(toBytes: state.store.freeBytes)
        logger.info("arena recovered", metadata: [
            "committedSteps": "\(steps)", "heldBytes": "\(state.store.heldBytes)", "pooledBytes": "\(arena.pooledBytes)",
            "quarantinedFiles": "\(counters.value(.quarantinedFiles))",
        ])
    }

    // MARK: Applying store decisions (inside state.withLock)

    /// Carries out what the store decided; a share sealed here goes to protection.
    func apply(_ effects: SnapshotStore.Effects, to state: inout NodeState) {
        for (job, step) in storeEffects.apply(effects, to: &state) { cluster?.shareSealed(job: job, step: step, state: &state) }
        if !effects.committed.isEmpty || !effects.freed.isEmpty { self.state.broadcast() }
    }

    // MARK: Sealing

    /// Computes the shard's checksums off the trainer's path, persists its
    /// manifest, and marks it local-complete (which may commit the step).
    /// `commitReceived`: when the commitSave arrived, the start of the
    /// commit latency this seal ends.
    /// `ticket`: the one ``commitSave`` gave this seal (``NodeState/sealTickets``);
    /// a seal whose ticket was replaced by a newer save of the key stops.
    func seal(_ key: ShardKey, ticket: UInt64, clientChecksums: [UInt32]?, commitReceived: ContinuousClock.Instant) {
        sealQueue.async { [self] in
            sealSlots.wait()
            defer { sealSlots.signal() }
            guard let (shard, segment, world) = state.withLock({ state -> (ShardRecord, MappedSegment, UInt32)? in
                guard state.sealTickets[key] == ticket else { return nil }  // a newer save of the key took over
                guard let shard = state.store.jobs[key.job]?.steps[key.step]?[key.rank], shard.state == .sealing,
                    let segment = state.segments[key], let world = state.store.jobs[key.job]?.world
                else {
                    state.sealTickets[key] = nil  // the shard went (its step was dropped): nothing to seal
                    return nil
                }
                return (shard, segment, world)
            }) else { return }
            let started = monotonicMilliseconds()
            let checksums = tensorChecksums(shard, in: segment)
            // One sealer per key writes its manifest and applies its outcome:
            // a replaced seal's late manifest is overwritten by the newer one's.
            sealOwners.withExclusive(key) {
                /// Applies the outcome if this seal still owns the key.
                func finish(_ outcome: (inout NodeState) -> Void) {
                    state.withLock { state in
                        guard state.sealTickets[key] == ticket else { return }
                        state.sealTickets[key] = nil
                        outcome(&state)
                    }
                    state.broadcast()
                }
                guard state.withLock({ $0.sealTickets[key] == ticket }) else { return }
                if let clientChecksums, clientChecksums != checksums {
                    counters.increment(.crcFailures)
                    let bad = zip(shard.specs, zip(checksums, clientChecksums)).filter { $1.0 != $1.1 }.map(\.0.name)
                    logger.error("client checksums do not match the bytes received; shard refused", metadata: ["shard": "\(key)", "tensors": "\(bad)"])
                    finish { $0.store.sealFailed(key: key) }
                    return
                }
                var sealed = shard
                sealed.checksums = checksums
                do {
                    try arena.writeManifest(ManifestFile(key: key, world: world, shard: sealed))
                } catch {
                    logger.error("cannot write manifest; shard not sealed", metadata: ["shard": "\(key)", "error": "\(error)"])
                    finish { $0.store.sealFailed(key: key) }
                    return
                }
                // Observed before the seal is applied: a trainer that sees its step committed sees this save counted.
                metrics.saveCommit.observe(since: commitReceived)
                finish { state in apply(state.store.sealed(key: key, checksums: checksums), to: &state) }
                logger.debug("shard sealed", metadata: ["shard": "\(key)", "bytes": "\(shard.segmentSizeBytes)", "milliseconds": "\(monotonicMilliseconds() - started)"])
            }
        }
    }
}
