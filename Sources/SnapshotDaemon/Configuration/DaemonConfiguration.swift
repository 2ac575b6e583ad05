import Foundation
import Glibc
public import Logging
public import SnapshotProtocol
import TOMLKit
import SnapshotCore

/// Everything `snapshotd` is told, from the TOML file and/or flags (flags win).
public struct DaemonConfiguration: Sendable, Equatable {
    public var nodeID: NodeID = 0
    public var unixSocketPath = "/run/snapshotd/snapshotd.sock"
    /// "host:port" for remote clients; nil: no TCP listener.
    public var tcpListen: String?
    public var arenaDirectory = "/dev/shm/snapshotd"
    public var memoryBudgetBytes: UInt64 = 8 << 30
    public var snapshotsKeptPerJob = 2
    public var sharedSecretFile: String?
    /// The secret peers (other snapshotd nodes) authenticate with; required
    /// in cluster mode and different from `sharedSecretFile`, so a trainer's
    /// secret cannot speak for a node.
    public var peerSecretFile: String?
    public var logLevel: Logger.Level = .info
    /// Bound on concurrent client sessions (each is a thread).
    public var maximumConnections = 1024
    /// A frame, once started, must arrive within this time.
    public var frameTimeoutMilliseconds: Int64 = 30_000
    /// How often the background scrub re-checks every held shard and parity
    /// fragment against its sealed CRCs (0: never). It reads at most
    /// ``Limits/scrubBytesPerSecond``.
    public var scrubIntervalMilliseconds: Int64 = 600_000
    /// The cluster file (nodes, addresses, protection groups). nil: a single
    /// node, whose steps commit when its own shards are sealed.
    public var clusterFile: String?
    /// The durable tier (docs/operations.md, "The durable tier"): committed steps are
    /// written here in the export format, in the background. Off when nil.
    /// A shared file system gives every node the whole step; a local disk
    /// holds this node's ranks.
    public var flushDirectory: String?
    /// Flush every N-th committed step (step % N == 0); 0: not by count.
    public var flushEverySteps = 0
    /// Flush the newest committed step when this long has passed since the
    /// last flush; 0: not by time.
    public var flushIntervalMilliseconds: Int64 = 0
    public var flushBytesPerSecond: UInt64 = 256 << 20
    public var flushKeptSteps = 2
    /// Peers and remote clients: TCP, RDMA, or RDMA where a device is present (`auto`).
    public var transport: TransportMode = .auto
    /// "host:port" (IPv4) of the Prometheus endpoint, `GET /metrics`; nil:
    /// none. Unauthenticated (it names jobs, never data): loopback or a
    /// management network. Port 0 takes a free port (logged at start).
    public var metricsListen: String?

    public init() {}

    static let knownKeys: Set<String> = [
        "node_id", "unix_socket", "tcp_listen", "arena_directory", "memory_budget", "snapshots_kept_per_job",
        "shared_secret_file", "peer_secret_file", "log_level", "max_connections", "frame_timeout_ms", "cluster_file",
        "scrub_interval_ms", "flush_directory", "flush_every_steps", "flush_interval_ms", "flush_bandwidth", "flush_kept_steps",
        "metrics_listen", "transport",
    ]

