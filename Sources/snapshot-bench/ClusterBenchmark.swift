import ArgumentParser
import CISALReference
import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol

/// Protection and rebuild on a real local cluster (release snapshotd next to
/// this binary), against iperf3 loopback and ISA-L from C in the same run.
struct ClusterBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster", abstract: "Protection throughput, rebuild time and parity memory of a local RS(k,m) cluster.")

    @Option(help: "Nodes in the group.") var nodes = 6
    @Option(help: "Parity fragments.") var parity = 2
    @Option(help: "Shard per node (one rank per node), MiB.") var shardMiB = 256
    @Option(help: "Saves measured (after one warm-up).") var saves = 3

    func run() throws {
        let snapshotd = Checkout.sibling("snapshotd")
        guard FileManager.default.isExecutableFile(atPath: snapshotd) else { throw ValidationError("build snapshotd in release first: swift build -c release") }
        let k = nodes - parity
        let cluster = try LocalCluster(
            nodes: nodes, parity: parity, ranksPerNode: 1, job: try JobID("bench"), script: Checkout.clusterScript, snapshotd: snapshotd,
            directory: NSTemporaryDirectory() + "snapshot-bench-cluster-\(getpid())",
            settings: ["HEARTBEAT_MS": "100", "FAILURE_MS": "1000", "KEEP": "1", "BUDGET": "\(shardMiB * 4 / 1024 + 2)GiB"])
        let sizes = [16, shardMiB << 19, shardMiB << 19]
        print("Cluster benchmark: \(nodes) nodes, RS(\(k),\(parity)), one rank of \(shardMiB) MiB per node, one warm-up + \(saves) saves")

        // Protection: from the moment every save has returned to the job-wide commit.
        var protection: [Double] = []
        for step in 1...UInt64(saves + 1) {
            let states = (0..<cluster.world).map { SyntheticState(seed: 7, rank: $0, step: step, sizes: sizes) }
            defer { states.forEach { $0.deallocate() } }
            let clients = try (0..<cluster.world).map { try cluster.client(rank: $0) }
            try onThreads(clients.count) { try clients[$0].save(step: step, tensors: states[$0].tensors) }
            let start = nowSeconds()
            try onThreads(clients.count) { _ = try clients[$0].waitCommitted(step: step, timeoutMilliseconds: 300_000) }
            if step > 1 { protection.append(nowSeconds() - start) }
        }
        let status = try (0..<nodes).map { try cluster.operatorClient($0).status() }
        let dataPerNode = status.map { Double($0.jobs.flatMap(\.steps).reduce(UInt64(0)) { $0 + $1.bytes }) }
        let parityPerNode = zip(status, dataPerNode).map { Double($0.usedBytes) - $1 }
        let largest = dataPerNode.max()!
        let idealParity = Double(parity) / Double(k) * largest
        let protectionRate = largest / protection.min()! / 1e9

        // References in the same run.
        let iperf = iperf3GigabytesPerSecond()
        let fragmentBytes = Int(largest) / k
        let encodeRate = isalEncodeRate(k: k, m: parity, fragmentBytes: min(fragmentBytes, 16 << 20))

        // Rebuild: kill one node, start its replacement, time the daemon's rebuild and the whole recovery.
        let lost = nodes / 2
        try cluster.kill(lost)
        let replaced = nowSeconds()
        try cluster.replace(lost)
        try cluster.waitUntilRebuilt([lost], observer: 0)
        let recovery = nowSeconds() - replaced
        guard let rebuild = cluster.lastRebuild(lost) else { throw ValidationError("the replacement logged no completed rebuild") }
        let (rebuildSeconds, rebuiltBytes) = (rebuild.seconds, rebuild.bytes)

        print("")
        print(padded("figure", 46) + padded("value", 12) + padded("reference", 26) + padded("ratio", 10))
        print(padded("protection per node (data ÷ save→commit)", 46) + padded(format(protectionRate) + " GB/s", 12)
            + padded(iperf.map { "iperf3 \(format($0)) GB/s" } ?? "iperf3 n/a", 26) + padded(iperf.map { format(protectionRate / $0) + "×" } ?? "", 10))
        print(padded("", 46) + padded("", 12) + padded("ISA-L encode \(format(encodeRate)) GB/s", 26) + padded(format(protectionRate / encodeRate) + "×", 10))
        // All nodes share this machine's cores and loopback: the cluster's total
        // fragment traffic (each node sends m × its data) is what iperf3 compares with.
        let traffic = Double(nodes * parity) * largest / protection.min()! / 1e9
        print(padded("protection, cluster fragment traffic (n·m·data)", 46) + padded(format(traffic) + " GB/s", 12)
            + padded(iperf.map { "iperf3 \(format($0)) GB/s" } ?? "iperf3 n/a", 26) + padded(iperf.map { format(traffic / $0) + "×" } ?? "", 10))
        if let iperf {
            let ideal = rebuiltBytes / (iperf * 1e9)
            print(padded("rebuild of node \(lost) (\(format(rebuiltBytes / 1_048_576)) MiB), daemon", 46) + padded(format(rebuildSeconds) + " s", 12)
                + padded("bytes ÷ iperf3 \(format(ideal)) s", 26) + padded(format(rebuildSeconds / ideal) + "×", 10))
            // Reed-Solomon repair reads k fragments per fragment rebuilt.
            let traffic = rebuiltBytes * Double(k) / (iperf * 1e9)
            print(padded("", 46) + padded("", 12) + padded("k·bytes ÷ iperf3 \(format(traffic)) s", 26) + padded(format(rebuildSeconds / traffic) + "×", 10))
            print(padded("recovery, replacement start → healthy", 46) + padded(format(recovery) + " s", 12) + padded("", 26) + padded(format(recovery / ideal) + "×", 10))
        }
        for node in 0..<nodes {
            print(padded("parity memory on node \(node)", 46) + padded(format(parityPerNode[node] / 1_048_576) + " MiB", 12)
                + padded("m/k ideal \(format(idealParity / 1_048_576)) MiB", 26) + padded(format(parityPerNode[node] / idealParity) + "×", 10))
        }
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
