import ArgumentParser
import CISALReference
import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol

/// Protection and rebuild on a real local cluster (release snapshotd next to
/// this binary), against iperf3 and ISA-L from C in the same run. With
/// `--netns`, every node has its own network namespace and a link capped at
/// `--link-rate`, so the network, as on real hosts, is the bottleneck rather
/// than one machine's cores and loopback.
struct ClusterBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster", abstract: "Protection throughput, rebuild time and parity memory of a local RS(k,m) cluster.")

    @Option(help: "Nodes in the group.") var nodes = 6
    @Option(help: "Parity fragments.") var parity = 2
    @Option(name: .customLong("shard-mib"), help: "Shard per node (one rank per node), MiB.") var shardMiB = 256
    @Option(help: "Saves measured (after one warm-up).") var saves = 3
    @Flag(help: "One network namespace per node (needs root).") var netns = false
    @Option(help: "With --netns: each node's link rate in each direction (tc syntax; empty: uncapped).") var linkRate = "1gbit"

    func run() throws {
        let snapshotd = Checkout.sibling("snapshotd")
        guard FileManager.default.isExecutableFile(atPath: snapshotd) else { throw ValidationError("build snapshotd in release first: swift build -c release") }
        let k = nodes - parity
        var settings = ["HEARTBEAT_MS": "100", "FAILURE_MS": "1000", "KEEP": "1", "BUDGET": "\(shardMiB * 4 / 1024 + 2)GiB"]
        if netns { settings.merge(["NETNS": "1", "LINK_RATE": linkRate]) { $1 } }
        let cluster = try LocalCluster(
            nodes: nodes, parity: parity, ranksPerNode: 1, job: try JobID("bench"), script: Checkout.clusterScript, snapshotd: snapshotd,
            directory: NSTemporaryDirectory() + "snapshot-bench-cluster-\(getpid())", settings: settings)
        let network = netns ? "one network namespace per node" + (linkRate.isEmpty ? "" : ", links capped at \(linkRate)") : "loopback"
        print("Cluster benchmark: \(nodes) nodes, RS(\(k),\(parity)), one rank of \(shardMiB) MiB per node, \(network), one warm-up + \(saves) saves")

        let protectionSeconds = try measureProtection(cluster)
        let status = try (0..<nodes).map { try cluster.operatorClient($0).status() }
        let dataPerNode = status.map { Double($0.jobs.flatMap(\.steps).reduce(UInt64(0)) { $0 + $1.bytes }) }
        let parityPerNode = zip(status, dataPerNode).map { Double($0.usedBytes) - $1 }
        let largest = dataPerNode.max()!
        let idealParity = Double(parity) / Double(k) * largest

        // References in the same run: iperf3 over the same network (node 1 → node 0), ISA-L from C.
        let iperf = try iperf3(cluster)
        let encodeRate = isalEncodeRate(k: k, m: parity, fragmentBytes: min(Int(largest) / k, 16 << 20))

        // Rebuild one node twice: through survivor chains, then by gathering k fragments.
        let lost = nodes / 2
        let (pipelined, recovery) = try measureRebuild(cluster, node: lost, strategy: "pipelined")
        let (gathered, _) = try measureRebuild(cluster, node: lost, strategy: "gather")
        print("rebuilds of node \(lost): pipelined \(pipelined.pipelinedFragments) chained + \(pipelined.gatheredFragments) gathered fragments in \(format(pipelined.seconds)) s; "
            + "gather \(gathered.pipelinedFragments) chained + \(gathered.gatheredFragments) gathered fragments in \(format(gathered.seconds)) s")

        print("")
        print(padded("figure", 50) + padded("value", 12) + padded("reference", 28) + padded("ratio", 10))
        let protectionRate = largest / protectionSeconds / 1e9
        row("protection per node (data ÷ save→commit)", protectionRate, "GB/s", iperf.map { ("iperf3", $0) })
        row("", protectionRate, "GB/s", ("ISA-L encode", encodeRate), showValue: false)
        // Each node sends m × its data to parity holders.
        let upload = Double(parity) * largest / protectionSeconds / 1e9
        row("protection, fragment upload per node (m·data)", upload, "GB/s", iperf.map { ("iperf3", $0) })
        if !netns {
            // On loopback every node shares this machine's cores: the cluster's total is what iperf3 compares with.
            row("protection, cluster fragment traffic (n·m·data)", Double(nodes) * upload, "GB/s", iperf.map { ("iperf3", $0) })
        }
        if let iperf {
            let ideal = pipelined.bytes / (iperf * 1e9)
            row("rebuild of node \(lost) (\(format(pipelined.bytes / 1_048_576)) MiB), pipelined", pipelined.seconds, "s", ("bytes ÷ iperf3", ideal))
            row("rebuild of node \(lost), gathering k fragments", gathered.seconds, "s", ("bytes ÷ iperf3", ideal))
            row("", gathered.seconds, "s", ("k·bytes ÷ iperf3", Double(k) * ideal), showValue: false)
            row("recovery, replacement start → healthy (pipelined)", recovery, "s", ("bytes ÷ iperf3", ideal))
        }
        for node in 0..<nodes {
            row("parity memory on node \(node)", parityPerNode[node] / 1_048_576, "MiB", ("m/k ideal", idealParity / 1_048_576))
        }
    }

    /// One table row: `value` against a reference in the same unit, and their ratio.
    private func row(_ label: String, _ value: Double, _ unit: String, _ reference: (name: String, value: Double)?, showValue: Bool = true) {
        let shown = showValue ? format(value) + " " + unit : ""
        let referenceText = reference.map { "\($0.name) \(format($0.value)) \(unit)" } ?? ""
        let ratio = reference.map { format(value / $0.value) + "×" } ?? ""
        print(padded(label, 50) + padded(shown, 12) + padded(referenceText, 28) + padded(ratio, 10))
    }

    /// Best time from the moment every save has returned to the job-wide commit.
    private func measureProtection(_ cluster: LocalCluster) throws -> Double {
        let sizes = [16, shardMiB << 19, shardMiB << 19]
        var best = Double.infinity
        for step in 1...UInt64(saves + 1) {
            let states = (0..<cluster.world).map { SyntheticState(seed: 7, rank: $0, step: step, sizes: sizes) }
            defer { states.forEach { $0.deallocate() } }
            let clients = try (0..<cluster.world).map { try cluster.client(rank: $0) }
            try onThreads(clients.count) { try clients[$0].save(step: step, tensors: states[$0].tensors) }
            let start = nowSeconds()
            try onThreads(clients.count) { _ = try clients[$0].waitCommitted(step: step, timeoutMilliseconds: 300_000) }
            if step > 1 { best = min(best, nowSeconds() - start) }
        }
        return best
    }

    private func iperf3(_ cluster: LocalCluster) throws -> Double? {
        guard netns else { return iperf3GigabytesPerSecond() }
        let host = try cluster.peerAddress(0).host
        let script = ["/bin/bash", Checkout.clusterScript, "exec", cluster.directory]
        return iperf3GigabytesPerSecond(address: host, serverPrefix: script + ["0"], clientPrefix: script + ["1"])
    }

    /// Kills `node`, starts its replacement with `strategy`, and returns the
    /// replacement's own account of the rebuild and the time to a healthy cluster.
    private func measureRebuild(_ cluster: LocalCluster, node: Int, strategy: String) throws -> (RebuildReport, Double) {
        try cluster.run(["repair", cluster.directory, strategy])
        try cluster.kill(node)
        let replaced = nowSeconds()
        try cluster.replace(node)
        try cluster.waitUntilRebuilt([node], observer: 0)
        let recovery = nowSeconds() - replaced
        guard let report = cluster.lastRebuild(node) else { throw ValidationError("the replacement logged no completed rebuild") }
        if strategy == "pipelined", report.gatheredFragments > 0 {
            print("note: \(report.gatheredFragments) fragments fell back to gathering (see node \(node)'s log)")
        }
        return (report, recovery)
    }

    private func isalEncodeRate(k: Int, m: Int, fragmentBytes: Int) -> Double {
        let buffers = AlignedBuffers(count: k + m, byteCount: fragmentBytes, seed: 5)
        var pointers = buffers.pointers.map { $0.assumingMemoryBound(to: UInt8.self) as UnsafeMutablePointer<UInt8>? }
        let iterations = max(2, (1 << 30) / (k * fragmentBytes))
        let seconds = pointers.withUnsafeMutableBufferPointer { all in
            bestSeconds(rounds: 3) { isal_reference_encode_seconds(Int32(k), Int32(m), Int32(fragmentBytes), all.baseAddress!, all.baseAddress! + k, Int32(iterations)) }
        }
        return gigabytesPerSecond(bytes: k * fragmentBytes * iterations, seconds: seconds)
    }
}
