import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import Testing

@testable import SnapshotCore
@testable import SnapshotDaemon

/// The node API sessions call (save, wait, restore, pin, status), driven
/// in-process on a real arena without sockets: each transaction's outcome
/// and its exact error code.
@Suite("Node API transactions")
struct NodeAPITests {
    let job = try! JobID("api-job")

    /// A single-node server on a fresh arena under /dev/shm (not started: no listeners).
    func server(budget: UInt64 = 64 << 20) throws -> (SnapshotServer, String) {
        let directory = "/dev/shm/snapshotd-api-\(getpid())-\(UUID().uuidString.prefix(8))"
        var configuration = DaemonConfiguration()
        configuration.arenaDirectory = directory
        configuration.unixSocketPath = directory + ".sock"
        configuration.memoryBudgetBytes = budget
        return (try SnapshotServer(configuration: configuration, logger: Logger(label: "test")), directory)
    }

    /// Saves one tensor of `bytes` for `rank` through the API, as a session would.
    func save(_ server: SnapshotServer, session: SessionID, rank: Rank, step: Step, bytes: [UInt8]) throws {
        let key = ShardKey(job: job, step: step, rank: rank)
        let (record, segment) = try server.beginSave(session: session, key: key, specs: [try TensorSpec.blob(name: "w", byteCount: bytes.count)], topology: Topology())
        let (destination, offset) = try #require(server.putDestination(session: session, key: key, tensorIndex: 0, offsetBytes: 0, lengthBytes: UInt64(bytes.count)))
        #expect(destination === segment && offset == Int(record.tensorOffsets[0]))
        bytes.withUnsafeBytes { segment.bytes(offset: offset, count: bytes.count).copyMemory(from: $0) }
        try server.commitSave(session: session, key: key, checksums: nil, gradientNorm: nil, metadata: [])
    }

    func waitForCommit(_ server: SnapshotServer, step: Step, world: UInt32, milliseconds: Int) throws -> Step? {
        let deadline = Date().addingTimeInterval(Double(milliseconds) / 1000)
        while true {
            if let step = try server.waitForCommit(job: job, step: step, world: world, sliceEnd: min(deadline, Date().addingTimeInterval(0.1)), deadline: deadline, timeoutMilliseconds: UInt32(milliseconds)) { return step }
        }
    }

    func code(_ body: () throws -> Void) -> ErrorCode? {
        do { try body() } catch let error as StoreError { return error.code } catch { return nil }
        return nil
    }

    @Test func aStepCommitsWhenEveryRankIsSealedAndWaitersSeeIt() throws {
        let (server, directory) = try server()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try server.attachTrainer(session: 1, job: job, rank: 0, world: 2, localWorld: 0)
        try server.attachTrainer(session: 2, job: job, rank: 1, world: 2, localWorld: 0)
        try save(server, session: 1, rank: 0, step: 1, bytes: [1, 2, 3])
        #expect(code { _ = try waitForCommit(server, step: 1, world: 2, milliseconds: 300) } == .timeout, "rank 1 has not saved")
        try save(server, session: 2, rank: 1, step: 1, bytes: [4, 5])
        #expect(try waitForCommit(server, step: 1, world: 2, milliseconds: 10_000) == 1)
        #expect(try server.latestCommitted(job: job) == 1)
        let status = server.status(job: job)
        #expect(status.jobs.first?.steps.first?.completeRanks == 2 && status.jobs.first?.steps.first?.committed == true)
        let restored = try server.pinForRestore(job: job, rank: 1, step: nil)
        #expect(restored.step == 1 && restored.segment.bytes(offset: Int(restored.shard.tensorOffsets[0]), count: 2).elementsEqual([4, 5]))
        server.unpin(ShardKey(job: job, step: 1, rank: 1))
    }

    @Test func refusalsCarryTheirCodeAndTouchNothingHeld() throws {
        let (server, directory) = try server(budget: 4 << 20)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try server.attachTrainer(session: 1, job: job, rank: 0, world: 1, localWorld: 0)
        #expect(code { try server.attachTrainer(session: 9, job: job, rank: 0, world: 1, localWorld: 0) } == .duplicateRank)
        #expect(code { try server.attachTrainer(session: 9, job: job, rank: 1, world: 4, localWorld: 0) } == .wrongJob)
        try save(server, session: 1, rank: 0, step: 1, bytes: [7])
        #expect(try waitForCommit(server, step: 1, world: 1, milliseconds: 10_000) == 1)
        let held = server.state.withLock { $0.store.heldBytes }
        let big = ShardKey(job: job, step: 2, rank: 0)
        #expect(code { _ = try server.beginSave(session: 1, key: big, specs: [try TensorSpec.blob(name: "w", byteCount: 8 << 20)], topology: Topology()) } == .overBudget)
        #expect(server.state.withLock { $0.store.heldBytes } == held, "a refused save holds nothing")
        #expect(server.putDestination(session: 1, key: big, tensorIndex: 0, offsetBytes: 0, lengthBytes: 1) == nil, "no save of step 2 is in progress")
        #expect(code { _ = try server.pinForRestore(job: job, rank: 0, step: 7) } == .notCommitted)
        #expect(code { try server.abortSave(session: 1, key: big) } == .unknownStep)
        #expect(try server.pinForRestore(job: job, rank: 0, step: nil).step == 1, "what was held is still served")
        server.unpin(ShardKey(job: job, step: 1, rank: 0))
    }

    @Test func aCorruptedShardIsRefusedAndLeftUnpinned() throws {
        let (server, directory) = try server()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try server.attachTrainer(session: 1, job: job, rank: 0, world: 1, localWorld: 0)
        try save(server, session: 1, rank: 0, step: 1, bytes: Array(repeating: 9, count: 4096))
        #expect(try waitForCommit(server, step: 1, world: 1, milliseconds: 10_000) == 1)
        let key = ShardKey(job: job, step: 1, rank: 0)
        let segment = try #require(server.state.withLock { $0.segments[key] })
        segment.bytes(offset: 100, count: 1)[0] ^= 0xFF
        #expect(code { _ = try server.pinForRestore(job: job, rank: 0, step: 1) } == .checksumMismatch)
        #expect(server.state.withLock { $0.store.restorePins[key] } == nil, "the refused restore released its pin")
    }

    /// A rank's holder whose client is gone hands the rank over at once; a
    /// live holder keeps it (duplicateRank).
    @Test func aRankWhoseHolderIsGoneIsHandedOverAndALiveHolderKeepsIt() throws {
        let (server, directory) = try server()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func session() throws -> (id: SessionID, client: Socket) {
            var fds: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
            let served = Socket(fd: fds[0])
            let admitted = try #require(server.state.withLock { $0.admit(served, to: .local, limit: 16) })
            return (admitted.id, Socket(fd: fds[1]))
        }
        let first = try session()
        let second = try session()
        defer { second.client.close() }
        try server.attachTrainer(session: first.id, job: job, rank: 0, world: 2, localWorld: 2)
        #expect(code { try server.attachTrainer(session: second.id, job: job, rank: 0, world: 2, localWorld: 2) } == .duplicateRank)
        first.client.close()  // the first trainer dies; its session has not noticed
        try server.attachTrainer(session: second.id, job: job, rank: 0, world: 2, localWorld: 2)
        #expect(server.state.withLock { $0.store.jobs[job]?.sessions[0] } == second.id)
        // The taken-over session's stream was shut down, so its thread ends.
        let ended = server.state.withLock { $0.sessions[first.id]?.stream }
        #expect(ended?.peerHasClosed() == true)
    }
}
