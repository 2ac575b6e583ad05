import ArgumentParser
import Foundation
import SnapshotClient
import SnapshotIO
import SnapshotDaemon
import SnapshotProtocol

@main
struct SnapshotctlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshotctl",
        abstract: "Operator CLI for snapshotd.",
        version: "0.1.0",
        subcommands: [Status.self, Jobs.self, Snapshots.self, Recover.self])
}

/// How to reach the daemon, shared by every subcommand.
struct DaemonOptions: ParsableArguments {
    @Option(help: "Unix socket of the local snapshotd (default: the one in --config, else $SNAPSHOTD_SOCKET, else /run/snapshotd/snapshotd.sock).") var socket: String?
    @Option(help: "The daemon's configuration file: its unix_socket is used.") var config: String?
    @Option(help: "host:port of a snapshotd over TCP (instead of --socket).") var tcp: String?
    @Option(help: "Shared secret file for TCP.") var secretFile = "/etc/snapshotd/secret"
    @Flag(help: "Machine-readable JSON instead of tables.") var json = false

    /// The daemon's socket, found the way the daemon was started.
    func socketPath() throws -> String {
        if let socket { return socket }
        if let config {
            guard let text = try? String(contentsOfFile: config, encoding: .utf8) else { throw ValidationError("cannot read config file \(config)") }
            do {
                return try DaemonConfiguration.load(tomlText: text).unixSocketPath
            } catch {
                throw ValidationError("config file \(config): \(error)")
            }
        }
        return ProcessInfo.processInfo.environment["SNAPSHOTD_SOCKET"] ?? DaemonConfiguration().unixSocketPath
    }

    func connect(replyTimeoutMilliseconds: Int64 = 60_000) throws -> OperatorClient {
        let socket = try socketPath()
        do {
            guard let tcp else {
                guard FileManager.default.fileExists(atPath: socket) else {
                    throw CLIError(description: "no snapshotd socket at \(socket): is snapshotd running? (pass --socket, or --config with the daemon's config file)")
                }
                return try OperatorClient(endpoint: .unix(path: socket), replyTimeoutMilliseconds: replyTimeoutMilliseconds)
            }
            let parts = tcp.split(separator: ":")
            guard parts.count == 2, let port = UInt16(parts[1]) else { throw ValidationError("--tcp takes host:port") }
            guard let secret = Authentication.secret(fromFile: secretFile) else {
                throw ValidationError("cannot read the shared secret file \(secretFile)")
            }
            return try OperatorClient(endpoint: .tcp(host: String(parts[0]), port: port, secret: secret), replyTimeoutMilliseconds: replyTimeoutMilliseconds)
        } catch let error as ValidationError {
            throw error
        } catch let error as CLIError {
            throw error
        } catch {
            throw CLIError(description: "cannot reach snapshotd at \(tcp ?? socket): \(error)")
        }
    }

    func emit<T: Encodable>(_ value: T, table: () -> String) throws {
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(value), as: UTF8.self))
        } else {
            print(table(), terminator: "")
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The daemon's node, memory and jobs at a glance.")
    @OptionGroup var daemon: DaemonOptions

    struct Output: Encodable {
        let node: UInt32, version: String, budgetBytes: UInt64, usedBytes: UInt64, jobs: Int
        let counters: [String: UInt64]
    }

    func run() throws {
        let status = try daemon.connect().status()
        let output = Output(
            node: status.nodeID, version: status.daemonVersion, budgetBytes: status.budgetBytes, usedBytes: status.usedBytes, jobs: status.jobs.count,
            counters: Dictionary(status.counters.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 }))
        try daemon.emit(output) {
            let percent = status.budgetBytes == 0 ? 0 : Double(status.usedBytes) * 100 / Double(status.budgetBytes)
            let summary = Table(["node", "version", "memory used", "budget", "used %", "jobs"], [[
                "\(status.nodeID)", status.daemonVersion, bytes(status.usedBytes), bytes(status.budgetBytes),
                String(format: "%.1f", percent), "\(status.jobs.count)",
            ]]).render()
            let events = status.counters.filter { $0.value > 0 }
            guard !events.isEmpty else { return summary }
            return summary + "\n" + Table(["event", "count"], events.map { [$0.name, "\($0.value)"] }).render()
        }
    }
}

