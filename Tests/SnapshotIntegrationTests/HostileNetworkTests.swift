import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

/// What one process's kernel says about it: threads, open sockets and
/// anonymous resident memory (heap and stacks; arena pages are shared memory
/// and counted apart).
struct ProcessStats: CustomStringConvertible {
    let threads: Int
    /// Open socket descriptors (arena files come and go with the steps held).
    let sockets: Int
    let anonymousResidentBytes: UInt64

    init?(pid: Int32) {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let descriptors = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
        else { return nil }
        func field(_ name: String) -> UInt64? {
            status.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                .flatMap { $0.split(whereSeparator: { $0 == " " || $0 == "\t" }).dropFirst().first }
                .flatMap { UInt64($0) }
        }
        guard let threads = field("Threads"), let anonymousKiB = field("RssAnon") else { return nil }
        self.threads = Int(threads)
        sockets = descriptors.count { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)"))?.hasPrefix("socket:") == true }
        anonymousResidentBytes = anonymousKiB * 1024
    }

    var description: String { "\(threads) threads, \(sockets) sockets, \(anonymousResidentBytes >> 20) MiB anonymous" }
}

/// Strangers on the TCP port: idle connections, slow ones and frames that
/// claim the largest payload. A 3-node cluster keeps committing, its
/// operator is served, no node declares another dead, the attacked daemon's
/// memory stays bounded, and its threads and sockets return to their
/// baseline once the strangers leave.
@Suite("Hostile network", .serialized)
struct HostileNetworkTests {
    static let idleConnections = environmentInteger("SNAPSHOTD_HOSTILE_IDLE") ?? 2000
    static let slowConnections = 200
    static let oversizeClaims = 100
    /// The stated bound on the attacked daemon's extra anonymous memory.
    static let memoryBoundBytes: UInt64 = 64 << 20

    @Test func strangersCannotLockANodeOrBuyItsMemory() throws {
        try raiseDescriptorLimit(to: Self.idleConnections + Self.slowConnections + Self.oversizeClaims + 512)
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1)
        // Two steps first, so every peer channel (heartbeat, control, data in
        // both directions) is open in the baseline.
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        let pid = try daemonPID(cluster, node: 0)
        usleep(500_000)
        guard let baseline = ProcessStats(pid: pid) else { throw HarnessError("cannot read /proc/\(pid)") }
        let (host, port) = try cluster.peerAddress(0)

        // The attack.
        var strangers: [Socket] = []
        for _ in 0..<Self.idleConnections {
            if let socket = try? Socket.connectTCP(host: host, port: port, timeoutMilliseconds: 2000) { strangers.append(socket) }
        }
        var slow: [Socket] = []
        for _ in 0..<Self.slowConnections {
            if let socket = try? Socket.connectTCP(host: host, port: port, timeoutMilliseconds: 2000) { slow.append(socket) }
        }
        let claim = FrameHeader(
            type: .authenticate, requestID: 1, payloadLength: UInt32(ProtocolLimits.maximumControlPayloadBytes), payloadChecksum: 0, bulkLength: 0
        ).encoded()
        for _ in 0..<Self.oversizeClaims {
            guard let socket = try? Socket.connectTCP(host: host, port: port, timeoutMilliseconds: 2000) else { continue }
            try? socket.writeAll(claim, deadlineMilliseconds: monotonicMilliseconds() + 1000)
            strangers.append(socket)
        }
        let attacking = Shared(true)
        let slowSenders = Shared(slow)
        let dripping = inBackground {
            while attacking.update({ $0 }) {
                for socket in slowSenders.update({ $0 }) { try? socket.writeAll([0x53], deadlineMilliseconds: monotonicMilliseconds()) }
                usleep(100_000)
            }
        }
        let peakMemory = Shared<UInt64>(0)
        let sampling = inBackground {
            while attacking.update({ $0 }) {
                if let now = ProcessStats(pid: pid) { peakMemory.update { $0 = max($0, now.anonymousResidentBytes) } }
                usleep(50_000)
            }
        }

