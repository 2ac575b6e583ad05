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
        discussion: """
            Exit codes: 0 ok; 1 failed (any other error); 2 degraded (nodes dead or \
            rebuilding, or data that is lost but has a fallback); 3 unrecoverable (lost \
            beyond tolerance with nothing to fall back to, or CheckFree refused); \
            4 unreachable (no daemon, wrong secret, no answer in time); 5 not found \
            (unknown job or step); 64 usage (bad flags).
            """,
        version: SnapshotdVersion.string,
        subcommands: [Status.self, Jobs.self, Snapshots.self, Verify.self, Recover.self, Drain.self, Export.self])

    /// Every error ends as one line on stderr and its documented exit code.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let error as CLIError {
            FileHandle.standardError.write(Data("Error: \(error.description)\n".utf8))
            Foundation.exit(error.status.rawValue)
        } catch let error as SnapshotClientError {
            let failure = CLIError(error)
            FileHandle.standardError.write(Data("Error: \(failure.description)\n".utf8))
            Foundation.exit(failure.status.rawValue)
        } catch let error as IOError {
            FileHandle.standardError.write(Data("Error: lost the connection to snapshotd: \(error)\n".utf8))
            Foundation.exit(ExitStatus.unreachable.rawValue)
        } catch {
            exit(withError: error)  // ArgumentParser's own: usage errors 64, --help 0, ExitCode as given
        }
    }
}

