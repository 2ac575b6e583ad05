import ArgumentParser
import ErasureCoding
import Foundation
import Glibc
import SnapshotClient
import SnapshotProtocol

/// A stand-in trainer rank: saves steps of deterministic pseudo-random state
/// (so any process can regenerate and check it), restores and verifies.
/// Used by the tests (e.g. killed with -9 mid-save) and by the demo.
@main
struct TrainerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot-trainer", abstract: "Saves and verifies synthetic training state through snapshotd.")

    @Option(help: "Unix socket of the local snapshotd.") var socket: String?
    @Option(help: "host:port of a remote snapshotd (TCP).") var tcp: String?
    @Option(help: "Shared secret file for TCP.") var secretFile: String?
    @Option var job: String
    @Option var rank: UInt32
    @Option var world: UInt32
    @Option(help: "Ranks of the job using this node's daemon (0: all).") var localWorld: UInt32 = 0
    @Option(help: "Pipeline stage of this rank.") var stage: UInt32 = 0
    @Option(help: "First step to save.") var firstStep: UInt64 = 1
    @Option(help: "Number of steps to save.") var steps: UInt64 = 0
    @Option(help: "Tensor sizes in bytes, comma-separated.") var tensorBytes: String = "1,4096,1048576"
    @Option(help: "Seed of the synthetic state.") var seed: UInt64 = 1
    @Flag(help: "Wait for each step's job-wide commit.") var waitCommit = false
    @Option(help: "Begin this step, write half of it, print PAUSED and hang (for kill -9 tests).") var pauseMidSave: UInt64?
    @Option(help: "Restore this step (0: latest) and verify it byte for byte.") var verifyStep: UInt64?

    func run() throws {
        let client = try connect()
        let sizes = tensorBytes.split(separator: ",").compactMap { Int($0) }
        for step in firstStep..<(firstStep + steps) {
            try save(client, step: step, sizes: sizes)
            if waitCommit { try client.waitCommitted(step: step, timeoutMilliseconds: 120_000) }
        }
        if let pauseMidSave { try pause(client, step: pauseMidSave, sizes: sizes) }
        if let verifyStep { try verify(client, step: verifyStep == 0 ? nil : verifyStep, sizes: sizes) }
    }

    private func connect() throws -> SnapshotClient {
        let jobID = try JobID(job)
        let topology = Topology(pipelineStage: stage)
        if let tcp {
            let (host, port) = (String(tcp.split(separator: ":")[0]), UInt16(tcp.split(separator: ":")[1])!)
            let secret = Array((try String(contentsOfFile: secretFile ?? "", encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines).utf8)
            return try SnapshotClient(endpoint: .tcp(host: host, port: port, secret: secret), job: jobID, rank: rank, world: world, localWorld: localWorld, topology: topology)
        }
        return try SnapshotClient(endpoint: .unix(path: socket ?? "/run/snapshotd/snapshotd.sock"), job: jobID, rank: rank, world: world, localWorld: localWorld, topology: topology)
    }

    private func save(_ client: SnapshotClient, step: Step, sizes: [Int]) throws {
        let state = SyntheticState(seed: seed, rank: rank, step: step, sizes: sizes)
        defer { state.deallocate() }
        try client.save(step: step, tensors: state.tensors, gradientNorm: Double(rank + 1) / 10, metadata: Array("step=\(step)".utf8))
    }

    private func pause(_ client: SnapshotClient, step: Step, sizes: [Int]) throws {
        let state = SyntheticState(seed: seed, rank: rank, step: step, sizes: sizes)
        let pending = try client.beginSave(step: step, specs: state.tensors.map(\.spec))
        try pending.write(tensorIndex: 0, from: state.tensors[0].bytes)
        FileHandle.standardOutput.write(Data("PAUSED\n".utf8))
        while true { sleep(60) }
    }

    private func verify(_ client: SnapshotClient, step: Step?, sizes: [Int]) throws {
        let shard = try client.restore(step: step)
        defer { shard.release() }
        let state = SyntheticState(seed: seed, rank: rank, step: shard.step, sizes: sizes)
        defer { state.deallocate() }
        guard shard.entries.map(\.spec) == state.tensors.map(\.spec) else {
            throw ValidationError("step \(shard.step) rank \(rank): manifest differs from the saved tensors")
        }
        for (index, tensor) in state.tensors.enumerated() {
            let restored = shard.tensor(at: index)
            guard restored.count == tensor.bytes.count, (restored.count == 0 || memcmp(restored.baseAddress!, tensor.bytes.baseAddress!, restored.count) == 0) else {
                throw ValidationError("step \(shard.step) rank \(rank): tensor '\(tensor.spec.name)' differs")
            }
        }
        print("VERIFIED step=\(shard.step) rank=\(rank) tensors=\(state.tensors.count)")
    }
}

/// Deterministic tensors for (seed, rank, step): parameters, optimizer state
/// and an RNG blob, filled by SplitMix64.
struct SyntheticState {
    let buffers: [UnsafeMutableRawBufferPointer]
    let tensors: [TensorData]

    init(seed: UInt64, rank: UInt32, step: UInt64, sizes: [Int]) {
        var specs: [TensorSpec] = []
        for (index, size) in sizes.enumerated() {
            let kind: TensorKind = index == 0 ? .rng : (index % 2 == 1 ? .parameter : .optimizer)
            let name = index == 0 ? "rng.state" : "layers.\(index / 2).\(kind == .parameter ? "weight" : "weight.exp_avg")"
            specs.append(size % 4 == 0
                ? try! TensorSpec(name: name, dtype: .float32, shape: [Int64(size / 4)], kind: kind)
                : try! TensorSpec.blob(name: name, byteCount: size, kind: kind))
        }
        buffers = sizes.map { UnsafeMutableRawBufferPointer.allocate(byteCount: max($0, 1), alignment: 64) }
        var state = seed &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(rank) << 32 ^ step
        for (buffer, size) in zip(buffers, sizes) {
            let words = size / 8
            let pointer = buffer.baseAddress!
            for i in 0..<words {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                pointer.storeBytes(of: z ^ (z >> 31), toByteOffset: i * 8, as: UInt64.self)
            }
            for i in (words * 8)..<size { buffer[i] = UInt8(truncatingIfNeeded: state >> (i % 8 * 8)) }
        }
        tensors = zip(specs, zip(buffers, sizes)).map { TensorData(spec: $0, bytes: UnsafeRawBufferPointer(rebasing: $1.0[0..<$1.1])) }
    }

    func deallocate() { buffers.forEach { $0.deallocate() } }
}
