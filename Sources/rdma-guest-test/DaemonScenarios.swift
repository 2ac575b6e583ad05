import ErasureCoding
import Foundation
import Glibc
import RDMATransport
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Synchronization

/// The daemon over RDMA, inside the Soft-RoCE guest (`rdma-guest-test daemons SNAPSHOTD`):
/// two real `snapshotd` processes, node 0 on rxe0 (10.77.0.1) and node 1 on
/// rxe1 (10.77.0.2), one protection group RS(1,1), both with `transport =
/// "rdma"` (no TCP fallback: a peer exchange that cannot go over RDMA fails).
///
/// 1. Each node's trainer (a `SnapshotClient` over RDMA from the other end's
///    address) saves tensors from 100 bytes (inline) to 3 MiB (RDMA WRITE
///    into the arena) at steps 1 and 2. Step 2 commits only once each node's
///    shard is protected on the other: fragments went over RDMA. Both restore
///    byte-identical.
/// 2. A byte flipped after its CRC was taken: the step never commits, `checksumMismatch`.
/// 3. A trainer that disconnects in the middle of a tensor: the daemon logs
///    the failed session, commits nothing of it, and keeps serving.
/// 4. `kill -9` of node 1; a save to it fails with a clear RDMA error. A
///    replacement with an empty arena is rebuilt from node 0 over RDMA, and
///    rank 1 restores byte-identical from it.
enum DaemonScenarios {
    static let hosts = ["10.77.0.1", "10.77.0.2"]
    static let port: UInt16 = 7600
    static let directory = "/tmp/rdma-daemons"
    static let secret = Array("rdma-guest-trainer-secret-0123456789".utf8)
    static let sizes: [(name: String, dtype: DType, bytes: Int)] = [
        ("tiny", .uint8, 100), ("inline", .float32, 48 << 10), ("granted", .bfloat16, (1 << 20) + 4096), ("large", .uint8, (3 << 20) + 12),
    ]