/// snapshotctl's exit codes (docs/operations.md, "Exit codes").
enum ExitStatus: Int32 {
    case ok = 0
    case failed = 1
    case degraded = 2
    case unrecoverable = 3
    case unreachable = 4
    case notFound = 5
    case usage = 64
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
                    throw CLIError("no snapshotd socket at \(socket): is snapshotd running? (pass --socket, or --config with the daemon's config file)", .unreachable)
                }
                return try OperatorClient(endpoint: .unix(path: socket), replyTimeoutMilliseconds: replyTimeoutMilliseconds)
            }
            let address: HostPort
            do { address = try HostPort(parsing: tcp) } catch { throw ValidationError("--tcp: \(error)") }
            guard let secret = Authentication.secret(fromFile: secretFile) else {
                throw ValidationError("cannot read the shared secret file \(secretFile)")
            }
            return try OperatorClient(endpoint: .tcp(host: address.host, port: address.port, secret: secret), replyTimeoutMilliseconds: replyTimeoutMilliseconds)
        } catch let error as ValidationError {
            throw error
        } catch let error as CLIError {
            throw error
        } catch let error as SnapshotClientError where error.code == .unauthenticated {
            throw CLIError("snapshotd at \(tcp ?? socket) refused the secret in \(secretFile): \(error.message)", .unreachable)
        } catch {
            throw CLIError("cannot reach snapshotd at \(tcp ?? socket): \(error)", .unreachable)
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
    static let configuration = CommandConfiguration(
        abstract: "Every node (alive, dead, rebuilding, draining), memory, and each group's tolerance left.",
        discussion: "Exits 0 when every node is alive, draining or joining, 2 when one is dead, rebuilding or unreachable, 3 when a group has lost more nodes than it tolerates.")
    @OptionGroup var daemon: DaemonOptions

    struct Output: Encodable {
        let node: UInt32, version: String, budgetBytes: UInt64, usedBytes: UInt64, jobs: Int
        let counters: [String: UInt64]
        let coordinator: UInt32, nodes: [Node], groups: [Group]
        struct Node: Encodable {
            let node: UInt32, state: String, coordinator: Bool, usedBytes: UInt64, budgetBytes: UInt64, quarantinedFiles: UInt64, note: String
        }
        struct Group: Encodable {
            let group: UInt32, nodes: [UInt32], parity: UInt32, lost: [UInt32], unreachable: [UInt32], survivesMore: Int
        }
    }

    func run() throws {
        let client = try daemon.connect()
        let status = try client.status()
        let cluster = try client.clusterStatus()
        let output = Output(
            node: status.nodeID, version: status.daemonVersion, budgetBytes: status.budgetBytes, usedBytes: status.usedBytes, jobs: status.jobs.count,
            counters: Dictionary(status.counters.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 }), coordinator: cluster.coordinator,
            nodes: cluster.nodes.map {
                .init(node: $0.node, state: "\($0.state)", coordinator: $0.isCoordinator, usedBytes: $0.usedBytes, budgetBytes: $0.budgetBytes, quarantinedFiles: $0.quarantinedFiles, note: $0.note)
            },
            groups: cluster.groups.map { .init(group: $0.index, nodes: $0.nodes, parity: $0.parity, lost: $0.lost, unreachable: $0.unreachable, survivesMore: $0.survivesMore) })
        try daemon.emit(output) {
            var text = "asked node \(status.nodeID) (snapshotd \(status.daemonVersion)); coordinator: node \(cluster.coordinator)\n"
            text += Table(["node", "state", "coordinator", "memory used", "budget", "used %", "quarantined files", "note"], output.nodes.map { node in
                let known = node.budgetBytes > 0
                return [
                    "\(node.node)", node.state, node.coordinator ? "yes" : "", known ? bytes(node.usedBytes) : "-", known ? bytes(node.budgetBytes) : "-",
                    known ? String(format: "%.1f", Double(node.usedBytes) * 100 / Double(node.budgetBytes)) : "-", known ? "\(node.quarantinedFiles)" : "-",
                    node.note,
                ]
            }).render()
            if !output.groups.isEmpty {
                text += "\n" + Table(["group", "nodes", "parity", "lost now", "health"], output.groups.map { group in
                    var health = group.survivesMore < 0 ? "BEYOND TOLERANCE: data lost"
                        : "survives \(group.survivesMore) more loss\(group.survivesMore == 1 ? "" : "es")"
                    if !group.unreachable.isEmpty { health += " (nodes \(group.unreachable.map(String.init).joined(separator: ",")) unreachable from here)" }
                    return ["\(group.group)", group.nodes.map(String.init).joined(separator: ","), "\(group.parity)",
                            group.lost.isEmpty ? "-" : group.lost.map(String.init).joined(separator: ","), health]
                }).render()
            }
            let events = status.counters.filter { $0.value > 0 }
            if !events.isEmpty { text += "\nevents on node \(status.nodeID):\n" + Table(["event", "count"], events.map { [$0.name, "\($0.value)"] }).render() }
            return text
        }
        if output.groups.contains(where: { $0.survivesMore < 0 }) { throw ExitCode(ExitStatus.unrecoverable.rawValue) }
        if output.nodes.contains(where: { !["alive", "draining", "joining"].contains($0.state) }) { throw ExitCode(ExitStatus.degraded.rawValue) }
    }
}

struct Jobs: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Jobs with snapshots on this daemon.")
    @OptionGroup var daemon: DaemonOptions

    struct Output: Encodable {
        let job: String, world: UInt32, connectedRanks: UInt32, latestCommitted: UInt64?, newestFlushed: UInt64?, stepsHeld: Int, bytes: UInt64
    }

    func run() throws {
        let jobs = try daemon.connect().status().jobs.map { job in
            Output(
                job: job.job.rawValue, world: job.world, connectedRanks: job.localRanks,
                latestCommitted: job.steps.filter(\.committed).map(\.step).max(), newestFlushed: job.flushedSteps.last, stepsHeld: job.steps.count,
                bytes: job.steps.reduce(0) { $0 + $1.bytes })
        }
        try daemon.emit(jobs) {
            Table(["job", "world", "connected", "latest committed", "newest flushed", "steps held", "memory"], jobs.map {
                [$0.job, "\($0.world)", "\($0.connectedRanks)", $0.latestCommitted.map(String.init) ?? "none", $0.newestFlushed.map(String.init) ?? "none",
                 "\($0.stepsHeld)", bytes($0.bytes)]
            }).render()
        }
    }
}

