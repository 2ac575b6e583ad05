import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import SnapshotCore
import SnapshotDaemon

/// Thin executable: configuration in, the daemon run under a service group
/// (SIGTERM/SIGINT → graceful stop), logs to stderr (journald picks them up).
@main
struct SnapshotdCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshotd",
        abstract: "In-memory snapshot daemon for distributed training jobs.",
        version: SnapshotServer.version)

    @Option(help: "TOML configuration file; flags override its values.") var config: String?
    @Option(help: "This node's id.") var nodeId: UInt32?
    @Option(help: "Unix socket for local trainers.") var unixSocket: String?
    @Option(help: "TCP listen address host:port for remote clients (needs --shared-secret-file).") var tcpListen: String?
    @Option(help: "Arena directory on a tmpfs.") var arenaDirectory: String?
    @Option(help: "Memory budget, e.g. 64GiB.") var memoryBudget: String?
    @Option(name: [.customLong("snapshots-kept-per-job"), .customLong("keep")], help: "Committed snapshots kept per job.") var snapshotsKeptPerJob: Int?
    @Option(help: "File holding the shared secret remote trainers and operators authenticate with over TCP.") var sharedSecretFile: String?
    @Option(help: "File holding the secret peers (other snapshotd nodes) authenticate with; required with a cluster file.") var peerSecretFile: String?
    @Option(help: "trace, debug, info, notice, warning, error or critical.") var logLevel: String?
    @Option(help: "Cluster file (nodes, addresses, protection groups); omit for a single node.") var clusterFile: String?
    @Option(name: .customLong("max-connections"), help: "Most concurrent client sessions (each is a thread).") var maximumConnections: Int?
    @Option(name: .customLong("frame-timeout-ms"), help: "Once a frame has started, the rest must arrive within this many milliseconds.") var frameTimeoutMilliseconds: Int64?
    @Option(help: "Prometheus endpoint host:port (GET /metrics, unauthenticated: loopback or a management network); port 0 takes a free one, logged at start.") var metricsListen: String?
    @Option(name: .customLong("scrub-interval-ms"), help: "How often every held shard and parity fragment is re-checked against its sealed CRCs (0: never); corrupted ones are healed from peers.") var scrubIntervalMilliseconds: Int64?

    @Option(help: "Peers and remote clients: tcp, rdma, or auto (RDMA where a device is present, else TCP).") var transport: String?
    @Option(help: "Durable tier: write committed steps here in the export format (absolute path).") var flushDirectory: String?
    @Option(help: "Durable tier: flush every N-th committed step.") var flushEverySteps: Int?
    @Option(name: .customLong("flush-interval-ms"), help: "Durable tier: flush the newest committed step when this long has passed since the last flush.") var flushIntervalMilliseconds: Int64?

    func run() async throws {
        let settings: DaemonConfiguration
        do {
            settings = try resolve()
            try settings.validate()
        } catch let error as ConfigurationError {
            throw ValidationError(error.description)
        }
        let level = settings.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var logger = Logger(label: "snapshotd")
        logger[metadataKey: "node"] = "\(settings.nodeID)"
        let server: SnapshotServer
        do {
            server = try SnapshotServer(configuration: settings, logger: logger)
        } catch {
            logger.critical("snapshotd cannot start", metadata: ["error": "\(error)"])
            throw ExitCode.failure
        }
        let group = ServiceGroup(
            configuration: .init(services: [server], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }

    private func resolve() throws -> DaemonConfiguration {
        var settings = DaemonConfiguration()
        if let config {
            guard let text = try? String(contentsOfFile: config, encoding: .utf8) else {
                throw ConfigurationError("cannot read config file \(config)")
            }
            settings = try DaemonConfiguration.load(tomlText: text)
        }
        if let nodeId { settings.nodeID = nodeId }
        if let unixSocket { settings.unixSocketPath = unixSocket }
        if let tcpListen { settings.tcpListen = tcpListen }
        if let arenaDirectory { settings.arenaDirectory = arenaDirectory }
        if let flushDirectory { settings.flushDirectory = flushDirectory }
        if let flushEverySteps { settings.flushEverySteps = flushEverySteps }
        if let flushIntervalMilliseconds { settings.flushIntervalMilliseconds = flushIntervalMilliseconds }
        if let memoryBudget { settings.memoryBudgetBytes = try DaemonConfiguration.parseByteSize(memoryBudget) }
        if let snapshotsKeptPerJob { settings.snapshotsKeptPerJob = snapshotsKeptPerJob }
        if let maximumConnections { settings.maximumConnections = maximumConnections }
        if let frameTimeoutMilliseconds { settings.frameTimeoutMilliseconds = frameTimeoutMilliseconds }
        if let scrubIntervalMilliseconds { settings.scrubIntervalMilliseconds = scrubIntervalMilliseconds }
        if let sharedSecretFile { settings.sharedSecretFile = sharedSecretFile }
        if let peerSecretFile { settings.peerSecretFile = peerSecretFile }
        if let logLevel { settings.logLevel = try DaemonConfiguration.parseLogLevel(logLevel) }
        if let transport { settings.transport = try DaemonConfiguration.parseTransport(transport) }
        if let clusterFile { settings.clusterFile = clusterFile }
        if let metricsListen { settings.metricsListen = metricsListen }
        return settings
    }
}