        // Meanwhile the job commits (every node's trainers, peers exchanging
        // fragments with the attacked node) and the operator is answered.
        try cluster.saveStep(3)
        let status = try cluster.operatorClient(0).status()
        #expect(status.jobs.first?.steps.contains { $0.step == 3 && $0.committed } == true)
        try cluster.saveStep(4)
        try cluster.verify(step: 4, ranks: Array(0..<cluster.world))

        // A stranger with the trainers' secret cannot act as a peer; one with the peers' cannot act as a trainer.
        #expect(try claimRole(cluster, secretFile: "secret", role: .peer) == .unauthenticated)
        #expect(try claimRole(cluster, secretFile: "peer-secret", role: .trainer) == .unauthenticated)

        attacking.update { $0 = false }
        dripping.wait()
        sampling.wait()
        for socket in strangers + slow { socket.close() }

        let peak = peakMemory.update { $0 }
        #expect(peak <= baseline.anonymousResidentBytes + Self.memoryBoundBytes, "peak \(peak >> 20) MiB anonymous against a baseline of \(baseline)")
        // Threads and sockets return to their baseline.
        var settled = ProcessStats(pid: pid)
        let deadline = Date().addingTimeInterval(15)
        while let now = settled, now.threads > baseline.threads + 2 || now.sockets > baseline.sockets + 2, Date() < deadline {
            usleep(200_000)
            settled = ProcessStats(pid: pid)
        }
        #expect(settled.map { $0.threads <= baseline.threads + 2 && $0.sockets <= baseline.sockets + 2 } == true,
                "baseline \(baseline); after the attack \(settled.map { "\($0)" } ?? "gone"): \(openDescriptors(pid))")

        // Asserted on the daemons' counters, not on their logs.
        for node in 0..<3 {
            let counters = try cluster.operatorClient(node).status()
            #expect(counters.counter("peers_declared_dead") == 0, "node \(node) declared a peer dead under the attack")
        }
        let attacked = try cluster.operatorClient(0).status()
        #expect((attacked.counter("handshakes_evicted") ?? 0) > 0, "the flood filled the handshake pool")
        #expect((attacked.counter("authentication_failures") ?? 0) >= UInt64(Self.oversizeClaims))
        #expect(attacked.counter("roles_refused") == 2)
    }

    /// Two of six nodes (RS(4,2)) frozen with SIGSTOP: they are declared dead
    /// within the failure timeout (plus one heartbeat interval and scheduling
    /// slack on a loaded machine), no other node is ever declared dead
    /// (each live node's counter is exactly 2), and their replacements
    /// rebuild byte-identical. Heartbeats to a frozen peer block only that
    /// peer's own thread.
    @Test func frozenPeersAreDeclaredDeadAndNoOneElse() throws {
        let cluster = try LocalCluster.forTest(nodes: 6, parity: 2, ranksPerNode: 1)
        try cluster.saveStep(1)
        let frozen = [4, 5]
        let pids = try frozen.map { try daemonPID(cluster, node: $0) }
        let stoppedAt = Date()
        for pid in pids { kill(pid, SIGSTOP) }
        defer { for pid in pids { kill(pid, SIGCONT) } }
        try cluster.waitForReport(from: 0, seconds: 30) { $0.deadNodes == frozen.map { NodeID($0) } }
        let detectedMilliseconds = Int(Date().timeIntervalSince(stoppedAt) * 1000)
        let failureTimeoutMilliseconds = 1500, heartbeatMilliseconds = 100, slackMilliseconds = 1500
        print("[frozenPeers] declared dead after \(detectedMilliseconds) ms")
        #expect(detectedMilliseconds <= failureTimeoutMilliseconds + heartbeatMilliseconds + slackMilliseconds)
        usleep(3_000_000)  // two more failure timeouts: nobody else may fall
        for node in 0..<4 {
            let status = try cluster.operatorClient(node).status()
            #expect(status.counter("peers_declared_dead") == 2, "node \(node): \(status.counters)")
            #expect(try cluster.operatorClient(node).recover().deadNodes == frozen.map { NodeID($0) }, "node \(node)")
        }
        for node in frozen { try cluster.killNow(node) }
        for node in frozen { try cluster.replace(node) }
        try cluster.waitUntilRebuilt(frozen, observer: 0, seconds: 120)
        try cluster.verify(step: 1, ranks: Array(0..<cluster.world))
    }

    /// A peer that silently drops every packet (a powered-off host: no reset,
    /// no ICMP, connects and writes just hang) is declared dead within the
    /// failure timeout, and no one else is: every heartbeat to it waits on
    /// its own thread and deadline. Its replacement rebuilds byte-identical.
    @Test(.enabled(if: networkNamespacesAvailable, "needs root to create network namespaces"))
    func aBlackHoledPeerIsDeclaredDeadAndNoOneElse() throws {
        let cluster = try LocalCluster.forTest(nodes: 4, parity: 1, ranksPerNode: 1, settings: ["NETNS": "1"])
        try cluster.saveStep(1)
        let victim = 3
        let cutAt = Date()
        _ = try cluster.run(["blackhole", cluster.directory, "\(victim)"])
        try cluster.waitForReport(from: 0, seconds: 30) { $0.deadNodes == [NodeID(victim)] }
        let detectedMilliseconds = Int(Date().timeIntervalSince(cutAt) * 1000)
        let failureTimeoutMilliseconds = 1500, heartbeatMilliseconds = 100, slackMilliseconds = 1500
        print("[blackHoledPeer] declared dead after \(detectedMilliseconds) ms")
        #expect(detectedMilliseconds <= failureTimeoutMilliseconds + heartbeatMilliseconds + slackMilliseconds)
        usleep(3_000_000)  // two more failure timeouts, with connects to the victim hanging: nobody else may fall
        for node in 0..<victim {
            let status = try cluster.operatorClient(node).status()
            #expect(status.counter("peers_declared_dead") == 1, "node \(node): \(status.counters)")
            #expect(try cluster.operatorClient(node).recover().deadNodes == [NodeID(victim)], "node \(node)")
        }
        try cluster.killNow(victim)
        try cluster.replace(victim)  // on a working link again
        try cluster.waitUntilRebuilt([victim], observer: 0, seconds: 120)
        try cluster.verify(step: 1, ranks: Array(0..<cluster.world))
    }

    /// Authenticates with the named secret file of the cluster, claims `role`
    /// in hello, and returns the error code of the refusal (nil if accepted).
    private func claimRole(_ cluster: LocalCluster, secretFile: String, role: PeerRole) throws -> ErrorCode? {
        let (host, port) = try cluster.peerAddress(0)
        let connection = FramedConnection(stream: try Socket.connectTCP(host: host, port: port, timeoutMilliseconds: 2000), frameTimeoutMilliseconds: 5000)
        defer { connection.close() }
        let first = try connection.receive().message
        guard case .challenge(let challenge) = first else { throw HarnessError("no challenge: \(first)") }
        let secret = Array(try String(contentsOfFile: cluster.directory + "/" + secretFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
        try connection.send(.authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: challenge.nonce))), requestID: 1)
        guard case .ok = try connection.receive().message else { throw HarnessError("\(secretFile) did not authenticate") }
        let hello = role == .peer
            ? Hello(role: .peer, job: nil, nodeID: 1)
            : Hello(role: .trainer, job: try JobID("impostor"), rank: 0, world: 1)
        try connection.send(.hello(hello), requestID: 2)
        if case .error(let refusal) = try connection.receive().message { return refusal.code }
        return nil
    }
}

/// What each open descriptor of `pid` is (for a failure message).
func openDescriptors(_ pid: Int32) -> String {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
    return entries.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)") }.sorted().joined(separator: " ")
}

func daemonPID(_ cluster: LocalCluster, node: Int) throws -> Int32 {
    let text = try String(contentsOfFile: "\(cluster.directory)/node\(node).pid", encoding: .utf8)
    guard let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw HarnessError("no pid for node \(node)") }
    return pid
}

/// Raises this process's descriptor limit to `count` if the hard limit allows.
func raiseDescriptorLimit(to count: Int) throws {
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw HarnessError("getrlimit") }
    guard limit.rlim_cur < rlim_t(count) else { return }
    guard limit.rlim_max >= rlim_t(count) else {
        throw HarnessError("this test opens \(count) connections; the hard descriptor limit is \(limit.rlim_max) (raise it with ulimit -Hn)")
    }
    limit.rlim_cur = rlim_t(count)
    guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw HarnessError("setrlimit") }
}
