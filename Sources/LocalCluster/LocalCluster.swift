import Foundation
import Glibc
import SnapshotProtocol
public import SnapshotClient
public import SnapshotProtocol

/// Drives a real multi-node cluster on this machine through
/// `deploy/local-cluster.sh` (the script operators use): each node its own
/// loopback address, port, Unix socket and arena. Used by the demo, the
/// cluster benchmark and the integration tests.
public final class LocalCluster: @unchecked Sendable {
    public let directory: String
    public let nodes: Int
    public let parity: Int
    public let ranksPerNode: UInt32
    public let job: JobID
    public let script: String
    let environment: [String: String]
    public var keepLogs = false
    public var world: UInt32 { UInt32(nodes) * ranksPerNode }

    /// - Parameters:
    ///   - snapshotd: the daemon binary to run.
    ///   - settings: extra environment for the script (HEARTBEAT_MS, BUDGET, …).
    public init(
        nodes: Int, parity: Int, ranksPerNode: UInt32, job: JobID, script: String, snapshotd: String,
        directory: String, settings: [String: String] = [:]
    ) throws {
        self.nodes = nodes
        self.parity = parity
        self.ranksPerNode = ranksPerNode
        self.job = job
        self.script = script
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var environment = ProcessInfo.processInfo.environment
        environment["SNAPSHOTD"] = snapshotd
        environment["BASE_PORT"] = "\(20_000 + Int.random(in: 0..<20_000) / 16 * 16)"
        for (key, value) in settings { environment[key] = value }
        self.environment = environment
        try run(["start", directory, "\(nodes)", "\(parity)"])
    }

    deinit {
        _ = try? run(["stop", directory])
        if !keepLogs { try? FileManager.default.removeItem(atPath: directory) }
    }

    /// Runs the script and waits for it alone (posix_spawn + waitpid):
    /// Foundation's Process would also wait for the daemons it leaves running.
    @discardableResult
    public func run(_ arguments: [String]) throws -> String {
        let outputPath = directory + "/script-\(UUID().uuidString.prefix(8)).out"
        let command = ([script] + arguments).map { "'\($0)'" }.joined(separator: " ") + " > '\(outputPath)' 2>&1 < /dev/null"
        let status = try spawnAndWait(["/bin/bash", "-c", command], environment: environment.map { "\($0)=\($1)" })
        let text = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        unlink(outputPath)
        guard status == 0 else { throw LocalClusterError("local-cluster.sh \(arguments.joined(separator: " ")) failed (\(status)): \(text)") }
        return text
    }

    public func kill(_ node: Int) throws { try run(["kill", directory, "\(node)"]) }
    /// Starts a replacement for `node`: same id and address, empty arena.
    public func replace(_ node: Int) throws { try run(["node", directory, "\(node)", "--fresh"]) }
    public func socket(_ node: Int) -> String { "\(directory)/node\(node).sock" }
    public func log(_ node: Int) -> String { (try? String(contentsOfFile: "\(directory)/node\(node).log", encoding: .utf8)) ?? "" }

    /// Where `node` listens for peers (and remote clients).
    public func peerAddress(_ node: Int) throws -> (host: String, port: UInt16) {
        let text = try run(["address", directory, "\(node)"]).trimmingCharacters(in: .whitespacesAndNewlines)
        guard let address = try? HostPort(parsing: text) else {
            throw LocalClusterError("local-cluster.sh printed no host:port for node \(node): \(text)")
        }
        return (address.host, address.port)
    }

