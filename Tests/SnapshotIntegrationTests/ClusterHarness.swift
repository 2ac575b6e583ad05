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
