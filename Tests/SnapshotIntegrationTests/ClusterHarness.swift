import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol

/// Test helpers over the shared ``LocalCluster`` driver: this build's
/// `snapshotd`, fast failure detection, deterministic tensors.
extension LocalCluster {
    static func forTest(nodes: Int, parity: Int, ranksPerNode: UInt32 = 2) throws -> LocalCluster {
        let cluster = try LocalCluster(
            nodes: nodes, parity: parity, ranksPerNode: ranksPerNode, job: try JobID("cluster-job"),
            script: Checkout.clusterScript, snapshotd: Executables.path("snapshotd"), directory: try makeScratchDirectory(),
            settings: ["HEARTBEAT_MS": "100", "FAILURE_MS": "1500", "LOG_LEVEL": "debug", "BUDGET": "1GiB"])
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