    /// Reads a TOML file over the defaults. Unknown keys are errors: a typo
    /// must not silently fall back to a default.
    public static func load(tomlText: String, over base: DaemonConfiguration = DaemonConfiguration()) throws -> DaemonConfiguration {
        let table = try TOMLTable(string: tomlText)
        var config = base
        for key in table.keys where !knownKeys.contains(key) {
            throw ConfigurationError("unknown key '\(key)' in config (known: \(knownKeys.sorted().joined(separator: ", ")))")
        }
        if let v = table["node_id"] { config.nodeID = try NodeID(exactly: integer(v, "node_id")).orThrow("node_id out of range") }
        if let v = table["unix_socket"] { config.unixSocketPath = try string(v, "unix_socket") }
        if let v = table["tcp_listen"] { config.tcpListen = try string(v, "tcp_listen") }
        if let v = table["arena_directory"] { config.arenaDirectory = try string(v, "arena_directory") }
        if let v = table["memory_budget"] {
            if let text = v.string {
                config.memoryBudgetBytes = try parseByteSize(text)
            } else {
                let bytes = try integer(v, "memory_budget")
                config.memoryBudgetBytes = try UInt64(exactly: bytes).orThrow("memory_budget = \(bytes) is negative; give a size such as \"64GiB\"")
            }
        }
        if let v = table["snapshots_kept_per_job"] { config.snapshotsKeptPerJob = try integer(v, "snapshots_kept_per_job") }
        if let v = table["shared_secret_file"] { config.sharedSecretFile = try string(v, "shared_secret_file") }
        if let v = table["peer_secret_file"] { config.peerSecretFile = try string(v, "peer_secret_file") }
        if let v = table["log_level"] { config.logLevel = try parseLogLevel(try string(v, "log_level")) }
        if let v = table["max_connections"] { config.maximumConnections = try integer(v, "max_connections") }
        if let v = table["frame_timeout_ms"] { config.frameTimeoutMilliseconds = Int64(try integer(v, "frame_timeout_ms")) }
        if let v = table["scrub_interval_ms"] { config.scrubIntervalMilliseconds = Int64(try integer(v, "scrub_interval_ms")) }
        if let v = table["cluster_file"] { config.clusterFile = try string(v, "cluster_file") }
        if let v = table["flush_directory"] { config.flushDirectory = try string(v, "flush_directory") }
        if let v = table["flush_every_steps"] { config.flushEverySteps = try integer(v, "flush_every_steps") }
        if let v = table["flush_interval_ms"] { config.flushIntervalMilliseconds = Int64(try integer(v, "flush_interval_ms")) }
        if let v = table["flush_bandwidth"] {
            guard let text = v.string else { throw ConfigurationError("flush_bandwidth must be a size per second such as \"256MiB\"") }
            config.flushBytesPerSecond = try parseByteSize(text)
        }
        if let v = table["flush_kept_steps"] { config.flushKeptSteps = try integer(v, "flush_kept_steps") }
        if let v = table["transport"] { config.transport = try parseTransport(try string(v, "transport")) }
        if let v = table["metrics_listen"] { config.metricsListen = try string(v, "metrics_listen") }
        return config
    }

