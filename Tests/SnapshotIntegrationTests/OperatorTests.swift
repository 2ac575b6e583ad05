import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotDaemon
import SnapshotProtocol
import Testing

/// The operator's side on real daemons: the durable tier, `snapshotctl
/// export`, and snapshotctl's errors with their documented exit codes.
@Suite(.serialized) struct OperatorTests {
    /// Flush every 2nd step into a directory all nodes share, lose m + 1
    /// nodes, and restore the newest flushed step through the client.
    @Test func aJobBeyondToleranceRestoresTheNewestFlushedStepFromTheDurableTier() throws {
        let durable = try makeScratchDirectory() + "/durable"
        defer { try? FileManager.default.removeItem(atPath: (durable as NSString).deletingLastPathComponent) }
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1, settings: ["FLUSH_DIR": durable, "FLUSH_EVERY": "2", "METRICS_PORT": "0"])
        // Steps 2 and 4 are flushed (1, 3 and 5 are not due); the status says so once every node wrote its ranks.
        func waitForFlushed(_ steps: [Step]) throws -> StatusReply {
            try waitFor(seconds: 60, "node 0 to see steps \(steps) flushed whole") {
                let status = try cluster.operatorClient(0).status()
                // Node 0 counts its own flush just after writing its files.
                return status.jobs.first?.flushedSteps == steps && status.counter("steps_flushed") == UInt64(steps.count) ? status : nil
            }
        }
        for step: Step in 1...2 { try cluster.saveStep(step) }
        _ = try waitForFlushed([2])
        for step: Step in 3...5 { try cluster.saveStep(step) }
        _ = try waitForFlushed([2, 4])
        let scrape = try Scrape(try #require(metricsEndpoint(inLog: cluster.log(0))))
        try scrape.expect("snapshotd_flush_duration_seconds_count", 2)
        try scrape.expect("snapshotd_steps_flushed_total", 2)
        let lastFlush = try scrape.require("snapshotd_last_flush_timestamp_seconds")
        #expect(abs(lastFlush - Date().timeIntervalSince1970) < 600, "the last flush ended moments ago: \(lastFlush)")
        let manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: durable + "/cluster-job/" + ExportLayout.stepDirectoryName(4) + "/manifest.json"))) as? [String: Any]
        #expect(manifest?["world"] as? Int == 6)
        #expect(manifest?["step"] as? Int == 4)

        let snapshots = try runSnapshotctl(["snapshots", "--socket", cluster.socket(0), "--json"])
        #expect(snapshots.status == 0, "\(snapshots.stderr)")
        let rows = try JSONSerialization.jsonObject(with: Data(snapshots.stdout.utf8)) as? [[String: Any]] ?? []
        #expect(rows.map { "\($0["step"]!):\($0["state"]!)" } == ["2:flushed", "4:flushed", "5:committed"])
        #expect(rows.map { $0["inMemory"] as? Bool } == [false, true, true], "step 2 is only in the durable tier now: \(rows)")
        #expect(rows.filter { $0["inMemory"] as? Bool == true }.allSatisfy { ($0["ageSeconds"] as? Int).map { $0 < 600 } == true }, "ages from the arena's commit markers: \(rows)")

        // Nodes 1 and 2 (ranks 2…5) die; the group of RS(2,1) tolerates one.
        for node in [1, 2] { try cluster.kill(node) }
        for node in [1, 2] { try cluster.replace(node) }
        let report = try cluster.waitForReport(from: 0, seconds: 60) { !($0.jobs.first?.lostRanks.isEmpty ?? true) }
        #expect(report.jobs[0].newestFlushed == 4)
        #expect(report.jobs[0].summary.contains("the durable tier holds step 4 whole"), "\(report.jobs[0].summary)")
        let recover = try runSnapshotctl(["recover", "--socket", cluster.socket(0), "--json"])
        #expect(recover.status == 2, "lost, but with a fallback: degraded (\(recover.stderr))")

        for rank: Rank in 2...5 {
            let shard = try cluster.restore(rank: rank, step: nil)
            #expect(shard.step == 4)
            #expect(shard.durableSource == durable + "/cluster-job/" + ExportLayout.stepDirectoryName(4) + "/" + ExportLayout.tensorFile(rank: rank))
            #expect(matches(shard, tensors(step: 4, rank: rank, sizes: cluster.sizes(for: rank, base: LocalCluster.sizes))), "rank \(rank) differs")
        }
        // Node 0 still holds its ranks of steps 4 and 5, but the job restores one step: 4, from node 0's memory.
        for rank: Rank in 0...1 {
            let kept = try cluster.restore(rank: rank, step: nil)
            #expect(kept.step == 4, "every rank of the job restores the same step")
            #expect(kept.durableSource == nil, "node 0 holds step 4 itself")
            #expect(matches(kept, tensors(step: 4, rank: rank, sizes: cluster.sizes(for: rank, base: LocalCluster.sizes))))
        }
        #expect(try cluster.operatorClient(1).status().counter("durable_restores") == 2)
        #expect(try cluster.operatorClient(0).status().counter("durable_restores") == 0)
    }

    /// A durable copy with a flipped byte is refused with its CRC error, not served.
    @Test func aCorruptedDurableCopyIsRefused() throws {
        let durable = try makeScratchDirectory() + "/durable"
        defer { try? FileManager.default.removeItem(atPath: (durable as NSString).deletingLastPathComponent) }
        let daemon = try DaemonProcess(extraArguments: ["--flush-directory", durable, "--flush-every-steps", "1"])
        let job = try JobID("durable-crc")
        let sizes: [(String, DType, Int)] = [("w", .float32, 4096)]
        let client = try daemon.unixClient(job: job, rank: 0, world: 1)
        try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: sizes))
        _ = try waitFor(seconds: 20, "step 1 flushed") { try client.status().jobs.first?.flushedSteps == [1] ? true : nil }
        let file = durable + "/durable-crc/" + ExportLayout.stepDirectoryName(1) + "/" + ExportLayout.tensorFile(rank: 0)
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        bytes[bytes.count - 5] ^= 0x40
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        // A restart with an empty arena: memory has nothing, the durable copy is all there is.
        daemon.kill9()
        try FileManager.default.removeItem(atPath: daemon.arena)
        try daemon.start()
        let again = try daemon.unixClient(job: job, rank: 0, world: 1)
        let error = #expect(throws: SnapshotClientError.self) { try again.restore(step: 1) }
        #expect(error?.code == .checksumMismatch)
        #expect(error?.message.contains("fail their CRCs") == true, "\(error?.message ?? "")")
        #expect(try again.status().counter("durable_read_failures") == 1)
    }

    /// `snapshotctl export` of a cluster step: every rank, the remote ones
    /// fetched; the files parse as safetensors and hold the saved bytes.
    @Test func exportWritesEveryRankOfAClusterStep() throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1)
        for step: Step in 1...2 { try cluster.saveStep(step) }
        let target = try makeScratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: target) }
        let run = try runSnapshotctl(["export", "--socket", cluster.socket(0), "--job", "cluster-job", "--step", "1", "--to", target, "--json"])
        #expect(run.status == 0, "\(run.stderr)")
        let directory = target + "/cluster-job/" + ExportLayout.stepDirectoryName(1)
        #expect(run.stdout.contains("\"ranks\" : 6"), "\(run.stdout)")
        for rank: Rank in 0..<6 {
            let data = try Data(contentsOf: URL(fileURLWithPath: directory + "/" + ExportLayout.tensorFile(rank: rank)))
            let expected = tensors(step: 1, rank: rank, sizes: cluster.sizes(for: rank, base: LocalCluster.sizes))
            try data.withUnsafeBytes { file in
                let header = try Safetensors.parse(file)
                #expect(header.count == expected.count)
                for tensor in expected {
                    let entry = try #require(header[tensor.spec.name])
                    #expect(entry.dtype == tensor.spec.dtype.description)
                    #expect(entry.range.lowerBound % tensor.spec.dtype.elementSizeBytes == 0, "aligned to its element size")
                    #expect(Array(file[Int(entry.range.lowerBound)..<Int(entry.range.upperBound)]) == Array(tensor.bytes), "rank \(rank) \(tensor.spec.name)")
                }
            }
        }
    }

    /// Every snapshotctl failure is one line on stderr and its documented exit code.
    @Test func snapshotctlErrorsAreOneLineWithTheirExitCode() throws {
        let daemon = try DaemonProcess()
        let client = try daemon.unixClient(job: try JobID("exit-codes"), rank: 0, world: 1)
        try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: [("w", .float32, 64)]))
        _ = try client.waitCommitted(step: 1)  // the save returns after the copy; the cases below need it committed
        let wrongSecret = try makeScratchDirectory() + "/wrong-secret"
        try "not-the-secret-0123456789abcdef".write(toFile: wrongSecret, atomically: true, encoding: .utf8)
        let target = try makeScratchDirectory()
        defer {
            try? FileManager.default.removeItem(atPath: (wrongSecret as NSString).deletingLastPathComponent)
            try? FileManager.default.removeItem(atPath: target)
        }
        let cases: [(arguments: [String], status: Int32, says: String)] = [
            (["status", "--socket", daemon.scratch + "/absent.sock"], 4, "no snapshotd socket at"),
            (["status", "--tcp", "127.0.0.1:\(daemon.tcpPort)", "--secret-file", wrongSecret], 4, "refused the secret in \(wrongSecret)"),
            (["status", "--tcp", "127.0.0.1:\(try freeTCPPort())", "--secret-file", daemon.secretPath], 4, "cannot reach snapshotd"),
            (["export", "--socket", daemon.socketPath, "--job", "no-such-job", "--to", target], 5, "no committed step of job no-such-job"),
            (["export", "--socket", daemon.socketPath, "--job", "exit-codes", "--step", "7", "--to", target], 5, "step 7 of exit-codes is not a committed step"),
            (["snapshots", "--socket", daemon.socketPath, "--job", "no-such-job"], 5, "no snapshots of job no-such-job"),
            (["export", "--socket", daemon.socketPath, "--job", "exit-codes", "--to", "/proc/forbidden"], 1, "cannot create directory /proc/forbidden"),
            (["export", "--tcp", "127.0.0.1:\(daemon.tcpPort)", "--secret-file", daemon.secretPath, "--job", "exit-codes", "--to", target], 1,
             "export writes files on the daemon's machine"),
            (["export", "--socket", daemon.socketPath, "--job", "exit-codes", "--to", daemon.arena + "/x"], 1, "overlaps the arena"),
            (["status", "--no-such-flag"], 64, "Unknown option '--no-such-flag'"),
            (["export", "--socket", daemon.socketPath, "--job", "bad job!", "--to", target], 64, "is not a valid job id"),
        ]
        for (arguments, status, says) in cases {
            let run = try runSnapshotctl(arguments)
            #expect(run.status == status, "snapshotctl \(arguments.joined(separator: " ")): \(run.stderr)")
            #expect(run.stderr.contains(says), "snapshotctl \(arguments.joined(separator: " ")): \(run.stderr)")
            if status != 64 {
                #expect(run.stderr.split(separator: "\n").count == 1, "one line: \(run.stderr)")
                #expect(run.stdout.isEmpty)
            }
        }
        #expect(try runSnapshotctl(["export", "--socket", daemon.socketPath, "--job", "exit-codes", "--to", target]).status == 0)
        #expect(daemon.isRunning, "the daemon keeps serving")
    }
}

/// Polls `body` until it returns a value, for up to `seconds`.
func waitFor<T>(seconds: Double, _ what: String, _ body: () throws -> T?) throws -> T {
    let deadline = Date().addingTimeInterval(seconds)
    while true {
        if let value = try body() { return value }
        guard Date() < deadline else { throw HarnessError("gave up after \(seconds) s waiting for \(what)") }
        usleep(50_000)
    }
}
