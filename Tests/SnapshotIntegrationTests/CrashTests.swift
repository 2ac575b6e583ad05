import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

@Suite("Crashes: trainer and daemon killed with -9", .serialized)
struct CrashTests {
    static let sizes: [(String, DType, Int)] = [("rng.state", .bytes, 16), ("w", .float32, 2 << 20), ("b", .float32, 4096)]

    @Test func trainerKilledMidSaveLeavesThePreviousStepIntact() throws {
        let daemon = try DaemonProcess()
        let job = try JobID("killed-trainer")
        // Step 1 committed by both ranks.
        do {
            let clients = try (0..<2 as Range<Rank>).map { try daemon.unixClient(job: job, rank: $0, world: 2) }
            for (rank, client) in clients.enumerated() { try client.save(step: 1, tensors: tensors(step: 1, rank: Rank(rank), sizes: Self.sizes)) }
            try clients[0].waitCommitted(step: 1, timeoutMilliseconds: 10_000)
        }
        // Rank 0 saves step 2; rank 1 is a real trainer process that dies half-way through its save.
        let rank0 = try retrying(while: .duplicateRank, seconds: 5) { try daemon.unixClient(job: job, rank: 0, world: 2) }
        try rank0.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: Self.sizes))
        let trainer = try TrainerProcess(arguments: [
            "--socket", daemon.socketPath, "--job", "killed-trainer", "--rank", "1", "--world", "2",
            "--tensor-bytes", "16,2097152,4096", "--pause-mid-save", "2",
        ])
        try trainer.waitForLine("PAUSED")
        trainer.kill9()

        #expect(clientErrorCode { try rank0.waitCommitted(step: 2, timeoutMilliseconds: 500) } == .timeout)
        #expect(try rank0.latestCommittedStep() == 1)
        #expect(clientErrorCode { try rank0.restore(step: 2) } == .notCommitted)
        let rank1 = try retrying(while: .duplicateRank, seconds: 5) { try daemon.unixClient(job: job, rank: 1, world: 2) }
        for (rank, client) in [(Rank(0), rank0), (1, rank1)] {
            let shard = try client.restore()
            #expect(shard.step == 1)
            #expect(matches(shard, tensors(step: 1, rank: rank, sizes: Self.sizes)), "rank \(rank)")
        }
        // The partial shard was discarded: only rank 0's shard of step 2 is held.
        let step2 = try #require(try rank0.status().jobs.first?.steps.first { $0.step == 2 })
        #expect(step2.committed == false && step2.completeRanks == 1)
        #expect(daemon.log().contains("trainer connected"))
    }

    @Test func daemonKilledAndRestartedServesEveryCommittedStep() throws {
        let daemon = try DaemonProcess(keep: 3)
        let job = try JobID("killed-daemon")
        do {
            let clients = try saveThreeSteps(daemon, job)
            // A half-written step 4 at the moment of the crash.
            let pending = try clients[2].beginSave(step: 4, specs: tensors(step: 4, rank: 2, sizes: Self.sizes).map(\.spec))
            try pending.write(tensorIndex: 0, from: tensors(step: 4, rank: 2, sizes: Self.sizes)[0].bytes)
            daemon.kill9()
        }
        try daemon.start()
        let clients = try (0..<4 as Range<Rank>).map { try daemon.unixClient(job: job, rank: $0, world: 4) }
        #expect(try clients[0].latestCommittedStep() == 3)
        for step in 1...3 as ClosedRange<Step> {
            for (rank, client) in clients.enumerated() {
                let shard = try client.restore(step: step)
                #expect(matches(shard, tensors(step: step, rank: Rank(rank), sizes: Self.sizes)), "step \(step) rank \(rank)")
            }
        }
        #expect(clientErrorCode { try clients[2].restore(step: 4) } == .notCommitted)
        #expect(!FileManager.default.fileExists(atPath: daemon.arena + "/jobs/killed-daemon/00000000000000000004"))
        #expect(daemon.log().contains("discarding an uncommitted step found at start"))

        // A byte flipped in the arena: that tensor is named and refused, everything else still served.
        let segment = daemon.arena + "/jobs/killed-daemon/00000000000000000003/rank-2.seg"
        try flipByte(in: segment, at: 256 + 1000)  // inside tensor "w" (offset 256)
        do {
            _ = try clients[2].restore(step: 3)
            Issue.record("a corrupted shard was served")
        } catch let error as SnapshotClientError {
            #expect(error.code == .checksumMismatch)
            #expect(error.message.contains("'w'"))
            #expect(!error.message.contains("'b'"))
        }
        #expect(matches(try clients[1].restore(step: 3), tensors(step: 3, rank: 1, sizes: Self.sizes)))
        #expect(matches(try clients[2].restore(step: 2), tensors(step: 2, rank: 2, sizes: Self.sizes)))
        #expect(daemon.log().contains("refusing to serve a corrupted shard"))
    }

    /// One flipped byte in one shard of a committed step, then a restart: the
    /// bad shard is quarantined (kept under quarantine/, counted in status),
    /// and every other shard of that step and of the others is still served.
    @Test func aRestartQuarantinesOneBadShardAndServesEverythingElse() throws {
        let daemon = try DaemonProcess(keep: 3)
        let job = try JobID("quarantine")
        _ = try saveThreeSteps(daemon, job)  // its clients close before the crash
        daemon.kill9()
        try flipByte(in: daemon.arena + "/jobs/quarantine/00000000000000000003/rank-2.seg", at: 256 + 1000)
        try daemon.start()
        let clients = try (0..<4 as Range<Rank>).map { try daemon.unixClient(job: job, rank: $0, world: 4) }
        let status = try clients[0].status()
        #expect(status.counter("quarantined_files") == 1)
        #expect(clientErrorCode { try clients[2].restore(step: 3) } == .unknownStep)
        for step in 1...3 as ClosedRange<Step> {
            for (rank, client) in clients.enumerated() where !(step == 3 && rank == 2) {
                #expect(matches(try client.restore(step: step), tensors(step: step, rank: Rank(rank), sizes: Self.sizes)), "step \(step) rank \(rank)")
            }
        }
        let quarantined = (try? FileManager.default.contentsOfDirectory(atPath: daemon.arena + "/quarantine")) ?? []
        #expect(quarantined.contains { $0.hasSuffix("rank-2.seg") } && quarantined.contains { $0.hasSuffix("rank-2.manifest") }, "\(quarantined)")
    }

    /// Four ranks save and commit steps 1…3; returns their clients.
    private func saveThreeSteps(_ daemon: DaemonProcess, _ job: JobID) throws -> [SnapshotClient] {
        let clients = try (0..<4 as Range<Rank>).map { try daemon.unixClient(job: job, rank: $0, world: 4) }
        for step in 1...3 as ClosedRange<Step> {
            for (rank, client) in clients.enumerated() { try client.save(step: step, tensors: tensors(step: step, rank: Rank(rank), sizes: Self.sizes)) }
            try clients[0].waitCommitted(step: step, timeoutMilliseconds: 10_000)
        }
        return clients
    }

    @Test func overBudgetSaveIsRefusedAndEarlierStepsStayIntact() throws {
        let daemon = try DaemonProcess(budget: "24MiB", keep: 2)
        let job = try JobID("budget")
        let client = try daemon.unixClient(job: job, rank: 0, world: 1)
        let small: [(String, DType, Int)] = [("w", .float32, 4 << 20)]
        try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: small))
        try client.waitCommitted(step: 1)
        let huge: [(String, DType, Int)] = [("w", .float32, 40 << 20)]
        do {
            try client.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: huge))
            Issue.record("an over-budget save was accepted")
        } catch let error as SnapshotClientError {
            #expect(error.code == .overBudget)
            #expect(error.message.contains("needs 41943040 bytes"))
            #expect(error.message.contains("free"))
        }
        #expect(try client.latestCommittedStep() == 1)
        #expect(matches(try client.restore(), tensors(step: 1, rank: 0, sizes: small)))
        // The session is still usable for a save that fits.
        try client.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: small))
        #expect(try client.waitCommitted(step: 2) == 2)
    }
}