struct Snapshots: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Steps held, per job: state (receiving, sealing, local-complete, protected, committed, flushed), size and age.",
        discussion: "Steps only the durable tier still has are listed as flushed (durable tier only).")
    @OptionGroup var daemon: DaemonOptions
    @Option(help: "Only this job.") var job: String?

    struct Output: Encodable {
        let job: String, step: UInt64, state: String, committed: Bool, flushed: Bool, inMemory: Bool, completeRanks: UInt32, world: UInt32, bytes: UInt64
        let ageSeconds: UInt64?
    }

    func validate() throws {
        if let job, (try? JobID(job)) == nil { throw ValidationError("--job '\(job)' is not a valid job id") }
    }

    func run() throws {
        let filter = try job.map { try JobID($0) }
        let jobs = try daemon.connect().status(job: filter).jobs
        if let filter, jobs.isEmpty { throw CLIError("this daemon holds no snapshots of job \(filter)", .notFound) }
        let rows = jobs.flatMap { job in
            let held = job.steps.map { step in
                Output(
                    job: job.job.rawValue, step: step.step, state: step.committed && job.flushedSteps.contains(step.step) ? "flushed" : "\(step.phase)",
                    committed: step.committed, flushed: job.flushedSteps.contains(step.step), inMemory: true, completeRanks: step.completeRanks, world: job.world,
                    bytes: step.bytes, ageSeconds: step.ageSeconds)
            }
            // Steps only the durable tier still has.
            let durableOnly = job.flushedSteps.filter { flushed in !job.steps.contains { $0.step == flushed } }.map {
                Output(job: job.job.rawValue, step: $0, state: "flushed", committed: true, flushed: true, inMemory: false, completeRanks: 0, world: job.world, bytes: 0, ageSeconds: nil)
            }
            return (held + durableOnly).sorted { $0.step < $1.step }
        }
        try daemon.emit(rows) {
            Table(["job", "step", "state", "ranks complete here", "memory", "age"], rows.map {
                [$0.job, "\($0.step)", $0.state + ($0.inMemory ? "" : " (durable tier only)"), $0.inMemory ? "\($0.completeRanks)/\($0.world)" : "-", bytes($0.bytes),
                 $0.ageSeconds.map(age) ?? "-"]
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
    @Option(help: "Show this node's rebuild plan, follow the rebuild with progress, then verify what it holds.") var node: UInt32?
    @Flag(help: "With --node: show the plan only.") var dryRun = false

    struct Output: Encodable {
        let coordinator: UInt32, deadNodes: [UInt32], rebuildingNodes: [UInt32], jobs: [Job]
        struct Job: Encodable {
            let job: String, latestCommitted: UInt64?, newestRestorable: UInt64?, newestFlushed: UInt64?, lostRanks: [UInt32], summary: String, checkFree: String
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
        if node != nil && (checkfree || wait) { throw ValidationError("--node follows one node's rebuild; it goes with neither --checkfree nor --wait") }
        if dryRun && node == nil { throw ValidationError("--dry-run needs --node") }
        if let job, (try? JobID(job)) == nil { throw ValidationError("--job '\(job)' is not a valid job id") }
    }

    func run() throws {
        if checkfree { return try runCheckFree() }
        if let node { return try runNode(node) }
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
                .init(
                    job: $0.job.rawValue, latestCommitted: $0.latestCommitted, newestRestorable: $0.newestRestorable, newestFlushed: $0.newestFlushed,
                    lostRanks: $0.lostRanks, summary: $0.summary, checkFree: $0.checkFree)
            })
        try daemon.emit(output) {
            "coordinator: node \(report.coordinator); dead: \(report.deadNodes); rebuilding: \(report.rebuildingNodes)\n"
                + Table(["job", "latest committed", "newest restorable", "newest flushed", "lost ranks", "summary"], output.jobs.map {
                    [$0.job, $0.latestCommitted.map(String.init) ?? "none", $0.newestRestorable.map(String.init) ?? "none", $0.newestFlushed.map(String.init) ?? "none",
                     $0.lostRanks.isEmpty ? "-" : $0.lostRanks.map(String.init).joined(separator: ","), $0.summary]
                }).render()
                + output.jobs.filter { !$0.checkFree.isEmpty }.map { "\($0.job): \($0.checkFree)\n" }.joined()
        }
        // Lost with nothing to fall back to (neither an older restorable step nor the durable tier): 3.
        if report.jobs.contains(where: { !$0.lostRanks.isEmpty && $0.newestRestorable == nil && $0.newestFlushed == nil }) { throw ExitCode(ExitStatus.unrecoverable.rawValue) }
        let healthy = report.jobs.allSatisfy { $0.lostRanks.isEmpty && $0.newestRestorable == $0.latestCommitted }
        if !healthy || (wait && !(report.deadNodes.isEmpty && report.rebuildingNodes.isEmpty)) { throw ExitCode(ExitStatus.degraded.rawValue) }
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
            throw CLIError(error.message, .unrecoverable)  // CheckFree refused, with its reason
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

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a committed step as one safetensors file per rank plus a JSON manifest.",
        discussion: """
            The daemon writes <to>/<job>/step-<step>/ on its own machine: rank-N.safetensors \
            (readable by Python's safetensors and torch without snapshotd), rank-N.json (kinds, \
            exact dtypes, CRC-32C, topology, metadata) and manifest.json. Ranks other nodes \
            hold are fetched from them; every tensor is CRC-checked. The directory must be \
            writable by the daemon's user (snapshotd under systemd). Files appear whole or not \
            at all (temporary name, fsync, rename).
            """)
    @OptionGroup var daemon: DaemonOptions
    @Option(help: "The job to export.") var job: String
    @Option(help: "The committed step (default: the newest).") var step: UInt64?
    @Option(help: "The directory to write into (created if missing).") var to: String

    struct Output: Encodable {
        let job: String, step: UInt64, directory: String, ranks: UInt32, bytes: UInt64
    }

    func validate() throws {
        if (try? JobID(job)) == nil { throw ValidationError("--job '\(job)' is not a valid job id") }
        if to.isEmpty { throw ValidationError("--to needs a directory") }
    }

    func run() throws {
        let directory = to.hasPrefix("/") ? to : FileManager.default.currentDirectoryPath + "/" + to
        let reply = try daemon.connect(replyTimeoutMilliseconds: 3_600_000).export(job: try JobID(job), step: step, directory: (directory as NSString).standardizingPath)
        let output = Output(job: reply.job.rawValue, step: reply.step, directory: reply.directory, ranks: reply.ranks, bytes: reply.bytes)
        try daemon.emit(output) { "exported step \(reply.step) of \(reply.job): \(reply.ranks) rank(s), \(bytes(reply.bytes)) to \(reply.directory)\n" }
    }
}

/// A runtime failure: printed as "Error: …" without the usage text, then
/// the process exits with `status`.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    let status: ExitStatus

    init(_ description: String, _ status: ExitStatus = .failed) {
        self.description = description
        self.status = status
    }

    /// A daemon's refusal, by its error code.
    init(_ error: SnapshotClientError) {
        switch error.code {
        case .unknownStep?, .notCommitted?: self.init(error.message, .notFound)
        case .unrecoverable?: self.init(error.message, .unrecoverable)
        case .timeout?, .shuttingDown?, .unauthenticated?: self.init(error.message, .unreachable)
        // No daemon code: the client's own failure; a lost connection is the daemon gone.
        case nil where error.message.hasPrefix("connection to snapshotd lost"): self.init(error.message, .unreachable)
        // The asked daemon is fine; a peer or a rank is not.
        case .unavailable?: self.init(error.message, .degraded)
        default: self.init(error.message, .failed)
        }
    }
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

/// "42 s", "17 min", "3.2 h", "4.1 d".
func age(_ seconds: UInt64) -> String {
    switch seconds {
    case ..<120: "\(seconds) s"
    case ..<7200: "\(seconds / 60) min"
    case ..<172_800: String(format: "%.1f h", Double(seconds) / 3600)
    default: String(format: "%.1f d", Double(seconds) / 86_400)
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
