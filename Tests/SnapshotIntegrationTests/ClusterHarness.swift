import Foundation
import Glibc
import SnapshotClient
import SnapshotIO
import SnapshotProtocol

/// A real multi-node cluster on loopback, through `deploy/local-cluster.sh`
/// (the same script operators use), running this build's `snapshotd`.
final class LocalCluster: @unchecked Sendable {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path + "/deploy/local-cluster.sh"
    let directory: String
    let nodes: Int
    let parity: Int
    let ranksPerNode: UInt32
    let basePort: UInt16
    let job: JobID
    var world: UInt32 { UInt32(nodes) * ranksPerNode }

    init(nodes: Int, parity: Int, ranksPerNode: UInt32 = 2, job: String = "cluster-job") throws {
        directory = try makeScratchDirectory()
        self.nodes = nodes
        self.parity = parity
        self.ranksPerNode = ranksPerNode
        self.job = try JobID(job)
        basePort = UInt16(20_000 + Int.random(in: 0..<20_000) / 16 * 16)
        try run(["start", directory, "\(nodes)", "\(parity)"])
    }

    deinit {
        try? run(["stop", directory])
        if ProcessInfo.processInfo.environment["KEEP_CLUSTER_LOGS"] == nil { try? FileManager.default.removeItem(atPath: directory) }
    }

    /// Runs the script and waits for it alone (posix_spawn + waitpid):
    /// Foundation's Process also waits on the daemons the script leaves running.
    @discardableResult
    func run(_ arguments: [String]) throws -> String {
        let outputPath = directory + "/script-\(UUID().uuidString.prefix(8)).out"
        var environment = ProcessInfo.processInfo.environment
        environment["SNAPSHOTD"] = Executables.path("snapshotd")
        environment["BASE_PORT"] = "\(basePort)"
        environment["HEARTBEAT_MS"] = "100"
        environment["FAILURE_MS"] = "1000"
        environment["LOG_LEVEL"] = "debug"
        environment["BUDGET"] = "1GiB"
        let command = ([Self.script] + arguments).map { "'\($0)'" }.joined(separator: " ") + " > '\(outputPath)' 2>&1 < /dev/null"
        let arguments: [String] = ["/bin/bash", "-c", command]
        let variables: [String] = environment.map { "\($0)=\($1)" }
        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = variables.map { strdup($0) } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/bin/bash", nil, nil, argv, envp)
        guard spawned == 0 else { throw HarnessError("posix_spawn failed: \(spawned)") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let text = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        guard status == 0 else { throw HarnessError("local-cluster.sh \(command) failed (\(status)): \(text)") }
        return text
    }

    func kill(_ node: Int) throws { try run(["kill", directory, "\(node)"]) }
    func replace(_ node: Int) throws { try run(["node", directory, "\(node)", "--fresh"]) }
    func socket(_ node: Int) -> String { "\(directory)/node\(node).sock" }
    func log(_ node: Int) -> String { (try? String(contentsOfFile: "\(directory)/node\(node).log", encoding: .utf8)) ?? "" }

    func node(of rank: Rank) -> Int { Int(rank / ranksPerNode) }
    func ranks(on node: Int) -> [Rank] { (0..<ranksPerNode).map { UInt32(node) * ranksPerNode + $0 } }

    func client(rank: Rank) throws -> SnapshotClient {
        try retrying {
            try SnapshotClient(endpoint: .unix(path: socket(node(of: rank))), job: job, rank: rank, world: world, localWorld: ranksPerNode)
        }
    }

    func operatorClient(_ node: Int) throws -> OperatorClient { try OperatorClient(endpoint: .unix(path: socket(node))) }

    static let sizes: [(String, DType, Int)] = [("rng.state", .bytes, 9), ("layers.0.weight", .bfloat16, 1 << 20), ("layers.0.weight.exp_avg", .float32, 300_000)]

    /// Every rank saves `step` (different sizes per node, to exercise padding) and waits for the job-wide commit.
    func saveStep(_ step: Step, sizes: [(String, DType, Int)] = LocalCluster.sizes) throws {
        try concurrently(0..<world) { [self] rank in
            let client = try client(rank: rank)
            try client.save(step: step, tensors: tensors(step: step, rank: rank, sizes: self.sizes(for: rank, base: sizes)))
            try client.waitCommitted(step: step, timeoutMilliseconds: 60_000)
        }
    }

    func sizes(for rank: Rank, base: [(String, DType, Int)]) -> [(String, DType, Int)] {
        // Node 0's ranks carry an extra tensor: nodes hold unequal amounts.
        node(of: rank) == 0 ? base + [("extra", .float32, 2 << 20)] : base
    }

    /// Waits until this node sees nobody dead or rebuilding.
    func waitUntilHealthy(asSeenBy observer: Int, seconds: Double = 60) throws -> RecoverReply {
        let deadline = Date().addingTimeInterval(seconds)
        var report = try operatorClient(observer).recover()
        while !(report.deadNodes.isEmpty && report.rebuildingNodes.isEmpty) {
            guard Date() < deadline else { throw HarnessError("cluster not healthy after \(seconds) s: \(report)") }
            usleep(100_000)
            report = try operatorClient(observer).recover()
        }
        return report
    }

    /// Restores `ranks` at `step` and checks every byte, retrying while a node rebuilds.
    func verify(step: Step, ranks: [Rank], sizes: [(String, DType, Int)] = LocalCluster.sizes, seconds: Double = 60) throws {
        for rank in ranks {
            let deadline = Date().addingTimeInterval(seconds)
            while true {
                do {
                    let shard = try client(rank: rank).restore(step: step)
                    guard matches(shard, tensors(step: step, rank: rank, sizes: self.sizes(for: rank, base: sizes))) else {
                        throw HarnessError("rank \(rank) step \(step) restored different bytes")
                    }
                    break
                } catch let error as SnapshotClientError where error.code == .unavailable && Date() < deadline {
                    usleep(100_000)
                }
            }
        }
    }
}
