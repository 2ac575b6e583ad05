import ArgumentParser
import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol

/// The end-to-end demo: a 6-node RS(4,2) cluster on loopback, 12 trainer
/// ranks saving checksummed pseudo-random state, two nodes killed with -9,
/// replacements rebuilt from the survivors, every rank restored and verified
/// byte for byte. Exits 0 only on verified success, and cleans up either way.
@main
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot-demo", abstract: "Save, kill two nodes, recover, verify: snapshotd end to end on one machine.")

    @Option(help: "Nodes in the protection group.") var nodes = 6
    @Option(help: "Parity fragments per stripe (nodes that may be lost).") var parity = 2
    @Option(help: "Trainer ranks per node.") var ranksPerNode: UInt32 = 2
    @Option(help: "State per rank, MiB.") var mibPerRank = 32
    @Option(help: "Steps saved before the failure.") var steps: UInt64 = 3
    @Option(help: "snapshotd binary (default: next to this program).") var snapshotd: String?
    @Flag(help: "Keep the nodes' logs after a successful run too.") var keepLogs = false

    func run() throws {
        let binary = snapshotd ?? Checkout.sibling("snapshotd")
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw ValidationError("no snapshotd at \(binary): run `swift build -c release` first")
        }
        let killed = [1, nodes - 2].filter { $0 < nodes }.prefix(parity).map { $0 }
        let cluster = try LocalCluster(
            nodes: nodes, parity: parity, ranksPerNode: ranksPerNode, job: try JobID("demo"), script: Checkout.clusterScript,
            snapshotd: binary, directory: NSTemporaryDirectory() + "snapshotd-demo-\(getpid())",
            settings: ["HEARTBEAT_MS": "100", "FAILURE_MS": "1000", "BUDGET": "\(max(1, mibPerRank * Int(ranksPerNode) * 8 / 1024 + 1))GiB"])
        cluster.keepLogs = keepLogs
        say("started \(nodes) snapshotd nodes, RS(\(nodes - parity),\(parity)), \(cluster.world) ranks × \(mibPerRank) MiB, logs in \(cluster.directory)")
        do {
            try demonstrate(cluster, killed: Array(killed))
        } catch {
            cluster.keepLogs = true
            say("FAILED: \(error) (logs kept in \(cluster.directory))")
            throw ExitCode.failure
        }
    }

    private func demonstrate(_ cluster: LocalCluster, killed: [Int]) throws {
        let sizes = [16, mibPerRank << 19, mibPerRank << 19]  // RNG blob, parameters, optimizer state
        // 1. Save: every rank saves each step, then waits for the job-wide commit (protected on every node).
        var protectSeconds: [Double] = []
        for step in 1...steps {
            let started = Date()
            try eachRank(cluster) { rank in
                let client = try cluster.client(rank: rank)
                let state = SyntheticState(seed: 42, rank: rank, step: step, sizes: sizes)
                defer { state.deallocate() }
                try client.save(step: step, tensors: state.tensors, gradientNorm: 1.0)
                try client.waitCommitted(step: step, timeoutMilliseconds: 120_000)
            }
            protectSeconds.append(Date().timeIntervalSince(started))
        }
        let stepBytes = Double(Int(cluster.world) * sizes.reduce(0, +))
        say("saved and committed steps 1…\(steps): \(mb(stepBytes)) per step, save→commit \(seconds(protectSeconds.min()!))–\(seconds(protectSeconds.max()!)) (\(rate(stepBytes, protectSeconds.min()!)) incl. erasure coding across nodes)")
        let memory = try (0..<cluster.nodes).map { try memoryOf(node: $0, cluster) }
        let data = memory.map(\.data).reduce(0, +), parityBytes = memory.map(\.parity).reduce(0, +)
        let ideal = Double(parity) / Double(nodes - parity)
        say("held in memory: \(mb(data)) of shards + \(mb(parityBytes)) of parity; parity overhead \(format(parityBytes / data)) (ideal m/k = \(format(ideal)), replication would be \(parity)×)")

        // 2. Failure: kill -9 two nodes.
        for node in killed { try cluster.kill(node) }
        let killedAt = Date()
        let survivor = (0..<cluster.nodes).first { !killed.contains($0) }!
        let killedIDs = Set(killed.map { NodeID($0) })
        let detected = try cluster.waitForReport(from: survivor) { Set($0.deadNodes).isSuperset(of: killedIDs) }
        let lost = killed.flatMap { cluster.ranks(on: $0) }
        say("killed nodes \(killed) with SIGKILL (ranks \(lost)); declared dead after \(seconds(Date().timeIntervalSince(killedAt))); coordinator is node \(detected.coordinator)")
        if let job = detected.jobs.first { say("recovery report: \(job.summary)") }

        // 3. Recover: replacements with the lost nodes' identities rebuild from the survivors.
        let replacedAt = Date()
        for node in killed { try cluster.replace(node) }
        try cluster.waitUntilRebuilt(killed, observer: survivor)
        let rebuildSeconds = Date().timeIntervalSince(replacedAt)
        var rebuilt = 0.0
        for node in killed {
            let held = try memoryOf(node: node, cluster)
            rebuilt += held.data + held.parity
        }
        let reports = killed.compactMap { cluster.lastRebuild($0) }
        let chained = reports.reduce(0) { $0 + $1.pipelinedFragments }
        let gathered = reports.reduce(0) { $0 + $1.gatheredFragments }
        say("replacements for nodes \(killed) rebuilt \(mb(rebuilt)) (shards and parity of \(min(steps, 2)) kept steps) in \(seconds(rebuildSeconds)) (\(rate(rebuilt, rebuildSeconds))); fragments through survivor chains: \(chained), gathered: \(gathered)")

        // 4. Verify: every rank restores the newest committed step, byte for byte.
        let verifiedAt = Date()
        var verifiedBytes = 0
        for rank in 0..<cluster.world {
            let shard = try cluster.restore(rank: rank, step: nil)
            let expected = SyntheticState(seed: 42, rank: rank, step: steps, sizes: sizes)
            defer { expected.deallocate() }
            guard shard.step == steps, expected.matches(shard) else {
                throw LocalClusterError("rank \(rank) restored step \(shard.step) with different bytes")
            }
            verifiedBytes += expected.totalBytes
        }
        say("verified: all \(cluster.world) ranks restored step \(steps) byte-identical (\(mb(Double(verifiedBytes))) in \(seconds(Date().timeIntervalSince(verifiedAt))), ranks \(lost) from rebuilt nodes)")
        say("OK")
    }

    /// Shard bytes and everything else held (parity) on a node, from its own status.
    private func memoryOf(node: Int, _ cluster: LocalCluster) throws -> (data: Double, parity: Double) {
        let status = try cluster.operatorClient(node).status()
        let data = status.jobs.flatMap(\.steps).reduce(UInt64(0)) { $0 + $1.bytes }
        return (Double(data), Double(status.usedBytes - data))
    }

    private func eachRank(_ cluster: LocalCluster, _ body: @escaping @Sendable (Rank) throws -> Void) throws {
        try onThreads(Int(cluster.world)) { try body(Rank($0)) }
    }
}

func say(_ line: String) { print("[demo] \(line)") }
func mb(_ bytes: Double) -> String { "\(format(bytes / 1_048_576)) MiB" }
func seconds(_ value: Double) -> String { "\(format(value)) s" }
func rate(_ bytes: Double, _ seconds: Double) -> String { "\(format(bytes / seconds / 1e9)) GB/s" }
func format(_ value: Double) -> String { String(format: "%.2f", value) }
