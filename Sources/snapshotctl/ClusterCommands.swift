import ArgumentParser
import Foundation
import SnapshotClient
import SnapshotProtocol

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Re-check every CRC across the cluster and compare parity with parity re-encoded from the data.",
        discussion: """
            Every node re-reads what it holds (of --job and --step if given): each committed \
            shard's tensors against their sealed CRCs, each parity fragment against its CRC \
            and against parity decoded again from the other fragments of its stripe. Nothing \
            is healed (the scrub does that); inconsistencies are named by node, job, step and \
            rank, tensor or stripe. Exits 0 when everything checked is consistent and every \
            node answered, 2 otherwise.
            """)
    @OptionGroup var daemon: DaemonOptions
    @Option(help: "Only this job.") var job: String?
    @Option(help: "Only this step.") var step: UInt64?
    @Option(help: "Only this node.") var node: UInt32?
    @Option(help: "Give up after this many seconds.") var timeout: Double = 3600

    struct Output: Encodable {
        let consistent: Bool, nodes: [Node]
        struct Node: Encodable {
            let node: UInt32, answered: Bool, shards: UInt32, parityFragments: UInt32, parityReencoded: UInt32, bytes: UInt64, problems: [String], notes: [String]
        }
    }

    func validate() throws {
        if let job, (try? JobID(job)) == nil { throw ValidationError("--job '\(job)' is not a valid job id") }
        guard timeout.isFinite, timeout > 0, timeout <= 86_400 else { throw ValidationError("--timeout must be between 0 and 86400 seconds") }
    }

    func run() throws {
        let reply = try daemon.connect(replyTimeoutMilliseconds: Int64(timeout * 1000)).verify(job: try job.map { try JobID($0) }, step: step, node: node)
        try Self.report(reply, daemon: daemon)
    }

    /// Prints a verify reply; exits 2 unless everything was checked and consistent.
    static func report(_ reply: VerifyReply, daemon: DaemonOptions) throws {
        let consistent = reply.nodes.allSatisfy { $0.answered && $0.problems.isEmpty }
        let output = Output(consistent: consistent, nodes: reply.nodes.map {
            .init(node: $0.node, answered: $0.answered, shards: $0.shards, parityFragments: $0.parityFragments, parityReencoded: $0.parityReencoded,
                  bytes: $0.bytes, problems: $0.problems, notes: $0.notes)
        })
        try daemon.emit(output) {
            Table(["node", "answered", "shards", "parity", "parity re-encoded", "checked", "problems"], output.nodes.map {
                ["\($0.node)", $0.answered ? "yes" : "no", "\($0.shards)", "\($0.parityFragments)", "\($0.parityReencoded)", bytes($0.bytes), "\($0.problems.count)"]
            }).render()
                + output.nodes.flatMap(\.problems).map { "INCONSISTENT: \($0)\n" }.joined()
                + output.nodes.flatMap(\.notes).map { "not checked: \($0)\n" }.joined()
                + (consistent ? "consistent: every CRC matches and every parity fragment re-encodes\n" : "")
        }
        if !consistent { throw ExitCode(ExitStatus.degraded.rawValue) }
    }
}

struct Drain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop new saves on a node and report when it is safe to stop it.",
        discussion: """
            The node refuses new saves (its trainers get an unavailable error naming the \
            drain); restores and protection go on. It is safe to stop once no save is in \
            flight and its group survives losing it (what is committed stays restorable). \
            --wait follows until then. Exits 0 when safe (or after --cancel), 2 when not yet. \
            A drain lasts until --cancel or the daemon restarts.
            """)
    @OptionGroup var daemon: DaemonOptions
    @Option(help: "The node to drain.") var node: UInt32
    @Flag(help: "Take the node back into service.") var cancel = false
    @Flag(help: "Wait until the node is safe to stop.") var wait = false
    @Option(help: "Give up waiting after this many seconds.") var timeout: Double = 600

    struct Output: Encodable {
        let node: UInt32, draining: Bool, safeToStop: Bool, reason: String
    }

    func validate() throws {
        guard timeout.isFinite, timeout > 0, timeout <= 86_400 else { throw ValidationError("--timeout must be between 0 and 86400 seconds") }
        if cancel && wait { throw ValidationError("--cancel and --wait do not go together") }
    }

    func run() throws {
        let client = try daemon.connect()
        let deadline = Date().addingTimeInterval(timeout)
        var reply = try client.drain(node: node, cancel: cancel)
        while wait, !reply.safeToStop, Date() < deadline {
            if !daemon.json { FileHandle.standardError.write(Data("waiting: \(reply.reason)\n".utf8)) }
            Thread.sleep(forTimeInterval: 0.5)
            reply = try client.drain(node: node)
        }
        let output = Output(node: reply.node, draining: reply.draining, safeToStop: reply.safeToStop, reason: reply.reason)
        try daemon.emit(output) {
            reply.draining
                ? "node \(reply.node) is draining (new saves refused); safe to stop: \(reply.safeToStop ? "yes" : "not yet"): \(reply.reason)\n"
                : "node \(reply.node) takes saves again\n"
        }
        if reply.draining && !reply.safeToStop { throw ExitCode(ExitStatus.degraded.rawValue) }
    }
}