func flipByte(in path: String, at offset: Int) throws {
    let fd = open(path, O_RDWR)
    guard fd >= 0 else { throw HarnessError("cannot open \(path)") }
    defer { close(fd) }
    var byte: UInt8 = 0
    guard pread(fd, &byte, 1, off_t(offset)) == 1 else { throw HarnessError("cannot read \(path)") }
    byte ^= 0x01
    guard pwrite(fd, &byte, 1, off_t(offset)) == 1 else { throw HarnessError("cannot write \(path)") }
}

/// A real `snapshot-trainer` process.
final class TrainerProcess {
    let process = Process()
    let output = Pipe()

    init(arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: Executables.path("snapshot-trainer"))
        process.arguments = arguments
        process.standardOutput = output
        try process.run()
    }

    func waitForLine(_ line: String, seconds: Double = 30) throws {
        var seen = ""
        let deadline = Date().addingTimeInterval(seconds)
        let fd = output.fileHandleForReading.fileDescriptor
        while Date() < deadline, !seen.contains(line) {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 100) > 0 else {
                guard process.isRunning else { break }
                continue
            }
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            seen += String(decoding: chunk, as: UTF8.self)
        }
        guard seen.contains(line) else { throw HarnessError("trainer never printed \(line); got: \(seen)") }
    }

    func kill9() {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { if process.isRunning { kill9() } }
}