    static func run(snapshotd: String) throws {
        _ = started
        try prepare()
        let job = try JobID("rdma-guest")
        var daemons = [try start(node: 0, snapshotd: snapshotd, fresh: true), try start(node: 1, snapshotd: snapshotd, fresh: true)]
        defer { for daemon in daemons where daemon.isRunning { kill(daemon.processIdentifier, SIGKILL) } }
        for node in 0..<2 { try waitForLog(node, "listening for RDMA") }
        progress("both daemons listen for RDMA")

        // 1. Saves and restores over RDMA; commits need the fragments exchanged over RDMA.
        let clients = try (0..<2).map { rank in try client(rank: rank, job: job) }
        progress("both trainers connected")
        for step in Step(1)...2 {
            for (rank, client) in clients.enumerated() {
                try save(client, step: step, rank: rank)
                progress("rank \(rank) saved step \(step)")
            }
        }
        for client in clients { _ = try client.waitCommitted(step: 2, timeoutMilliseconds: 120_000) }
        progress("step 2 committed")
        for (rank, client) in clients.enumerated() { try expectRestores(client, step: 2, rank: rank, "restore over RDMA") }
        progress("both ranks restored step 2")
        for node in 0..<2 where log(node).contains("falling back to TCP") { throw GuestTestFailure("node \(node) fell back to TCP: \(log(node))") }
        say("rdma-guest-test daemons save-restore: ok (2 nodes, \(sizes.count) tensors per rank from 100 B to 3 MiB, steps 1-2 committed across nodes and restored byte-identical over RDMA)")

        // 2. A payload corrupted after its CRC was taken.
        try corruptedSaveIsRefused()
        progress("corrupt done")

        // 3. A trainer leaving mid-tensor.
        try disconnectMidTensor()
        try expectRestores(clients[0], step: 2, rank: 0, "restore after a trainer left mid-transfer")
        say("rdma-guest-test daemons disconnect: ok (the daemon closed the session, committed nothing of it, and still serves step 2 byte-identical)")

        // 4. Node 1 dies; a save to it fails clearly; its replacement is rebuilt over RDMA.
        _ = try tensors(step: 3, rank: 1)  // made before the kill: the guest's CPU is slow
        kill(daemons[1].processIdentifier, SIGKILL)
        progress("killed node 1")
        do {
            defer { progress("save to the killed node returned") }
            try save(clients[1], step: 3, rank: 1)
            throw GuestTestFailure("a save to a killed daemon succeeded")
        } catch let error as SnapshotClientError {
            guard error.message.contains("RDMA") else { throw GuestTestFailure("the error does not say what failed: \(error)") }
            say("rdma-guest-test daemons dead-daemon: ok (a clear error: \(error.message))")
        }
        daemons[1] = try start(node: 1, snapshotd: snapshotd, fresh: true)
        progress("started node 1's replacement")
        try waitForLog(1, "listening for RDMA")
        let deadline = Date().addingTimeInterval(240)
        while true {
            do {
                let replacement = try client(rank: 1, job: job)
                try expectRestores(replacement, step: 2, rank: 1, "restore from the rebuilt node")
                break
            } catch let error as SnapshotClientError where [ErrorCode.unavailable, .notCommitted, .unknownStep, .wrongJob].contains(where: { $0 == error.code }) && Date() < deadline {
                usleep(500_000)
            }
        }
        guard !log(1).contains("falling back to TCP") else { throw GuestTestFailure("the replacement fell back to TCP") }
        try waitForLog(1, "rebuild complete: this node serves its ranks again")
        say("rdma-guest-test daemons rebuild: ok (node 1 rebuilt from node 0 over RDMA; rank 1 step 2 restored byte-identical)")

        // 5. `auto` towards a peer that does not answer over RDMA: TCP, said once.
        for daemon in daemons { kill(daemon.processIdentifier, SIGKILL) }
        usleep(500_000)
        daemons = [try start(node: 0, snapshotd: snapshotd, fresh: true, transport: "auto"), try start(node: 1, snapshotd: snapshotd, fresh: true, transport: "tcp")]
        try waitForLog(0, "listening for RDMA")
        try waitForLog(1, "snapshotd ready")
        let mixedJob = try JobID("rdma-guest-mixed")
        let overRDMA = try SnapshotClient(endpoint: endpoint(rank: 0), job: mixedJob, rank: 0, world: 2, localWorld: 1)
        let overTCP = try SnapshotClient(endpoint: .tcp(host: hosts[1], port: port, secret: secret), job: mixedJob, rank: 1, world: 2, localWorld: 1)
        try save(overRDMA, step: 1, rank: 0)
        try save(overTCP, step: 1, rank: 1)
        _ = try overRDMA.waitCommitted(step: 1, timeoutMilliseconds: 120_000)
        try expectRestores(overRDMA, step: 1, rank: 0, "restore with a TCP peer")
        let fallbacks = log(0).split(separator: "\n").filter { $0.contains("peer does not answer over RDMA: falling back to TCP") }
        guard fallbacks.count == 1 else { throw GuestTestFailure("node 0 logged \(fallbacks.count) fallbacks: \(fallbacks)") }
        say("rdma-guest-test daemons auto-fallback: ok (node 0 reached node 1, which has no RDMA listener, over TCP, and said so once; step 1 committed)")
    }

    // MARK: Scenarios

    /// A raw trainer session: the tensor's byte 4096 is flipped after its CRC
    /// was taken and the commit carries the true CRC.
    static func corruptedSaveIsRefused() throws {
        let job = try JobID("rdma-guest-crc")
        let session = try rawSession(node: 0, job: job)
        defer { session.close() }
        var bytes = pattern(count: 1 << 20, seed: 77)
        let crc = bytes.withUnsafeBytes { CRC32C.checksum($0) }
        bytes[4096] ^= 0x20
        let spec = try TensorSpec(name: "w", dtype: .uint8, shape: [Int64(bytes.count)], kind: .parameter)
        guard case .saveReady = try call(session, .beginSave(BeginSave(step: 1, transport: .stream, tensors: [spec])), id: 2) else {
            throw GuestTestFailure("beginSave was not answered with saveReady")
        }
        try session.send(.putTensor(PutTensor(step: 1, tensorIndex: 0, offsetBytes: 0)), requestID: 3, bulkLength: UInt64(bytes.count))
        try bytes.withUnsafeBytes { try session.sendBulk($0.baseAddress!, count: $0.count) }
        _ = try call(session, .commitSave(CommitSave(step: 1, checksums: [crc])), id: 4)
        let verdict = try call(session, .waitCommitted(WaitCommitted(step: 1, timeoutMilliseconds: 30_000)), id: 5)
        guard case .error(let refusal) = verdict, refusal.code == .checksumMismatch else {
            throw GuestTestFailure("a corrupted payload got \(verdict)")
        }
        say("rdma-guest-test daemons corrupt: ok (\(refusal.code): \(refusal.message))")
    }

