import ArgumentParser
import ErasureCoding
import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
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
    @Option(help: "After saving, print WAITING and wait for this step's job-wide commit (for kill -9 tests).") var waitStep: UInt64?
    @Option(help: "How long --wait-step waits, in milliseconds.") var waitTimeoutMs: UInt32 = 120_000
    @Option(help: "Restore this step (0: latest) and verify it byte for byte.") var verifyStep: UInt64?

    func run() throws {
        let client = try connect()
        let sizes = tensorBytes.split(separator: ",").compactMap { Int($0) }
        for step in firstStep..<(firstStep + steps) {
            try save(client, step: step, sizes: sizes)
            if waitCommit { try client.waitCommitted(step: step, timeoutMilliseconds: 120_000) }
        }
        if let waitStep { try wait(client, step: waitStep) }
        if let pauseMidSave { try pause(client, step: pauseMidSave, sizes: sizes) }
        if let verifyStep { try verify(client, step: verifyStep == 0 ? nil : verifyStep, sizes: sizes) }
    }

    private func connect() throws -> SnapshotClient {
        let jobID = try JobID(job)
        let topology = Topology(pipelineStage: stage)
        if let tcp {
            let address: HostPort
            do { address = try HostPort(parsing: tcp) } catch { throw ValidationError("--tcp: \(error)") }
            let (host, port) = (address.host, address.port)
            guard let secret = Authentication.secret(fromFile: secretFile ?? "") else { throw ValidationError("cannot read the shared secret file \(secretFile ?? "(none given)")") }
            return try SnapshotClient(endpoint: .tcp(host: host, port: port, secret: secret), job: jobID, rank: rank, world: world, localWorld: localWorld, topology: topology)
        }
        return try SnapshotClient(endpoint: .unix(path: socket ?? Endpoint.defaultUnixSocketPath), job: jobID, rank: rank, world: world, localWorld: localWorld, topology: topology)
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

    /// Announces the wait first, so a test knows the trainer is (about to be)
    /// blocked in it; prints the step it got when the wait ends.
    private func wait(_ client: SnapshotClient, step: Step) throws {
        FileHandle.standardOutput.write(Data("WAITING step=\(step)\n".utf8))
        let committed = try client.waitCommitted(step: step, timeoutMilliseconds: waitTimeoutMs)
        FileHandle.standardOutput.write(Data("COMMITTED step=\(committed)\n".utf8))
    }

    private func verify(_ client: SnapshotClient, step: Step?, sizes: [Int]) throws {
        let shard = try client.restore(step: step)
        defer { shard.release() }
        let state = SyntheticState(seed: seed, rank: rank, step: shard.step, sizes: sizes)
        defer { state.deallocate() }
        guard state.matches(shard) else {
            throw ValidationError("step \(shard.step) rank \(rank): restored tensors differ from the saved ones")
        }
        print("VERIFIED step=\(shard.step) rank=\(rank) tensors=\(state.tensors.count)")
    }
}