    public func arenaDirectory(_ node: Int) throws -> String {
        try run(["arena", directory, "\(node)"]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A node's own account of its latest completed rebuild, from its log.
    public func lastRebuild(_ node: Int) -> RebuildReport? {
        log(node).split(separator: "\n").last { $0.contains("rebuild complete") }.flatMap { RebuildReport(logLine: String($0)) }
    }

    public func node(of rank: Rank) -> Int { Int(rank / ranksPerNode) }
    public func ranks(on node: Int) -> [Rank] { (0..<ranksPerNode).map { UInt32(node) * ranksPerNode + $0 } }

    /// A trainer session for `rank` on its node, retried while the node still
    /// holds the rank's previous session.
    public func client(rank: Rank, seconds: Double = 10) throws -> SnapshotClient {
        try retrying(while: .duplicateRank, seconds: seconds) {
            try SnapshotClient(endpoint: .unix(path: socket(node(of: rank))), job: job, rank: rank, world: world, localWorld: ranksPerNode)
        }
    }

    public func operatorClient(_ node: Int) throws -> OperatorClient { try OperatorClient(endpoint: .unix(path: socket(node))) }

    /// Polls `observer`'s recovery report until `done` holds.
    @discardableResult
    public func waitForReport(from observer: Int, seconds: Double = 120, until done: (RecoverReply) -> Bool) throws -> RecoverReply {
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            let report = try operatorClient(observer).recover()
            if done(report) { return report }
            guard Date() < deadline else { throw LocalClusterError("gave up after \(seconds) s waiting on node \(observer): \(report)") }
            usleep(50_000)
        }
    }

    /// Waits until `observer` sees nobody dead or rebuilding.
    @discardableResult
    public func waitUntilHealthy(asSeenBy observer: Int, seconds: Double = 120) throws -> RecoverReply {
        try waitForReport(from: observer, seconds: seconds) { $0.deadNodes.isEmpty && $0.rebuildingNodes.isEmpty }
    }

    /// Waits until each replacement says it is rebuilt (it is the authority:
    /// a survivor may not have heard from it yet), then until `observer` agrees.
    public func waitUntilRebuilt(_ replaced: [Int], observer: Int, seconds: Double = 120) throws {
        for node in replaced { try waitUntilHealthy(asSeenBy: node, seconds: seconds) }
        try waitUntilHealthy(asSeenBy: observer, seconds: seconds)
    }

    /// Restores `rank`, retrying while its node joins or rebuilds.
    public func restore(rank: Rank, step: Step?, seconds: Double = 120) throws -> RestoredShard {
        try retrying(while: .unavailable, seconds: seconds) { try client(rank: rank).restore(step: step) }
    }
}

/// Retries `body` while it fails with the daemon error `code` (a rank whose
/// previous session the daemon has not yet closed, a node still rebuilding),
/// up to `seconds`; any other error, or the same one after the deadline, is thrown.
public func retrying<T>(while code: ErrorCode, seconds: Double, _ body: () throws -> T) throws -> T {
    let deadline = Date().addingTimeInterval(seconds)
    while true {
        do {
            return try body()
        } catch let error as SnapshotClientError where error.code == code && Date() < deadline {
            usleep(20_000)
        }
    }
}

public struct LocalClusterError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Where this checkout's files are: the script and the built binaries.
public enum Checkout {
    /// The package root, found from the working directory or this source file.
    public static let root: String = {
        let candidates = [FileManager.default.currentDirectoryPath, URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path]
        return candidates.first { FileManager.default.fileExists(atPath: $0 + "/deploy/local-cluster.sh") } ?? candidates[0]
    }()

    public static var clusterScript: String { root + "/deploy/local-cluster.sh" }

    /// A binary built next to the running executable (same configuration).
    public static func sibling(_ name: String) -> String {
        URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent().path + "/" + name
    }
}

/// Runs `argv` and waits for that process alone (posix_spawn + waitpid);
/// returns its wait status. `environment` nil: this process's own.
public func spawnAndWait(_ argv: [String], environment: [String]? = nil) throws -> Int32 {
    let arguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    let variables: [UnsafeMutablePointer<CChar>?]? = environment.map { $0.map { strdup($0) } + [nil] }
    defer {
        arguments.forEach { free($0) }
        variables?.forEach { free($0) }
    }
    var pid: pid_t = 0
    let spawned = variables.map { posix_spawn(&pid, argv[0], nil, nil, arguments, $0) } ?? posix_spawn(&pid, argv[0], nil, nil, arguments, environ)
    guard spawned == 0 else { throw LocalClusterError("posix_spawn \(argv[0]) failed: \(spawned)") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return status
}

/// The fields of a daemon's "rebuild complete" log line.
public struct RebuildReport: Sendable {
    public let seconds: Double
    public let bytes: Double
    public let pipelinedFragments: Int
    public let gatheredFragments: Int

    init?(logLine: String) {
        func field(_ name: String) -> Double? {
            logLine.split(separator: " ").first { $0.hasPrefix(name + "=") }.flatMap { Double($0.dropFirst(name.count + 1)) }
        }
        guard let seconds = field("seconds"), let bytes = field("bytes"), let pipelined = field("pipelinedFragments"),
            let gathered = field("gatheredFragments")
        else { return nil }
        self.seconds = seconds
        self.bytes = bytes
        pipelinedFragments = Int(pipelined)
        gatheredFragments = Int(gathered)
    }
}
