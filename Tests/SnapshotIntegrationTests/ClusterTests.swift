import Foundation
import Glibc
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import LocalCluster
import Testing

/// Acceptance of cross-node protection and recovery: real daemons on loopback,
/// real kill -9, replacements rebuilt from their group's survivors.
@Suite("Cluster: protection and recovery", .serialized)
struct ClusterTests {
    @Test func everySingleNodeLossRebuildsByteIdenticalWithOneParity() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1)
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        for lost in 0..<4 {
            try cluster.kill(lost)
            try cluster.replace(lost)
            try cluster.waitUntilRebuilt([lost], observer: (lost + 1) % 4)
            try cluster.verify(step: 2, ranks: cluster.ranks(on: lost))
            try cluster.verify(step: 1, ranks: cluster.ranks(on: lost))
            // Every fragment came down a chain of survivors (repair pipelining), none by gathering.
            let rebuild = try #require(cluster.lastRebuild(lost))
            #expect(rebuild.pipelinedFragments > 0 && rebuild.gatheredFragments == 0, "node \(lost): \(rebuild)")
        }
        // The rebuilt cluster keeps protecting new steps.
        try cluster.saveStep(3)
        try cluster.verify(step: 3, ranks: Array(0..<cluster.world))
        #expect(cluster.log(0).contains("step committed"))
    }

    /// The same node lost twice: its second replacement rebuilds again (from
    /// what the first one rebuilt), here by gathering k fragments.
    /// A node restarted on its own arena after one byte of one of its shards
    /// rotted: the step it belongs to is quarantined (kept on disk, counted)
    /// and rebuilt from the peers byte-identical; the other step is served
    /// from the arena as it was.
    @Test func aRestartedNodeRebuildsWhatItQuarantined() throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1)
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        try cluster.killNow(1)
        let rank = cluster.ranks(on: 1)[0]
        try flipByte(in: try cluster.arenaDirectory(1) + "/jobs/\(cluster.job)/00000000000000000002/rank-\(rank).seg", at: 256 + 1000)
        try cluster.run(["node", cluster.directory, "1"])  // the same arena, not a fresh one
        try cluster.waitUntilRebuilt([1], observer: 0, seconds: 60)
        #expect(try cluster.operatorClient(1).status().counter("quarantined_files") == 1)
        try cluster.verify(step: 1, ranks: Array(0..<cluster.world))
        try cluster.verify(step: 2, ranks: Array(0..<cluster.world))
        #expect(cluster.steps(logged: "step rebuilt", by: 1) == [2], "only the quarantined step is rebuilt")
    }

    @Test func aNodeReplacedTwiceRebuildsBothTimes() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1)
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        try cluster.kill(2)
        try cluster.replace(2)
        try cluster.waitUntilRebuilt([2], observer: 0)
        try cluster.run(["repair", cluster.directory, "gather"])
        try cluster.kill(2)
        try cluster.replace(2)
        try cluster.waitUntilRebuilt([2], observer: 0)
        let completed = cluster.log(2).split(separator: "\n").filter { $0.contains("rebuild complete") }
        #expect(completed.count == 2, "\(completed)")
        let second = try #require(cluster.lastRebuild(2))
        #expect(second.gatheredFragments > 0 && second.pipelinedFragments == 0, "\(second)")
        try cluster.verify(step: 2, ranks: cluster.ranks(on: 2))
    }

    @Test func everyPairOfLostNodesRebuildsByteIdenticalWithTwoParity() throws {
        let cluster = try LocalCluster.forTest(nodes: 6, parity: 2)
        try cluster.saveStep(1)
        for pair in combinations(of: 6, choose: 2) {
            for node in pair { try cluster.kill(node) }
            for node in pair { try cluster.replace(node) }
            try cluster.waitUntilRebuilt(pair, observer: (0..<6).first { !pair.contains($0) }!)
            try cluster.verify(step: 1, ranks: pair.flatMap { cluster.ranks(on: $0) })
        }
        try cluster.saveStep(2)
        try cluster.verify(step: 2, ranks: Array(0..<cluster.world))
    }

    /// Rot while running: one flipped byte in a held parity fragment and one
    /// in a held shard are found by the background scrub and healed in place
    /// from the peers, byte-identical to what was sealed, with the step
    /// committed and served throughout; the other nodes find nothing.
    @Test func rotFoundByTheScrubIsHealedFromThePeers() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1, settings: ["SCRUB_MS": "300"])
        try cluster.saveStep(1)
        let stepDirectory = "/jobs/cluster-job/00000000000000000001"
        let parityNames = try FileManager.default.contentsOfDirectory(atPath: try cluster.arenaDirectory(2) + stepDirectory).filter { $0.hasPrefix("parity-") }
        let parityFile = try cluster.arenaDirectory(2) + stepDirectory + "/" + (try #require(parityNames.sorted().first, "node 2 holds no parity"))
        let sealedParity = try #require(FileManager.default.contents(atPath: parityFile))
        func counter(_ name: String, on node: Int) throws -> UInt64 { try cluster.operatorClient(node).status().counter(name) ?? 0 }
        func waitUntilHealed(on node: Int) throws {
            let deadline = Date().addingTimeInterval(30)
            while try counter("scrub_corruptions_healed", on: node) < 1, Date() < deadline { usleep(100_000) }
            let status = try cluster.operatorClient(node).status()
            #expect(status.counter("scrub_corruptions_found") == 1, "node \(node): \(status.counters)")
            #expect(status.counter("scrub_corruptions_healed") == 1, "node \(node): \(status.counters)")
        }
        // One fault at a time: under RS(3,1) two in one stripe could not be told apart from a lost stripe.
        try flipByte(in: parityFile, at: 1000)
        try waitUntilHealed(on: 2)
        try flipByte(in: try cluster.arenaDirectory(1) + stepDirectory + "/rank-\(cluster.ranks(on: 1)[0]).seg", at: 256 + 1000)
        try waitUntilHealed(on: 1)
        #expect(FileManager.default.contents(atPath: parityFile) == sealedParity, "the healed parity is not what was sealed")
        try cluster.verify(step: 1, ranks: Array(0..<cluster.world))
        for node in [0, 3] {
            #expect(try counter("scrub_corruptions_found", on: node) == 0, "node \(node)")
            #expect(try counter("scrub_bytes_checked", on: node) > 0, "node \(node) never scrubbed")
        }
    }

    /// A survivor whose parity was corrupted in memory fails the repair chain
    /// it is part of (its CRC is checked while it serves); the replacement
    /// falls back to gathering, skips the bad fragment for another survivor,
    /// and still rebuilds byte-identical.
    @Test func corruptedParityBreaksTheChainAndTheRebuildRoutesAroundIt() throws {
        let cluster = try LocalCluster.forTest(nodes: 6, parity: 2)
        try cluster.saveStep(1)
        // Node 3 is lost. Its data fragment 0 is slot 3 of stripe 4 (StripeLayout:
        // node i's fragment f is in stripe i+1+f; parity of stripe j on nodes
        // j…j+m−1). Of the other slots, node 1's is padding (fragment 2 lies
        // past its data), so the chain is node 0, node 2, then node 4 with
        // parity row 0, which it checks as it serves.
        let parityFile = try cluster.arenaDirectory(4) + "/jobs/cluster-job/00000000000000000001/parity-4.seg"
        try flipByte(in: parityFile, at: 1000)
        try cluster.kill(3)
        try cluster.replace(3)
        try cluster.waitUntilRebuilt([3], observer: 0)
        try cluster.verify(step: 1, ranks: cluster.ranks(on: 3))
        #expect(cluster.log(4).contains("parity fragment failed its CRC check while serving a repair"))
        #expect(cluster.log(3).contains("pipelined repair failed; gathering k fragments instead"))
        #expect(cluster.log(3).contains("failed its CRC check"), "the gathered copy of the bad parity is refused too")
        let rebuild = try #require(cluster.lastRebuild(3))
        #expect(rebuild.gatheredFragments == 1 && rebuild.pipelinedFragments > 0, "\(rebuild)")
    }

    /// Each node in its own network namespace with a capped link, as hosts on a
    /// switch: the cluster protects, a node is killed and rebuilt through
    /// survivor chains across the namespaces, and stopping removes every
    /// namespace and link the script made.
    @Test(.enabled(if: networkNamespacesAvailable, "needs root to create network namespaces"))
    func nodesInTheirOwnNetworkNamespacesRebuildAcrossThem() throws {
        var prefix = ""
        do {
            let cluster = try LocalCluster.forTest(nodes: 4, parity: 1, settings: ["NETNS": "1", "LINK_RATE": "2gbit"])
            prefix = "sn" + (try String(contentsOfFile: cluster.directory + "/base_port", encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(try cluster.peerAddress(2).host.hasPrefix("198.18."))
            #expect(shell("ip netns list | grep -qE '^\(prefix)-n3( |$)'") == 0)
            try cluster.saveStep(1)
            try cluster.kill(2)
            try cluster.replace(2)
            try cluster.waitUntilRebuilt([2], observer: 0)
            try cluster.verify(step: 1, ranks: cluster.ranks(on: 2))
            let rebuild = try #require(cluster.lastRebuild(2))
            #expect(rebuild.pipelinedFragments > 0 && rebuild.gatheredFragments == 0, "\(rebuild)")
        }
        #expect(!prefix.isEmpty)
        #expect(shell("ip netns list | grep -q '^\(prefix)-'") != 0, "namespaces left behind")
        #expect(shell("ip link show \(prefix)br") != 0, "bridge left behind")
    }

    /// Bad repair requests from an authenticated peer each get their specific
    /// error and a log line; the node keeps serving and loses nothing.
    @Test func badRepairRequestsAreRefusedAndTheNodeKeepsServing() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1)
        try cluster.saveStep(1)
        let peer = try peerConnection(to: 0, of: cluster, as: 1)
        defer { peer.close() }
        let job = try JobID("cluster-job")
        // Node 0's data fragment 0 is data slot 2 of stripe 1 (RS(3,1): slot s of stripe j comes from node j+1+s).
        let own = FragmentID(job: job, step: 1, stripe: 1, index: 2)
        func refusal(_ fragment: FragmentID, size: UInt64 = 1 << 20, chain: [RepairHop]) throws -> ErrorReply? {
            try peer.send(.repairRequest(RepairRequest(fragment: fragment, fragmentSizeBytes: size, sliceSizeBytes: 1 << 20, chain: chain)), requestID: 5)
            guard case .error(let reply) = try peer.receive().message else { return nil }
            return reply
        }
        let mine = RepairHop(nodeID: 0, index: 2, coefficient: 1)
        let wrongEnd = try refusal(own, chain: [mine, RepairHop(nodeID: 3, index: 0, coefficient: 1)])
        #expect(wrongEnd?.code == .invalidRequest && wrongEnd?.message.contains("ends at node 3") == true)
        let tooLong = try refusal(own, chain: [1, 2, 3].map { RepairHop(nodeID: $0, index: 0, coefficient: 1) } + [mine])
        #expect(tooLong?.code == .invalidRequest && tooLong?.message.contains("at most k") == true)
        let outside = try refusal(FragmentID(job: job, step: 1, stripe: 9, index: 2), chain: [mine])
        #expect(outside?.code == .invalidRequest && outside?.message.contains("outside the layout") == true)
        let notHere = try refusal(own, chain: [RepairHop(nodeID: 0, index: 1, coefficient: 1)])
        #expect(notHere?.code == .invalidRequest && notHere?.message.contains("is not on node 0") == true)
        let wrongSize = try refusal(own, size: 12_345, chain: [mine])
        #expect(wrongSize?.code == .invalidRequest && wrongSize?.message.contains("the request says 12345") == true)
        let unknownStep = try refusal(FragmentID(job: job, step: 99, stripe: 1, index: 2), chain: [mine])
        #expect(unknownStep?.code == .unavailable)
        // A slice size outside the protocol's bounds is a malformed frame; the session survives it.
        try peer.stream.writeAll(Frame.encode(.repairRequest(RepairRequest(fragment: own, fragmentSizeBytes: 1 << 20, sliceSizeBytes: 100, chain: [mine])), requestID: 6), deadlineMilliseconds: monotonicMilliseconds() + 5000)
        guard case .error(let malformed) = try peer.receive().message else { throw HarnessError("no error for a bad slice size") }
        #expect(malformed.code == .malformedFrame && malformed.message.contains("sliceSizeBytes"))
        #expect(cluster.log(0).contains("request refused"))
        try cluster.verify(step: 1, ranks: Array(0..<cluster.world))
    }

    @Test func coordinatorDeathHandsRecoveryToTheNextNode() throws {
        let cluster = try LocalCluster.forTest(nodes: 6, parity: 2)
        try cluster.saveStep(1)
        try cluster.kill(0)  // the coordinator
        try cluster.kill(3)
        // Node 1 sees node 0 dead and takes over.
        let deadline = Date().addingTimeInterval(30)
        var report = try cluster.operatorClient(1).recover()
        while report.coordinator != 1 || report.deadNodes != [0, 3] {
            guard Date() < deadline else { throw HarnessError("node 1 never took over: \(report)") }
            usleep(100_000)
            report = try cluster.operatorClient(1).recover()
        }
        try cluster.replace(3)
        try cluster.verify(step: 1, ranks: cluster.ranks(on: 3))
        #expect(cluster.log(1).contains("this node is now the coordinator"))
        #expect(cluster.log(3).contains("coordinator=1"), "node 1 ordered the rebuild")
        try cluster.replace(0)
        try cluster.waitUntilRebuilt([0], observer: 2)
        try cluster.verify(step: 1, ranks: cluster.ranks(on: 0))
    }

    @Test func beyondToleranceReportsExactlyTheLostRanksAndNeverHangs() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1)
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        try cluster.kill(1)
        try cluster.kill(2)
        try cluster.replace(1)
        try cluster.replace(2)
        let deadline = Date().addingTimeInterval(30)
        var report = try cluster.operatorClient(0).recover()
        while report.jobs.first?.lostRanks.isEmpty != false {
            guard Date() < deadline else { throw HarnessError("no loss reported: \(report)") }
            usleep(100_000)
            report = try cluster.operatorClient(0).recover()
        }
        let job = try #require(report.jobs.first)
        #expect(job.lostRanks == cluster.ranks(on: 1) + cluster.ranks(on: 2))
        #expect(job.latestCommitted == 2)
        #expect(job.newestRestorable == nil)
        #expect(job.summary.contains("beyond tolerance"))
        #expect(Set(report.rebuildingNodes) == [1, 2])
        // The replacements refuse promptly instead of hanging or serving wrong bytes.
        do {
            _ = try cluster.client(rank: 2).restore()
            Issue.record("a node beyond tolerance served a restore")
        } catch let error as SnapshotClientError {
            #expect(error.code == .unavailable)
        }
        // Surviving nodes still serve their own ranks.
        try cluster.verify(step: 2, ranks: cluster.ranks(on: 0))
        // The coordinator's critical log line is written by its heartbeat thread.
        let logDeadline = Date().addingTimeInterval(15)
        while !cluster.log(0).contains("group beyond tolerance"), Date() < logDeadline { usleep(100_000) }
        #expect(cluster.log(0).contains("group beyond tolerance"))
    }

    @Test func nodeKilledWhileFragmentsAreInFlight() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1)
        let big: [(String, DType, Int)] = [("rng.state", .bytes, 9), ("layers.0.weight", .float32, 24 << 20)]
        try cluster.saveStep(1, sizes: big)
        // Step 2: every rank's save returns once its bytes are local; kill node 1 right away,
        // while protection streams fragments between the nodes.
        try concurrently(0..<cluster.world) { rank in
            try cluster.client(rank: rank).save(step: 2, tensors: tensors(step: 2, rank: rank, sizes: cluster.sizes(for: rank, base: big)))
        }
        try cluster.kill(1)
        let latest = try #require(try cluster.client(rank: 0).latestCommittedStep())
        #expect(latest == 1 || latest == 2)
        try cluster.replace(1)
        try cluster.waitUntilRebuilt([1], observer: 0)
        // Step 1 is intact everywhere; step 2 counts only if it was really committed.
        try cluster.verify(step: 1, ranks: Array(0..<cluster.world), sizes: big)
        let committedNow = try cluster.client(rank: 0).latestCommittedStep()
        if committedNow == 2 {
            try cluster.verify(step: 2, ranks: Array(0..<cluster.world), sizes: big)
        } else {
            #expect(committedNow == 1)
            #expect(clientErrorCode { try cluster.client(rank: 3).restore(step: 2) } == .notCommitted)
        }
        try cluster.saveStep(3, sizes: big)
        try cluster.verify(step: 3, ranks: Array(0..<cluster.world), sizes: big)
    }
}

/// An authenticated peer session to `node`, introduced as node `peer`.
func peerConnection(to node: Int, of cluster: LocalCluster, as peer: NodeID) throws -> FramedConnection {
    let address = try cluster.peerAddress(node)
    let connection = FramedConnection(stream: try Socket.connectTCP(host: address.host, port: address.port), frameTimeoutMilliseconds: 10_000)
    guard case .challenge(let challenge) = try connection.receive().message else { throw HarnessError("no challenge") }
    let secret = Array(try String(contentsOfFile: cluster.directory + "/peer-secret", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
    try connection.send(.authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: challenge.nonce))), requestID: 1)
    guard case .ok = try connection.receive().message else { throw HarnessError("authentication refused") }
    try connection.send(.hello(Hello(role: .peer, job: nil, nodeID: peer)), requestID: 2)
    guard case .welcome = try connection.receive().message else { throw HarnessError("no welcome") }
    return connection
}

func combinations(of n: Int, choose r: Int) -> [[Int]] {
    guard r > 0 else { return [[]] }
    guard n >= r else { return [] }
    return combinations(of: n - 1, choose: r - 1).map { $0 + [n - 1] } + combinations(of: n - 1, choose: r)
}