extension Recover {
    /// `recover --node X`: the plan, then the rebuild followed to its end
    /// with progress, then a verify of what X holds.
    func runNode(_ node: UInt32) throws {
        let client = try daemon.connect()
        var plan = try client.rebuildPlan(node: node)
        let total = plan.steps.reduce(UInt64(0)) { $0 + $1.shardBytes + $1.parityBytes }
        if !daemon.json {
            print("rebuild plan for node \(node) (\(plan.state) now): \(plan.steps.count) step(s), \(bytes(total)) to hold, "
                + "\(bytes(plan.steps.reduce(0) { $0 + $1.fetchBytes })) to read from its group")
            print(Table(["job", "step", "ranks", "shards", "parity", "from nodes", "read", "held now"], plan.steps.map {
                ["\($0.job)", "\($0.step)", $0.ranks.map(String.init).joined(separator: ","), bytes($0.shardBytes), bytes($0.parityBytes),
                 $0.sources.map(String.init).joined(separator: ","), bytes($0.fetchBytes), $0.held ? "yes" : "no"]
            }).render(), terminator: "")
        }
        if dryRun {
            if daemon.json { try daemon.emit(NodeOutput(plan: plan, verified: nil)) { "" } }
            return
        }
        let deadline = Date().addingTimeInterval(timeout)
        var progress = Progress(title: "rebuilding node \(node)")
        func done(_ plan: RebuildPlanReply) -> Bool { plan.state == .alive || plan.state == .draining ? plan.steps.allSatisfy(\.held) : false }
        while !done(plan) {
            let held = plan.steps.filter(\.held)
            progress.update(done: held.count, total: plan.steps.count, detail: "steps, \(bytes(held.reduce(0) { $0 + $1.shardBytes + $1.parityBytes })) of \(bytes(total)) (node \(plan.state))")
            let lost = try client.recover().jobs.filter { job in !job.lostRanks.isEmpty && plan.steps.contains { $0.job == job.job && !Set($0.ranks).isDisjoint(with: job.lostRanks) } }
            if let job = lost.first {
                progress.finish()
                throw CLIError("node \(node)'s ranks \(job.lostRanks) of \(job.job) are lost beyond its group's tolerance: \(job.summary)", .unrecoverable)
            }
            guard Date() < deadline else {
                progress.finish()
                throw CLIError(plan.state == .dead
                    ? "node \(node) is still dead after \(Int(timeout)) s: start its replacement (same id, empty arena); the coordinator orders the rebuild"
                    : "node \(node) has not finished rebuilding after \(Int(timeout)) s", .degraded)
            }
            Thread.sleep(forTimeInterval: 0.5)
            plan = try client.rebuildPlan(node: node)
        }
        progress.update(done: plan.steps.count, total: plan.steps.count, detail: "steps, \(bytes(total)) of \(bytes(total)) (node \(plan.state))")
        progress.finish()
        let verified = try client.verify(node: node)
        let line = verified.nodes.first
        if daemon.json {
            try daemon.emit(NodeOutput(plan: plan, verified: line)) { "" }
        } else {
            print("node \(node) rebuilt: \(plan.steps.count) step(s), \(bytes(total)); verified \(line?.shards ?? 0) shard(s) against their CRCs and "
                + "\(line?.parityReencoded ?? 0) of \(line?.parityFragments ?? 0) parity fragment(s) against re-encoded parity: "
                + (line.map { !$0.answered ? "NOT CHECKED" : $0.problems.isEmpty ? "consistent" : "INCONSISTENT" } ?? "NOT CHECKED"))
            for problem in line?.problems ?? [] { print("INCONSISTENT: \(problem)") }
            for note in line?.notes ?? [] { print("not checked: \(note)") }
        }
        guard let line, line.answered, line.problems.isEmpty else { throw ExitCode(ExitStatus.degraded.rawValue) }
    }

    struct NodeOutput: Encodable {
        let node: UInt32, state: String, steps: [Step], verified: Verified?
        struct Step: Encodable {
            let job: String, step: UInt64, ranks: [UInt32], shardBytes: UInt64, parityBytes: UInt64, sources: [UInt32], fetchBytes: UInt64, held: Bool
        }
        struct Verified: Encodable {
            let shards: UInt32, parityFragments: UInt32, parityReencoded: UInt32, bytes: UInt64, problems: [String], notes: [String]
        }

        init(plan: RebuildPlanReply, verified: NodeVerification?) {
            node = plan.node
            state = "\(plan.state)"
            steps = plan.steps.map {
                .init(job: $0.job.rawValue, step: $0.step, ranks: $0.ranks, shardBytes: $0.shardBytes, parityBytes: $0.parityBytes, sources: $0.sources,
                      fetchBytes: $0.fetchBytes, held: $0.held)
            }
            self.verified = verified.map {
                .init(shards: $0.shards, parityFragments: $0.parityFragments, parityReencoded: $0.parityReencoded, bytes: $0.bytes, problems: $0.problems, notes: $0.notes)
            }
        }
    }
}
