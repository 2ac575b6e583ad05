import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol

/// Test helpers over the shared ``LocalCluster`` driver: this build's
/// `snapshotd`, fast failure detection, deterministic tensors.
extension LocalCluster {
    static func forTest(nodes: Int, parity: Int, ranksPerNode: UInt32 = 2, settings extra: [String: String] = [:]) throws -> LocalCluster {
        let settings = ["HEARTBEAT_MS": "100", "FAILURE_MS": "1500", "LOG_LEVEL": "debug", "BUDGET": "1GiB"].merging(extra) { $1 }
        let cluster = try LocalCluster(
            nodes: nodes, parity: parity, ranksPerNode: ranksPerNode, job: try JobID("cluster-job"),
            script: Checkout.clusterScript, snapshotd: Executables.path("snapshotd"), directory: try makeScratchDirectory(),
            settings: settings)
        cluster.keepLogs = ProcessInfo.processInfo.environment["KEEP_CLUSTER_LOGS"] != nil
        return cluster
    }

    static let sizes: [(String, DType, Int)] = [("rng.state", .bytes, 9), ("layers.0.weight", .bfloat16, 1 << 20), ("layers.0.weight.exp_avg", .float32, 300_000)]

    /// Every rank saves `step` and waits for the job-wide commit.
    func saveStep(_ step: Step, sizes: [(String, DType, Int)] = LocalCluster.sizes) throws {
        try concurrently(0..<world) { [self] rank in
            let client = try client(rank: rank)
            try client.save(step: step, tensors: tensors(step: step, rank: rank, sizes: self.sizes(for: rank, base: sizes)))
            try client.waitCommitted(step: step, timeoutMilliseconds: 60_000)
        }
    }

    /// Node 0's ranks carry an extra tensor: nodes hold unequal amounts, which exercises padding.
    func sizes(for rank: Rank, base: [(String, DType, Int)]) -> [(String, DType, Int)] {
        node(of: rank) == 0 ? base + [("extra", .float32, 2 << 20)] : base
    }

    /// Restores `ranks` at `step` and checks every byte.
    func verify(step: Step, ranks: [Rank], sizes: [(String, DType, Int)] = LocalCluster.sizes) throws {
        for rank in ranks {
            let shard = try restore(rank: rank, step: step)
            guard matches(shard, tensors(step: step, rank: rank, sizes: self.sizes(for: rank, base: sizes))) else {
                throw HarnessError("rank \(rank) step \(step) restored different bytes")
            }
        }
    }
}

/// Whether this machine lets a test build what `local-cluster.sh` does with
/// NETNS=1: namespaces, a bridge, veth pairs and token-bucket qdiscs (root
/// with CAP_NET_ADMIN, and those kernel modules).
let networkNamespacesAvailable: Bool = {
    let probe = "snpdprobe\(getpid() % 10_000)"
    let built = shell("ip netns add \(probe) && ip link add \(probe)b type bridge && ip link add \(probe)v type veth peer name \(probe)p"
        + " && tc qdisc add dev \(probe)v root tbf rate 1gbit burst 1mb latency 50ms") == 0
    _ = shell("ip link del \(probe)v; ip link del \(probe)b; ip netns del \(probe)")
    return built
}()

/// Runs a command line quietly; returns its wait status (-1 if it could not start).
func shell(_ command: String) -> Int32 {
    (try? spawnAndWait(["/bin/sh", "-c", command + " >/dev/null 2>&1"])) ?? -1
}

// MARK: Killing at a precise moment, reading the nodes' logs

extension LocalCluster {
    func logPath(_ node: Int) -> String { "\(directory)/node\(node).log" }

    /// kill -9 `node` this instant, straight from its pid file (no script
    /// start-up in between), then lets the script wait until it is gone and
    /// its port is closed, as ``kill(_:)`` does.
    func killNow(_ node: Int) throws {
        let text = try String(contentsOfFile: "\(directory)/node\(node).pid", encoding: .utf8)
        guard let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else {
            throw HarnessError("node \(node) has no pid file to kill it by: '\(text)'")
        }
        Glibc.kill(pid, SIGKILL)
        try kill(node)
    }

    /// Steps of this cluster's job that `node`'s log says `message` about
    /// (e.g. "step committed"). The script appends a replacement's log to the
    /// lost node's, so this covers every daemon that ever ran as `node`.
    func steps(logged message: String, by node: Int) -> Set<Step> {
        Set(log(node).split(separator: "\n").compactMap { line -> Step? in
            guard line.contains(message), logField(line, "job") == "\(job)" else { return nil }
            return logField(line, "step").flatMap { Step($0) }
        })
    }

    /// Every step of the job that any node ever logged as committed.
    func stepsLoggedCommitted() -> Set<Step> {
        (0..<nodes).reduce(into: Set<Step>()) { $0.formUnion(steps(logged: "step committed", by: $1)) }
    }
}

/// The value of `name=value` in a log line (swift-log's stream handler prints
/// metadata as space-separated key=value pairs).
func logField(_ line: some StringProtocol, _ name: String) -> String? {
    line.split(separator: " ").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
}

/// Reads a log file as it grows, so a test can act the moment a line appears.
final class LogFollower {
    let path: String
    private var offset: UInt64
    private var partial = ""

    /// Follows from the file's current end: only lines written from now on count.
    init(path: String) {
        self.path = path
        offset = ((try? FileManager.default.attributesOfItem(atPath: path)[.size]) as? NSNumber)?.uint64Value ?? 0
    }

    /// Lines completed since the last call.
    func newLines() -> [String] {
        guard let handle = FileHandle(forReadingAtPath: path) else { return [] }
        defer { try? handle.close() }
        guard (try? handle.seek(toOffset: offset)) != nil, let data = try? handle.readToEnd(), !data.isEmpty else { return [] }
        offset += UInt64(data.count)
        partial += String(decoding: data, as: UTF8.self)
        var lines = partial.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        partial = lines.removeLast()
        return lines
    }

    /// Polls (every 2 ms) until a new line satisfies `match`; nil after `seconds`.
    func waitForLine(seconds: Double, _ match: (String) -> Bool) -> String? {
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            if let line = newLines().first(where: match) { return line }
            guard Date() < deadline else { return nil }
            usleep(2_000)
        }
    }
}

// MARK: Randomized tests

/// The seed of a randomized test: SNAPSHOTD_TEST_SEED if set, else a fresh
/// one. Printed either way (and tests name it in their failure messages) so a
/// failure can be replayed.
func testSeed(_ test: String) -> UInt64 {
    let seed = environmentInteger("SNAPSHOTD_TEST_SEED").map { UInt64($0) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
    print("[\(test)] seed \(seed) (replay with SNAPSHOTD_TEST_SEED=\(seed))")
    return seed
}

/// A non-negative integer from the environment, for knobs such as round counts.
func environmentInteger(_ name: String) -> Int? {
    ProcessInfo.processInfo.environment[name].flatMap { Int($0) }.flatMap { $0 >= 0 ? $0 : nil }
}

/// A value shared between test threads.
final class Shared<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    init(_ value: Value) { stored = value }
    var value: Value { lock.withLock { stored } }
    func update<R>(_ body: (inout Value) -> R) -> R { lock.withLock { body(&stored) } }
}

/// Runs `body` on a thread of its own; the returned semaphore is signalled when it ends.
func inBackground(_ body: @escaping @Sendable () -> Void) -> DispatchSemaphore {
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        defer { done.signal() }
        body()
    }
    return done
}
