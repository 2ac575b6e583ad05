import Foundation
import LocalCluster
import SnapshotClient
import SnapshotProtocol
import Testing

/// Manifests at the scale of an LLM shard. A node's readiness report carries
/// its ranks' manifests, and the cluster state a replacement learns from
/// carries every node's: at 16,384 tensors per rank with long names they are
/// far past the 8 MiB control-payload limit (the survivors used to trap
/// building the reply, and the job was lost on one ordinary replacement).
///
/// CI runs the size the trap was seen at (3 nodes RS(2,1), 4 ranks per node);
/// the full acceptance run is
/// `SNAPSHOTD_SCALE_NODES=6 SNAPSHOTD_SCALE_PARITY=2 SNAPSHOTD_SCALE_RANKS=8 SNAPSHOTD_SCALE_STEPS=3 swift test --filter ScaleTests`.
@Suite("Scale: LLM-sized manifests, many nodes", .serialized)
struct ScaleTests {
    static let nodes = environmentInteger("SNAPSHOTD_SCALE_NODES") ?? 3
    static let parity = environmentInteger("SNAPSHOTD_SCALE_PARITY") ?? 1
    static let ranksPerNode = environmentInteger("SNAPSHOTD_SCALE_RANKS") ?? 4
    static let steps = environmentInteger("SNAPSHOTD_SCALE_STEPS") ?? 2
    static let tensorsPerRank = ProtocolLimits.maximumTensorsPerShard

    /// 16,384 tensors with 200-byte names (`model.layers.<i>.…` padded), 32 bytes each.
    static let sizes: [(String, DType, Int)] = (0..<tensorsPerRank).map { index in
        let stem = "model.layers.\(index / 64).self_attn.q_proj.weight.\(index % 64).exp_avg_sq."
        return (stem + String(repeating: "x", count: 200 - stem.utf8.count), DType.float32, 32)
    }

    @Test func llmSizedManifestsSurviveReplacingAsManyNodesAsTheGroupTolerates() throws {
        let cluster = try LocalCluster.forTest(
            nodes: Self.nodes, parity: Self.parity, ranksPerNode: UInt32(Self.ranksPerNode), settings: ["KEEP": "\(Self.steps)", "BUDGET": "2GiB"])
        for step in 1...Step(Self.steps) {
            try concurrently(0..<cluster.world) { rank in
                let client = try cluster.client(rank: rank)
                try client.save(step: step, tensors: tensors(step: step, rank: rank, sizes: Self.sizes))
                try client.waitCommitted(step: step, timeoutMilliseconds: 120_000)
            }
        }
        let lost = Array(1...Self.parity)
        for node in lost { try cluster.killNow(node) }
        for node in lost { try cluster.replace(node) }
        try cluster.waitUntilRebuilt(lost, observer: 0, seconds: 300)
        for step in 1...Step(Self.steps) {
            for rank in 0..<cluster.world {
                let shard = try cluster.restore(rank: rank, step: step)
                #expect(matches(shard, tensors(step: step, rank: rank, sizes: Self.sizes)), "rank \(rank) step \(step)")
            }
        }
        // No daemon died building or reading a large message.
        for node in 0..<Self.nodes {
            #expect(try cluster.operatorClient(node).status().nodeID == NodeID(node))
        }
    }

    /// Many nodes, small shards: 16 nodes in one RS(14, 2) group (every node
    /// heartbeats 15 peers from threads of its own), two lost and replaced,
    /// every rank restored byte-identical, no node ever declared dead but
    /// the two. (A 3 s failure timeout: 16 debug-build daemons share 2 cores.)
    @Test func sixteenNodesLoseTwoAndRebuild() throws {
        let cluster = try LocalCluster.forTest(nodes: 16, parity: 2, ranksPerNode: 1, settings: ["BUDGET": "256MiB", "FAILURE_MS": "3000"])
        let small: [(String, DType, Int)] = [("rng.state", .bytes, 16), ("layers.0.weight", .bfloat16, 64 << 10)]
        try cluster.saveStep(1, sizes: small)
        try cluster.saveStep(2, sizes: small)
        let lost = [3, 11]
        for node in lost { try cluster.killNow(node) }
        try cluster.waitForReport(from: 0, seconds: 60) { $0.deadNodes == lost.map { NodeID($0) } }
        for node in lost { try cluster.replace(node) }
        try cluster.waitUntilRebuilt(lost, observer: 0, seconds: 120)
        try cluster.verify(step: 2, ranks: Array(0..<cluster.world), sizes: small)
        for node in 0..<16 where !lost.contains(node) {
            #expect(try cluster.operatorClient(node).status().counter("peers_declared_dead") == UInt64(lost.count), "node \(node)")
        }
    }
}