    /// A raw trainer session sends 32 KiB of an 8 MiB tensor, then disconnects.
    static func disconnectMidTensor() throws {
        let job = try JobID("rdma-guest-cut")
        let count = 8 << 20
        do {
            let session = try rawSession(node: 0, job: job)
            let spec = try TensorSpec(name: "w", dtype: .uint8, shape: [Int64(count)], kind: .parameter)
            _ = try call(session, .beginSave(BeginSave(step: 1, transport: .stream, tensors: [spec])), id: 2)
            try session.send(.putTensor(PutTensor(step: 1, tensorIndex: 0, offsetBytes: 0)), requestID: 3, bulkLength: UInt64(count))
            let part = pattern(count: 32 << 10, seed: 5)
            try part.withUnsafeBytes { try session.sendBulk($0.baseAddress!, count: $0.count) }
            session.close()
        }
        try waitForLog(0, "connection failed mid-request")
        let later = try SnapshotClient(endpoint: endpoint(rank: 0), job: job, rank: 0, world: 1, localWorld: 1)
        guard try later.latestCommittedStep() == nil else { throw GuestTestFailure("a save cut mid-tensor committed") }
    }

    // MARK: Helpers

    static func prepare() throws {
        _ = try? FileManager.default.removeItem(atPath: directory)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try Data(secret).write(to: URL(fileURLWithPath: "\(directory)/secret"))
        try Data("rdma-guest-peer-secret-0123456789".utf8).write(to: URL(fileURLWithPath: "\(directory)/peer-secret"))
        let cluster = """
            heartbeat_interval_ms = 500
            failure_timeout_ms = 4000
            [[node]]
            id = 0
            address = "\(hosts[0]):\(port)"
            [[node]]
            id = 1
            address = "\(hosts[1]):\(port)"
            [[group]]
            nodes = [0, 1]
            parity = 1

            """
        try cluster.write(toFile: "\(directory)/cluster.toml", atomically: true, encoding: .utf8)
    }

