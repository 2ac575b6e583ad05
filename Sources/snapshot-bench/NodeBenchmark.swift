import ArgumentParser
import CISALReference
import Foundation
import Glibc
import Logging
import SnapshotClient
import SnapshotDaemon
import SnapshotProtocol

/// Save and restore throughput of one node, against memcpy and iperf3 measured
/// in the same run. The daemon runs in-process (same code as snapshotd) on a
/// private arena; the client talks to it over its real Unix socket and TCP.
struct NodeBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node", abstract: "Local and TCP save/restore GB/s vs memcpy and iperf3.")

    @Option(name: .customLong("shard-mib"), help: "Shard size per save, MiB.") var shardMiB = 512
    @Option(help: "Warm-up saves before measuring.") var warmup = 3
    @Option(help: "Measured saves.") var saves = 8

    func run() throws {
        let shardBytes = shardMiB << 20
        let scratch = NSTemporaryDirectory() + "snapshot-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        let secretPath = scratch + "/secret"
        try "benchmark-secret-0123456789".write(toFile: secretPath, atomically: true, encoding: .utf8)
        var config = DaemonConfiguration()
        config.unixSocketPath = scratch + "/snapshotd.sock"
        config.arenaDirectory = "/dev/shm/snapshot-bench-\(getpid())"
        config.tcpListen = "127.0.0.1:0"
        config.sharedSecretFile = secretPath
        config.memoryBudgetBytes = UInt64(shardBytes) * 6
        config.snapshotsKeptPerJob = 1
        var logger = Logger(label: "snapshot-bench")
        logger.logLevel = .warning
        let server = try SnapshotServer(configuration: config, logger: logger)
        try server.start()
        defer {
            server.stop()
            try? FileManager.default.removeItem(atPath: config.arenaDirectory)
            try? FileManager.default.removeItem(atPath: scratch)
        }

        let source = AlignedBuffers(count: 2, byteCount: shardBytes, seed: 11)
        let half = shardBytes / 2
        let specs = [try TensorSpec(name: "params", dtype: .bfloat16, shape: [Int64(half / 2)], kind: .parameter),
                     try TensorSpec(name: "optimizer", dtype: .float32, shape: [Int64(half / 4)], kind: .optimizer)]
        let tensorData = [TensorData(spec: specs[0], bytes: UnsafeRawBufferPointer(start: source.pointers[0], count: half)),
                          TensorData(spec: specs[1], bytes: UnsafeRawBufferPointer(start: source.pointers[0] + half, count: half))]

        print("Node benchmark: one rank, \(shardMiB) MiB shard, \(warmup) warm-up + \(saves) measured saves; GB/s = shard bytes / seconds")
        let memcpySeconds = bestSeconds(rounds: saves) {
            reference_memcpy_seconds(source.pointers[1], source.pointers[0], shardBytes, 1)
        }
        let job = try JobID("bench")
        let local = try SnapshotClient(endpoint: .unix(path: config.unixSocketPath), job: job, rank: 0, world: 1)
        let localSave = try measureSaves(local, tensors: tensorData, firstStep: 1)
        let localRestore = try measureRestores(local)
        let remote = try SnapshotClient(
            endpoint: .tcp(host: "127.0.0.1", port: server.boundTCPPort!, secret: Array("benchmark-secret-0123456789".utf8)),
            job: try JobID("bench-tcp"), rank: 0, world: 1)
        let tcpSave = try measureSaves(remote, tensors: tensorData, firstStep: 1)
        let tcpRestore = try measureRestores(remote)
        let iperf = iperf3GigabytesPerSecond()

        let gb = { (seconds: Double) in gigabytesPerSecond(bytes: shardBytes, seconds: seconds) }
        print("")
        print(padded("figure", 34) + padded("GB/s", 10) + padded("reference", 22) + padded("ratio", 10))
        let memcpyRate = gb(memcpySeconds)
        row("memcpy, touched buffers", memcpyRate, nil, nil)
        row("local save (shm), best", gb(localSave.best), "memcpy", gb(localSave.best) / memcpyRate)
        row("local save (shm), median", gb(localSave.median), "memcpy", gb(localSave.median) / memcpyRate)
        row("local restore (shm, CRC checked)", gb(localRestore), "memcpy", gb(localRestore) / memcpyRate)
        if let iperf {
            row("iperf3 loopback", iperf, nil, nil)
            row("TCP save, best", gb(tcpSave.best), "iperf3", gb(tcpSave.best) / iperf)
            row("TCP save, median", gb(tcpSave.median), "iperf3", gb(tcpSave.median) / iperf)
            row("TCP restore (CRC checked)", gb(tcpRestore), "iperf3", gb(tcpRestore) / iperf)
        } else {
            print("iperf3 not found: TCP figures without their reference")
            row("TCP save, best", gb(tcpSave.best), nil, nil)
            row("TCP restore", gb(tcpRestore), nil, nil)
        }
        print("")
        print("trainer blocking time per local save: best \(format(localSave.best * 1000)) ms, median \(format(localSave.median * 1000)) ms; one memcpy of the shard: \(format(memcpySeconds * 1000)) ms")
    }

    private func row(_ name: String, _ rate: Double, _ reference: String?, _ ratio: Double?) {
        print(padded(name, 34) + padded(format(rate), 10) + padded(reference ?? "", 22) + padded(ratio.map { format($0) + "×" } ?? "", 10))
    }

    /// Times each save call (the trainer's blocking time); waits for the
    /// commit outside the timing, as a trainer's next save comes steps later.
    private func measureSaves(_ client: SnapshotClient, tensors: [TensorData], firstStep: Step) throws -> (best: Double, median: Double) {
        var times: [Double] = []
        for index in 0..<(warmup + saves) {
            let step = firstStep + Step(index)
            let start = nowSeconds()
            try client.save(step: step, tensors: tensors)
            let elapsed = nowSeconds() - start
            try client.waitCommitted(step: step, timeoutMilliseconds: 120_000)
            if index >= warmup { times.append(elapsed) }
        }
        times.sort()
        return (times[0], times[times.count / 2])
    }

    private func measureRestores(_ client: SnapshotClient) throws -> Double {
        try bestSecondsThrowing(rounds: 3) {
            let start = nowSeconds()
            let shard = try client.restore()
            // Touch every tensor once, as a trainer loading it would.
            var sink: UInt8 = 0
            for index in shard.entries.indices {
                let bytes = shard.tensor(at: index)
                if !bytes.isEmpty { sink ^= bytes[bytes.count - 1] }
            }
            let elapsed = nowSeconds() - start
            shard.release()
            _ = sink
            return elapsed
        }
    }
}

/// iperf3 over loopback on this machine, in GB/s; nil when iperf3 is absent.