struct Jobs: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Jobs with snapshots on this daemon.")
    @OptionGroup var daemon: DaemonOptions

    struct Output: Encodable {
        let job: String, world: UInt32, connectedRanks: UInt32, latestCommitted: UInt64?, stepsHeld: Int, bytes: UInt64
    }

    func run() throws {
        let jobs = try daemon.connect().status().jobs.map { job in
            Output(
                job: job.job.rawValue, world: job.world, connectedRanks: job.localRanks,
                latestCommitted: job.steps.filter(\.committed).map(\.step).max(), stepsHeld: job.steps.count,
                bytes: job.steps.reduce(0) { $0 + $1.bytes })
        }
        try daemon.emit(jobs) {
            Table(["job", "world", "connected", "latest committed", "steps held", "memory"], jobs.map {
                [$0.job, "\($0.world)", "\($0.connectedRanks)", $0.latestCommitted.map(String.init) ?? "none", "\($0.stepsHeld)", bytes($0.bytes)]
            }).render()
        }
    }
}

struct Snapshots: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Steps held, per job, and whether each is committed.")
    @OptionGroup var daemon: DaemonOptions
    @Option(help: "Only this job.") var job: String?

    struct Output: Encodable {
        let job: String, step: UInt64, committed: Bool, completeRanks: UInt32, world: UInt32, bytes: UInt64
    }

    func run() throws {
        let filter = try job.map { try JobID($0) }
        let rows = try daemon.connect().status(job: filter).jobs.flatMap { job in
            job.steps.map { Output(job: job.job.rawValue, step: $0.step, committed: $0.committed, completeRanks: $0.completeRanks, world: job.world, bytes: $0.bytes) }
        }
        try daemon.emit(rows) {
            Table(["job", "step", "state", "ranks complete", "memory"], rows.map {
                [$0.job, "\($0.step)", $0.committed ? "committed" : "in progress", "\($0.completeRanks)/\($0.world)", bytes($0.bytes)]
            }).render()
        }
    }
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "What the cluster has lost and what can be restored.",
        discussion: """
            Rebuilds run automatically: a replacement node started with the lost node's id \
            (same address, empty arena) is ordered by the coordinator to rebuild from its \
            group's survivors. With --wait, this command follows until no node is rebuilding \
            and exits 0 only if every job's newest committed step is fully restorable.

            Beyond a group's tolerance, the report says whether CheckFree can rebuild the lost \
            pipeline stages approximately from their neighbours. --checkfree --job J does it \
            (exit 0; 3 with the reason when CheckFree refuses): the rebuilt ranks restore with \
            an approximate flag, fresh optimizer state and a recommended learning-rate factor.
            """)
    @OptionGroup var daemon: DaemonOptions
    @Flag(help: "Wait until no node is dead or rebuilding (or the loss is beyond tolerance).") var wait = false
    @Option(help: "Give up waiting after this many seconds.") var timeout: Double = 600
    @Flag(help: "Rebuild --job's lost pipeline stages approximately from their neighbours (CheckFree).") var checkfree = false
    @Option(help: "The job for --checkfree.") var job: String?

    struct Output: Encodable {
        let coordinator: UInt32, deadNodes: [UInt32], rebuildingNodes: [UInt32], jobs: [Job]
        struct Job: Encodable {
            let job: String, latestCommitted: UInt64?, newestRestorable: UInt64?, lostRanks: [UInt32], summary: String, checkFree: String
        }
    }

    struct CheckFreeOutput: Encodable {
        let job: String, step: UInt64, ranks: [Rank], summary: String
        struct Rank: Encodable {
            let rank: UInt32, stage: UInt32, node: UInt32, method: String, sourceStages: [UInt32], sourceRanks: [UInt32], weights: [Double]
            let sourceStep: UInt64, optimizerReset: Bool, learningRateFactor: Double
        }
    }

    func validate() throws {
        if checkfree && job == nil { throw ValidationError("--checkfree needs --job") }
        guard timeout.isFinite, timeout > 0, timeout <= 86_400 else { throw ValidationError("--timeout must be between 0 and 86400 seconds") }
        if checkfree && wait { throw ValidationError("--checkfree and --wait do not go together: wait first, then rebuild") }
        if let job, (try? JobID(job)) == nil { throw ValidationError("--job '\(job)' is not a valid job id") }
    }

    func run() throws {
        if checkfree { return try runCheckFree() }
        let client = try daemon.connect()
        let deadline = Date().addingTimeInterval(timeout)
        var report = try client.recover()
        while wait, !(report.deadNodes.isEmpty && report.rebuildingNodes.isEmpty), report.jobs.allSatisfy(\.lostRanks.isEmpty), Date() < deadline {
            if !daemon.json {
                FileHandle.standardError.write(Data("waiting: dead \(report.deadNodes), rebuilding \(report.rebuildingNodes)\n".utf8))
            }
            Thread.sleep(forTimeInterval: 0.5)
            report = try client.recover()
        }
        let output = Output(
            coordinator: report.coordinator, deadNodes: report.deadNodes, rebuildingNodes: report.rebuildingNodes,
            jobs: report.jobs.map {
                .init(job: $0.job.rawValue, latestCommitted: $0.latestCommitted, newestRestorable: $0.newestRestorable, lostRanks: $0.lostRanks, summary: $0.summary, checkFree: $0.checkFree)
            })
        try daemon.emit(output) {
            "coordinator: node \(report.coordinator); dead: \(report.deadNodes); rebuilding: \(report.rebuildingNodes)\n"
                + Table(["job", "latest committed", "newest restorable", "lost ranks", "summary"], output.jobs.map {
                    [$0.job, $0.latestCommitted.map(String.init) ?? "none", $0.newestRestorable.map(String.init) ?? "none",
                     $0.lostRanks.isEmpty ? "-" : $0.lostRanks.map(String.init).joined(separator: ","), $0.summary]
                }).render()
                + output.jobs.filter { !$0.checkFree.isEmpty }.map { "\($0.job): \($0.checkFree)\n" }.joined()
        }
        let healthy = report.jobs.allSatisfy { $0.lostRanks.isEmpty && $0.newestRestorable == $0.latestCommitted }
        if !healthy || (wait && !(report.deadNodes.isEmpty && report.rebuildingNodes.isEmpty)) { throw ExitCode(2) }
    }
}