    static func start(node: Int, snapshotd: String, fresh: Bool, transport: String = "rdma") throws -> Process {
        let arena = "\(directory)/arena\(node)"
        if fresh { _ = try? FileManager.default.removeItem(atPath: arena) }
        let logPath = "\(directory)/node\(node).log"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: snapshotd)
        process.arguments = [
            "--node-id", "\(node)", "--cluster-file", "\(directory)/cluster.toml", "--transport", transport,
            "--shared-secret-file", "\(directory)/secret", "--peer-secret-file", "\(directory)/peer-secret",
            "--unix-socket", "\(directory)/node\(node).sock", "--arena-directory", arena, "--memory-budget", "256MiB", "--keep", "2",
            "--log-level", "info",
        ]
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        try process.run()
        return process
    }

    static func log(_ node: Int) -> String { (try? String(contentsOfFile: "\(directory)/node\(node).log", encoding: .utf8)) ?? "" }

    static func waitForLog(_ node: Int, _ text: String, seconds: Double = 180) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while !log(node).contains(text) {
            guard Date() < deadline else { throw GuestTestFailure("node \(node) never logged '\(text)':\n\(log(node))") }
            usleep(200_000)
        }
    }

    /// Rank r's daemon is node r; it connects from the other end of the pair.
    static func endpoint(rank: Int) -> Endpoint {
        .rdma(host: hosts[rank], port: port, secret: secret, source: hosts[1 - rank])
    }

    static func client(rank: Int, job: JobID) throws -> SnapshotClient {
        try SnapshotClient(endpoint: endpoint(rank: rank), job: job, rank: Rank(rank), world: 2, localWorld: 1)
    }

    /// Tensors by (step, rank), made once: the emulated CPU is slow.
    static let made = Mutex<[[UInt64]: [(spec: TensorSpec, bytes: [UInt8])]]>([:])

    static func tensors(step: Step, rank: Int) throws -> [(spec: TensorSpec, bytes: [UInt8])] {
        if let cached = made.withLock({ $0[[step, UInt64(rank)]] }) { return cached }
        let tensors = try sizes.enumerated().map { index, size in
            let spec = try TensorSpec(
                name: "layers.\(index).\(size.name)", dtype: size.dtype, shape: [Int64(size.bytes / Int(size.dtype.elementSizeBytes))], kind: .parameter)
            return (spec, pattern(count: Int(spec.byteLength), seed: step * 1000 + UInt64(rank) * 10 + UInt64(index)))
        }
        made.withLock { $0[[step, UInt64(rank)]] = tensors }
        return tensors
    }

    static func save(_ client: SnapshotClient, step: Step, rank: Int) throws {
        let contents = try tensors(step: step, rank: rank)
        let buffers = contents.map { $0.bytes }
        try buffers.withUnsafeBufferPointers { pointers in
            try client.save(step: step, tensors: zip(contents, pointers).map { TensorData(spec: $0.spec, bytes: $1) })
        }
    }

    static func expectRestores(_ client: SnapshotClient, step: Step, rank: Int, _ what: String) throws {
        let shard = try client.restore(step: step)
        defer { shard.release() }
        let expected = try tensors(step: step, rank: rank)
        guard shard.step == step, shard.entries.count == expected.count else {
            throw GuestTestFailure("\(what): step \(shard.step) with \(shard.entries.count) tensors")
        }
        for (index, wanted) in expected.enumerated() {
            let same = wanted.bytes.withUnsafeBytes { expected in
                let got = shard.tensor(at: index)
                return got.count == expected.count && (got.isEmpty || memcmp(got.baseAddress!, expected.baseAddress!, got.count) == 0)
            }
            guard shard.entries[index].spec == wanted.spec, same else {
                throw GuestTestFailure("\(what): tensor \(wanted.spec.name) differs")
            }
        }
    }

    /// Pseudo-random bytes, the same for the same seed.
    static func pattern(count: Int, seed: UInt64) -> [UInt8] {
        var random = SplitMix64(seed: seed)
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { random.fill($0) }
        return bytes
    }

    /// Set on first use: ``run(snapshotd:)`` touches it first.
    static let started = Date()

    /// A line with the seconds since the start: where the time goes under emulation.
    static func progress(_ what: String) { say(String(format: "rdma-guest-test daemons: %.0f s: %@", Date().timeIntervalSince(started), what)) }

    /// An authenticated trainer session over RDMA, below the client library.
    static func rawSession(node: Int, job: JobID) throws -> FramedConnection {
        let session = FramedConnection(stream: try RDMAStream.connect(from: hosts[1 - node], to: hosts[node], port: port))
        guard case .challenge(let challenge) = try session.receive().message else { throw GuestTestFailure("no challenge") }
        guard case .ok = try call(session, .authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: challenge.nonce))), id: 0) else {
            throw GuestTestFailure("authentication refused")
        }
        guard case .welcome = try call(session, .hello(Hello(role: .trainer, job: job, rank: 0, world: 1, localWorld: 1)), id: 1) else { throw GuestTestFailure("hello refused") }
        return session
    }

    static func call(_ session: FramedConnection, _ message: Message, id: UInt64) throws -> Message {
        try session.send(message, requestID: id)
        return try session.receive().message
    }

    static func say(_ line: String) { RDMAGuestTest.say(line) }
}

extension Array where Element == [UInt8] {
    /// Every array's bytes at once, for as long as `body` runs.
    func withUnsafeBufferPointers<R>(_ body: ([UnsafeRawBufferPointer]) throws -> R) rethrows -> R {
        func nest(_ index: Int, _ collected: [UnsafeRawBufferPointer]) throws -> R {
            guard index < count else { return try body(collected) }
            return try self[index].withUnsafeBytes { try nest(index + 1, collected + [$0]) }
        }
        return try nest(0, [])
    }
}