    /// Checks that the configuration can work, with errors that say what to change.
    public func validate() throws {
        try Self.check("snapshots_kept_per_job", snapshotsKeptPerJob, within: Limits.snapshotsKeptPerJob)
        try Self.check("memory_budget", memoryBudgetBytes, within: Limits.memoryBudgetBytes)
        try Self.check("max_connections", maximumConnections, within: Limits.maximumConnections)
        try Self.check("frame_timeout_ms", frameTimeoutMilliseconds, within: Limits.frameTimeoutMilliseconds)
        try Self.check("scrub_interval_ms", scrubIntervalMilliseconds, within: Limits.scrubIntervalMilliseconds)
        try Self.check("flush_every_steps", flushEverySteps, within: Limits.flushEverySteps)
        try Self.check("flush_interval_ms", flushIntervalMilliseconds, within: Limits.flushIntervalMilliseconds)
        try Self.check("flush_bandwidth", flushBytesPerSecond, within: Limits.flushBytesPerSecond)
        try Self.check("flush_kept_steps", flushKeptSteps, within: Limits.flushKeptSteps)
        if let flushDirectory {
            guard flushDirectory.hasPrefix("/") else { throw ConfigurationError("flush_directory = \"\(flushDirectory)\" must be an absolute path") }
            guard flushEverySteps > 0 || flushIntervalMilliseconds > 0 else {
                throw ConfigurationError("flush_directory is set but neither flush_every_steps nor flush_interval_ms is: nothing would ever be flushed")
            }
            // Each node's clock would pick its own step: no step would be whole.
            guard clusterFile == nil || flushIntervalMilliseconds == 0 else {
                throw ConfigurationError("flush_interval_ms works on a single node only: in a cluster every node must flush the same steps, so use flush_every_steps")
            }
        } else if flushEverySteps > 0 || flushIntervalMilliseconds > 0 {
            throw ConfigurationError("flush_every_steps or flush_interval_ms is set but flush_directory is not")
        }
        if clusterFile != nil {
            guard let peerSecretFile else { throw ConfigurationError("cluster_file is set but peer_secret_file is not: peers must authenticate") }
            guard sharedSecretFile != nil else {
                throw ConfigurationError("cluster_file is set but shared_secret_file is not: the node listens on TCP for its peers, and remote clients must authenticate")
            }
            guard peerSecretFile != sharedSecretFile else {
                throw ConfigurationError("peer_secret_file and shared_secret_file are the same file: peers need a secret of their own")
            }
        }
        if let metricsListen {
            let (host, _) = try Self.parseHostPort(metricsListen, key: "metrics_listen")
            // Checked here, not only at bind: a typo must fail at start with the key's name.
            var address = in_addr()
            guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &address) == 1 else {
                throw ConfigurationError("metrics_listen = '\(metricsListen)': '\(host)' is not an IPv4 address (e.g. 127.0.0.1:9464)")
            }
        }
        if let tcpListen {
            _ = try Self.parseHostPort(tcpListen)
            guard sharedSecretFile != nil else {
                throw ConfigurationError("tcp_listen is set but shared_secret_file is not: TCP clients must authenticate")
            }
        }
    }

    private static func check<T: Comparable>(_ key: String, _ value: T, within range: ClosedRange<T>) throws {
        guard range.contains(value) else {
            throw ConfigurationError("\(key) = \(value) is out of range: it must be between \(range.lowerBound) and \(range.upperBound)")
        }
    }

    /// ``HostPort``'s parse, its error as a configuration error naming the key.
    public static func parseHostPort(_ text: String, key: String? = nil) throws -> (host: String, port: UInt16) {
        do {
            let parsed = try HostPort(parsing: text)
            return (parsed.host, parsed.port)
        } catch {
            throw ConfigurationError("\(key.map { "\($0) = " } ?? "")\(error)")
        }
    }

    /// "64GiB", "512MiB", "1.5TiB", "100MB" or a plain byte count.
    public static func parseByteSize(_ text: String) throws -> UInt64 {
        let units: [(String, Double)] = [
            ("TiB", 1099511627776), ("GiB", 1073741824), ("MiB", 1048576), ("KiB", 1024),
            ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1),
        ]
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        for (suffix, factor) in units where trimmed.hasSuffix(suffix) {
            let number = trimmed.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)
            guard let value = Double(number), value >= 0, value * factor < 1.8e19 else { break }
            return UInt64(value * factor)
        }
        guard let bytes = UInt64(trimmed) else { throw ConfigurationError("'\(text)' is not a size (e.g. 64GiB)") }
        return bytes
    }

    public static func parseTransport(_ text: String) throws -> TransportMode {
        guard let mode = TransportMode(rawValue: text) else {
            throw ConfigurationError("transport = \"\(text)\" is not one of \(TransportMode.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", "))")
        }
        return mode
    }

    public static func parseLogLevel(_ text: String) throws -> Logger.Level {
        guard let level = Logger.Level(rawValue: text.lowercased()) else {
            throw ConfigurationError("log level '\(text)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        return level
    }

    private static func string(_ value: any TOMLValueConvertible, _ key: String) throws -> String {
        guard let s = value.string else { throw ConfigurationError("\(key) must be a string") }
        return s
    }

    private static func integer(_ value: any TOMLValueConvertible, _ key: String) throws -> Int {
        guard let i = value.int else { throw ConfigurationError("\(key) must be an integer") }
        return i
    }
}


extension Optional {
    func orThrow(_ message: String) throws -> Wrapped {
        guard let self else { throw ConfigurationError(message) }
        return self
    }
}