extension Recover {
    /// `recover --checkfree --job J`: the rebuild can move and average whole
    /// stages, so the reply may take long to start.
    func runCheckFree() throws {
        let client = try daemon.connect(replyTimeoutMilliseconds: Int64(timeout * 1000))
        let reply: CheckFreeReply
        do {
            reply = try client.checkFree(job: try JobID(job!))
        } catch let error as SnapshotClientError where error.code == .unrecoverable || error.code == .invalidRequest || error.code == .unknownStep {
            FileHandle.standardError.write(Data("Error: \(error.message)\n".utf8))
            throw ExitCode(3)
        }
        let output = CheckFreeOutput(job: reply.job.rawValue, step: reply.step, ranks: reply.ranks.map { r in
            let c = r.reconstruction
            return .init(
                rank: r.rank, stage: r.stage, node: r.node, method: "\(c.method)", sourceStages: c.sourceStages, sourceRanks: c.sourceRanks,
                weights: c.weights, sourceStep: c.sourceStep, optimizerReset: c.optimizerReset, learningRateFactor: c.learningRateFactor)
        }, summary: reply.summary)
        try daemon.emit(output) {
            "CheckFree rebuilt step \(reply.step) of \(reply.job) approximately\n"
                + Table(["rank", "stage", "node", "method", "from stages", "from ranks", "weights", "optimizer", "learning rate"], output.ranks.map {
                    ["\($0.rank)", "\($0.stage)", "\($0.node)", $0.method, $0.sourceStages.map(String.init).joined(separator: ","),
                     $0.sourceRanks.map(String.init).joined(separator: ","), $0.weights.map { String(format: "%.4f", $0) }.joined(separator: ","),
                     $0.optimizerReset ? "reset" : "kept", "×\($0.learningRateFactor)"]
                }).render()
                + reply.summary + "\n"
        }
    }
}

/// A runtime failure: printed as "Error: …" without the usage text.
struct CLIError: Error, CustomStringConvertible {
    let description: String
}

/// A plain aligned text table.
struct Table {
    let headers: [String]
    let rows: [[String]]

    init(_ headers: [String], _ rows: [[String]]) {
        self.headers = headers
        self.rows = rows
    }

    func render() -> String {
        let widths = headers.indices.map { column in ([headers] + rows).map { $0[column].count }.max() ?? 0 }
        func line(_ cells: [String]) -> String {
            zip(cells, widths).map { $0 + String(repeating: " ", count: $1 - $0.count) }.joined(separator: "  ") + "\n"
        }
        return line(headers) + rows.map(line).joined()
    }
}

func bytes(_ count: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(count)
    var unit = 0
    while value >= 1024, unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(count) B" : String(format: "%.1f %@", value, units[unit])
}
