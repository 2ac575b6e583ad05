import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol
import Testing

/// snapshotctl status, drain, verify and recover --node against a real
/// 3-node cluster (one RS(2,1) group): the operator's view of failures.
@Suite(.serialized) struct ClusterOperatorTests {
    static func json(_ run: (status: Int32, stdout: String, stderr: String)) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any], "not JSON: \(run.stdout) \(run.stderr)")
    }

    static func nodeStates(_ output: [String: Any]) -> [String] {
        (output["nodes"] as? [[String: Any]] ?? []).map { "\($0["node"]!):\($0["state"]!)" }
    }

    static func survivesMore(_ output: [String: Any]) -> Int? {
        (output["groups"] as? [[String: Any]])?.first?["survivesMore"] as? Int
    }

    @Test func statusShowsEveryNodeBeforeAndAfterAKillAndDuringADrain() throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1)
        try cluster.saveStep(1)
        let healthy = try runSnapshotctl(["status", "--socket", cluster.socket(0), "--json"])
        #expect(healthy.status == 0, "\(healthy.stderr)")
        let before = try Self.json(healthy)
        #expect(Self.nodeStates(before) == ["0:alive", "1:alive", "2:alive"])
        #expect(Self.survivesMore(before) == 1)
        for line in before["nodes"] as? [[String: Any]] ?? [] {
            let node = try #require(line["node"] as? Int)
            #expect(line["usedBytes"] as? UInt64 == (try cluster.operatorClient(node).status().usedBytes), "node \(node)'s memory as it reports it")
        }
        let table = try runSnapshotctl(["status", "--socket", cluster.socket(0)])
        #expect(table.stdout.contains("survives 1 more loss"), "\(table.stdout)")

        // Drain node 1: step 1 is protected and the group can lose it, so it is safe to stop.
        let drain = try runSnapshotctl(["drain", "--node", "1", "--socket", cluster.socket(0), "--json"])
        #expect(drain.status == 0, "\(drain.stdout) \(drain.stderr)")
        #expect(try Self.json(drain)["safeToStop"] as? Bool == true)
        #expect(Self.nodeStates(try Self.json(try runSnapshotctl(["status", "--socket", cluster.socket(2), "--json"]))) == ["0:alive", "1:draining", "2:alive"])
        let refused = #expect(throws: SnapshotClientError.self) {
            try cluster.client(rank: 2).save(step: 2, tensors: tensors(step: 2, rank: 2, sizes: LocalCluster.sizes))
        }
        #expect(refused?.code == .unavailable)
        #expect(refused?.message.contains("node 1 is draining") == true, "\(refused?.message ?? "")")
        #expect(try runSnapshotctl(["drain", "--node", "1", "--cancel", "--socket", cluster.socket(0)]).status == 0)
        try cluster.saveStep(2)

        // Node 2 dies: status degrades (exit 2), the group survives no more losses, and node 1 is no longer safe to stop.
        try cluster.kill(2)
        let degraded = try waitFor(seconds: 30, "node 0 to call node 2 dead") { () -> (Int32, [String: Any])? in
            let run = try runSnapshotctl(["status", "--socket", cluster.socket(0), "--json"])
            let output = try Self.json(run)
            return Self.nodeStates(output).contains("2:dead") ? (run.status, output) : nil
        }
        #expect(degraded.0 == 2)
        #expect(Self.survivesMore(degraded.1) == 0)
        let unsafe = try runSnapshotctl(["drain", "--node", "1", "--socket", cluster.socket(0), "--json"])
        #expect(unsafe.status == 2)
        #expect((try Self.json(unsafe)["reason"] as? String)?.contains("group 0 has already lost nodes [2]") == true, "\(unsafe.stdout)")
        #expect(try runSnapshotctl(["drain", "--node", "1", "--cancel", "--socket", cluster.socket(0)]).status == 0)
    }

    @Test func verifyNamesAFlippedByteInAShardFileAndInAParityFile() throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1)
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        let clean = try runSnapshotctl(["verify", "--socket", cluster.socket(0), "--json"])
        #expect(clean.status == 0, "\(clean.stdout) \(clean.stderr)")
        for line in try Self.json(clean)["nodes"] as? [[String: Any]] ?? [] {
            #expect(line["shards"] as? Int == 4, "2 ranks × 2 steps: \(line)")
            #expect(line["parityFragments"] as? Int == 2, "one stripe per step: \(line)")
            #expect(line["parityReencoded"] as? Int == 2, "\(line)")
        }

        let step2 = try cluster.run(["arena", cluster.directory, "1"]).trimmingCharacters(in: .whitespacesAndNewlines) + "/jobs/cluster-job/" + String(repeating: "0", count: 19) + "2"
        try flipByte(in: step2 + "/rank-2.seg", atFraction: 0.5)
        let parityDirectory = try cluster.run(["arena", cluster.directory, "2"]).trimmingCharacters(in: .whitespacesAndNewlines) + "/jobs/cluster-job/" + String(repeating: "0", count: 19) + "2"
        let parityFile = try #require(try FileManager.default.contentsOfDirectory(atPath: parityDirectory).first { $0.hasPrefix("parity-") })
        try flipByte(in: parityDirectory + "/" + parityFile, atFraction: 0.25)
        let stripe = parityFile.dropFirst("parity-".count).dropLast(".seg".count)

        let found = try runSnapshotctl(["verify", "--socket", cluster.socket(0), "--json"])
        #expect(found.status == 2)
        let problems = (try Self.json(found)["nodes"] as? [[String: Any]] ?? []).flatMap { $0["problems"] as? [String] ?? [] }
        #expect(problems.count == 2, "\(problems)")
        #expect(problems.contains { $0.hasPrefix("node 1: cluster-job step 2 rank 2: tensor(s) 'layers.0.weight' fail their sealed CRCs") }, "\(problems)")
        #expect(problems.contains("node 2: cluster-job step 2 parity of stripe \(stripe) (row 0) fails its sealed CRC"), "\(problems)")
        let table = try runSnapshotctl(["verify", "--socket", cluster.socket(0), "--step", "1"])
        #expect(table.status == 0, "step 1 is untouched: \(table.stdout)")
        #expect(table.stdout.contains("consistent: every CRC matches"))
    }

    @Test func recoverNodeShowsThePlanFollowsTheRebuildAndVerifiesIt() throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1)
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        try cluster.kill(2)
        _ = try cluster.waitForReport(from: 0, seconds: 30) { $0.deadNodes == [2] }
        let plan = try runSnapshotctl(["recover", "--node", "2", "--dry-run", "--socket", cluster.socket(0)])
        #expect(plan.status == 0, "\(plan.stderr)")
        #expect(plan.stdout.contains("rebuild plan for node 2 (dead now): 2 step(s)"), "\(plan.stdout)")
        #expect(plan.stdout.contains("0,1"), "fragments come from nodes 0 and 1: \(plan.stdout)")

        try cluster.replace(2)
        let run = try runSnapshotctl(["recover", "--node", "2", "--socket", cluster.socket(0), "--timeout", "120"])
        #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
        #expect(run.stderr.contains("rebuilding node 2: 2/2 steps") || run.stdout.contains("held now"), "\(run.stderr)")
        #expect(run.stdout.contains("node 2 rebuilt: 2 step(s)"), "\(run.stdout)")
        #expect(run.stdout.contains("verified 4 shard(s) against their CRCs and 2 of 2 parity fragment(s) against re-encoded parity: consistent"), "\(run.stdout)")
        try cluster.verify(step: 2, ranks: [4, 5])
    }
}

/// Flips one bit of the byte at `fraction` of a file's length, in place (a
/// daemon's shared mapping of the file sees it at once).
func flipByte(in path: String, atFraction fraction: Double) throws {
    let fd = open(path, O_RDWR)
    guard fd >= 0 else { throw HarnessError("cannot open \(path)") }
    defer { close(fd) }
    var info = stat()
    guard fstat(fd, &info) == 0, info.st_size > 0 else { throw HarnessError("cannot stat \(path)") }
    let offset = off_t(Double(info.st_size) * fraction)
    var byte: UInt8 = 0
    guard pread(fd, &byte, 1, offset) == 1 else { throw HarnessError("cannot read \(path)") }
    byte ^= 0x10
    guard pwrite(fd, &byte, 1, offset) == 1 else { throw HarnessError("cannot write \(path)") }
}
