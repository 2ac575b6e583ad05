import CheckFree
import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol
import Testing

/// CheckFree on real daemons: a job of 4 pipeline stages × 2 tensor-parallel
/// ranks on 5 nodes (one RS(4,1) group), placed so that losing nodes 2 and 3
/// (m + 1) loses every shard of stage 2 and nothing else:
///
///     node 0: ranks 0, 1 (stage 0)   node 1: ranks 2, 3 (stage 1)
///     node 2: rank 4 (stage 2, tp 0) node 3: rank 5 (stage 2, tp 1)
///     node 4: ranks 6, 7 (stage 3)
@Suite(.serialized) struct CheckFreeRecoveryTests {
    static let placement: [Int] = [0, 0, 1, 1, 2, 3, 4, 4]
    static let world: UInt32 = 8
    static func stage(_ rank: Rank) -> UInt32 { rank / 2 }
    static func gradientNorm(_ rank: Rank) -> Double { 0.25 + Double(stage(rank)) * 0.7 + Double(rank % 2) * 0.05 }

    /// A rank's tensors: layers named stage-locally so stages pair up, the
    /// embedding on stage 0 (carried by stage 1), the LM head on stage 3
    /// (carried by stage 2), optimizer moments and an RNG blob.
    static func specs(_ rank: Rank) throws -> [TensorSpec] {
        var specs = [
            try TensorSpec(name: "layers.0.weight", dtype: .float32, shape: [48, 40], kind: .parameter),
            try TensorSpec(name: "layers.0.bias", dtype: .float16, shape: [40], kind: .parameter),
            try TensorSpec(name: "layers.1.weight", dtype: .bfloat16, shape: [40, 48], kind: .parameter),
            try TensorSpec(name: "layers.0.weight.exp_avg", dtype: .float32, shape: [48, 40], kind: .optimizer),
            try TensorSpec.blob(name: "rng.state", byteCount: 24, kind: .rng),
        ]
        switch stage(rank) {
        case 0: specs.append(try TensorSpec(name: "embed.weight", dtype: .bfloat16, shape: [100, 48], kind: .parameter))
        case 1: specs.append(try TensorSpec(name: "embed.weight", dtype: .bfloat16, shape: [100, 48], kind: .carried))
        case 2: specs.append(try TensorSpec(name: "lm_head.weight", dtype: .float32, shape: [48, 100], kind: .carried))
        default: specs.append(try TensorSpec(name: "lm_head.weight", dtype: .float32, shape: [48, 100], kind: .parameter))
        }
        return specs
    }

    /// Deterministic values: finite floats in [-2, 2] in each dtype; a carried
    /// copy holds exactly its owner's bytes (same seed as the owner's tensor).
    static func bytes(step: Step, rank: Rank, spec: TensorSpec, seed: UInt64) -> [UInt8] {
        var ownerRank = rank
        if spec.kind == .carried { ownerRank = spec.name == "embed.weight" ? rank - 2 : rank + 2 }
        var random = SplitMix64(seed: seed ^ (step &* 0x9E37) ^ (UInt64(ownerRank) << 32) ^ UInt64(spec.name.hashValueStable))
        let count = Int(spec.byteLength / spec.dtype.elementSizeBytes)
        var out: [UInt8] = []
        out.reserveCapacity(Int(spec.byteLength))
        for _ in 0..<count {
            let value = Float(Double(random.next() % 4_000_001) / 1_000_000 - 2)
            switch spec.dtype {
            case .float32: withUnsafeBytes(of: value.bitPattern.littleEndian) { out += $0 }
            case .float16: withUnsafeBytes(of: StageAveraging.float16Bits(value).littleEndian) { out += $0 }
            case .bfloat16: withUnsafeBytes(of: StageAveraging.bfloat16Bits(value).littleEndian) { out += $0 }
            default: out.append(UInt8(truncatingIfNeeded: random.next()))
            }
        }
        return out
    }

    final class Job: @unchecked Sendable {
        let cluster: LocalCluster
        let seed: UInt64
        let saved = Shared<[Step: [Rank: [[UInt8]]]]>([:])
        init(cluster: LocalCluster, seed: UInt64) {
            self.cluster = cluster
            self.seed = seed
        }

        func client(_ rank: Rank) throws -> SnapshotClient {
            let node = CheckFreeRecoveryTests.placement[Int(rank)]
            let local = UInt32(CheckFreeRecoveryTests.placement.filter { $0 == node }.count)
            return try retrying(while: .duplicateRank, seconds: 10) {
                try SnapshotClient(
                    endpoint: .unix(path: cluster.socket(node)), job: cluster.job, rank: rank, world: CheckFreeRecoveryTests.world, localWorld: local,
                    topology: Topology(pipelineStage: CheckFreeRecoveryTests.stage(rank), tensorParallelIndex: rank % 2))
            }
        }

        /// Every rank saves `step`; `poisoned` saves a NaN in its 'layers.0.weight'.
        func save(_ step: Step, poisoned: Rank? = nil) throws {
            try concurrently(0..<CheckFreeRecoveryTests.world) { [self] rank in
                let specs = try CheckFreeRecoveryTests.specs(rank)
                var data = specs.map { CheckFreeRecoveryTests.bytes(step: step, rank: rank, spec: $0, seed: seed) }
                if rank == poisoned { data[0].replaceSubrange(28..<32, with: [0x00, 0x00, 0xC0, 0x7F]) }
                saved.update { $0[step, default: [:]][rank] = data }
                let client = try client(rank)
                try withTensorData(specs, data) { tensors in
                    try client.save(step: step, tensors: tensors, gradientNorm: CheckFreeRecoveryTests.gradientNorm(rank))
                }
                try client.waitCommitted(step: step, timeoutMilliseconds: 60_000)
            }
        }

        func restore(_ rank: Rank) throws -> RestoredShard {
            try retrying(while: .unavailable, seconds: 60) { try client(rank).restore() }
        }
    }

    static func start(_ test: String) throws -> Job {
        let seed = testSeed(test)
        let cluster = try LocalCluster.forTest(nodes: 5, parity: 1, ranksPerNode: 2)
        return Job(cluster: cluster, seed: seed)
    }

    /// Kills `nodes`, starts their replacements and waits until the report
    /// calls the group beyond tolerance with exactly `lost` ranks lost.
    static func lose(_ nodes: [Int], ranks lost: [Rank], in job: Job) throws -> JobRecovery {
        for node in nodes { try job.cluster.kill(node) }
        for node in nodes { try job.cluster.replace(node) }
        let report = try job.cluster.waitForReport(from: 0, seconds: 60) { $0.jobs.first?.lostRanks == lost }
        return report.jobs[0]
    }

    @Test func aLostMiddleStageIsRebuiltFromItsNeighboursAndEveryOtherStageIsExact() throws {
        let job = try Self.start("CheckFree middle stage")
        try job.save(1)
        try job.save(2)
        let recovery = try Self.lose([2, 3], ranks: [4, 5], in: job)
        #expect(recovery.latestCommitted == 2 && recovery.newestRestorable == nil, "\(recovery)")
        #expect(recovery.checkFree.contains("CheckFree can rebuild step 2 approximately: stage 2 (ranks 4,5) as the average of stages 1 and 3"), "\(recovery.checkFree)")

        // The operator's command, for real: the CLI against node 0.
        let run = try runSnapshotctl(["recover", "--checkfree", "--job", "\(job.cluster.job)", "--socket", job.cluster.socket(0), "--json"])
        #expect(run.status == 0, "snapshotctl: \(run.stderr)")
        let output = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
        let ranks = (output?["ranks"] as? [[String: Any]]) ?? []
        #expect(output?["step"] as? Int == 2)
        #expect(ranks.map { $0["rank"] as? Int } == [4, 5])
        #expect(ranks.allSatisfy { $0["method"] as? String == "checkfree-average" && $0["sourceStages"] as? [Int] == [1, 3] && $0["learningRateFactor"] as? Double == 1.1 })

        let saved = try #require(job.saved.value[2])
        for rank in Rank(0)..<Self.world {
            let shard = try job.restore(rank)
            defer { shard.release() }
            #expect(shard.step == 2)
            let specs = try Self.specs(rank)
            guard Self.stage(rank) == 2 else {
                // Every other stage: byte-identical, and not flagged.
                #expect(shard.reconstruction == nil, "rank \(rank)")
                for (index, spec) in specs.enumerated() {
                    #expect(Array(try #require(shard.tensor(named: spec.name))) == saved[rank]![index], "rank \(rank) '\(spec.name)'")
                }
                continue
            }
            let reconstruction = try #require(shard.reconstruction, "rank \(rank) restored without the approximate flag")
            let (previous, next) = (rank - 2, rank + 2)
            let a = Self.gradientNorm(next) + 1e-4, b = Self.gradientNorm(previous) + 1e-4
            #expect(reconstruction.method == .averagedNeighbours)
            #expect(reconstruction.sourceStages == [1, 3] && reconstruction.sourceRanks == [previous, next] && reconstruction.sourceStep == 2)
            #expect(abs(reconstruction.weights[0] - b / (a + b)) < 1e-12 && abs(reconstruction.weights[1] - a / (a + b)) < 1e-12)
            #expect(reconstruction.optimizerReset && reconstruction.learningRateFactor == 1.1)
            for spec in specs {
                let got = Array(try #require(shard.tensor(named: spec.name)))
                let previousIndex = try Self.specs(previous).firstIndex { $0.name == spec.name }
                let nextIndex = try Self.specs(next).firstIndex { $0.name == spec.name }
                switch spec.kind {
                case .parameter:
                    // The formula, in double precision, with the saved norms.
                    let x = decode(saved[previous]![previousIndex!], spec.dtype), y = decode(saved[next]![nextIndex!], spec.dtype)
                    let values = decode(got, spec.dtype)
                    var worst = 0.0
                    for i in values.indices {
                        let exact = (a * y[i] + b * x[i]) / (a + b)
                        worst = max(worst, abs(values[i] - exact) / max(abs(x[i]), abs(y[i]), 1e-3))
                    }
                    let tolerance = spec.dtype == .float32 ? 1e-6 : (spec.dtype == .float16 ? 1e-3 : 8e-3)
                    #expect(worst <= tolerance, "rank \(rank) '\(spec.name)' (\(spec.dtype)): relative error \(worst)")
                case .carried:
                    // The LM head this stage carried comes back exactly from stage 3's own.
                    #expect(got == saved[next]![nextIndex!], "rank \(rank) '\(spec.name)'")
                case .optimizer:
                    #expect(got.allSatisfy { $0 == 0 }, "rank \(rank) '\(spec.name)' should restart at zero")
                case .rng, .extra:
                    #expect(got == saved[previous]![previousIndex!], "rank \(rank) '\(spec.name)' should come from stage 1")
                }
            }
        }
        // The flag survives a daemon restart (it is in the shard's manifest file).
        let before = try job.restore(4)
        let bytesBefore = (0..<before.entries.count).map { Array(before.tensor(at: $0)) }
        before.release()
        try job.cluster.kill(2)
        try job.cluster.run(["node", job.cluster.directory, "2"])
        let after = try job.restore(4)
        defer { after.release() }
        #expect(after.reconstruction == before.reconstruction && after.reconstruction != nil)
        #expect((0..<after.entries.count).map { Array(after.tensor(at: $0)) } == bytesBefore)
        // A second request finds nothing left to rebuild.
        let again = try runSnapshotctl(["recover", "--checkfree", "--job", "\(job.cluster.job)", "--socket", job.cluster.socket(0)])
        #expect(again.status == 3 && again.stderr.contains("nothing for CheckFree to rebuild"), "\(again)")
    }

    @Test func losingTwoNeighbouringStagesIsRefusedWithTheReason() throws {
        let job = try Self.start("CheckFree neighbouring stages")
        try job.save(1)
        // Nodes 1 and 2: stage 1 and half of stage 2.
        let recovery = try Self.lose([1, 2], ranks: [2, 3, 4], in: job)
        #expect(recovery.checkFree.contains("stages 1 and 2 are both lost"), "\(recovery.checkFree)")
        let run = try runSnapshotctl(["recover", "--checkfree", "--job", "\(job.cluster.job)", "--socket", job.cluster.socket(0)])
        #expect(run.status == 3, "\(run)")
        #expect(run.stderr.contains("CheckFree refuses step 1 of \(job.cluster.job): stages 1 and 2 are both lost"), "\(run.stderr)")
        // Nothing was written: the lost ranks still refuse restores.
        #expect(clientErrorCode { try job.client(4).restore() } == .unavailable)
    }
}

extension CheckFreeRecoveryTests {
    /// A neighbour that diverged (NaN in a parameter) is no source: averaging
    /// would spread it into the rebuilt stage. The refusal names the tensor.
    @Test func aNeighbourHoldingNaNIsRefusedAndNamed() throws {
        let job = try Self.start("CheckFree NaN neighbour")
        try job.save(1, poisoned: 7)
        _ = try Self.lose([2, 3], ranks: [4, 5], in: job)
        let run = try runSnapshotctl(["recover", "--checkfree", "--job", "\(job.cluster.job)", "--socket", job.cluster.socket(0)])
        #expect(run.status == 3, "\(run)")
        #expect(run.stderr.contains("tensor 'layers.0.weight' of rank 7 (stage 3) holds NaN or infinity"), "\(run.stderr)")
        // Nothing was served as rebuilt: rank 5 (paired with rank 7) still refuses, and so does rank 4 on its own node.
        #expect(clientErrorCode { try job.client(5).restore() } == .unavailable)
        #expect(clientErrorCode { try job.client(4).restore() } == .unavailable)
        // The report still offers nothing it cannot do: the plan is fine, the data is not.
        #expect(try job.cluster.operatorClient(0).recover().jobs.first?.lostRanks == [4, 5])
    }
}

/// Values of a tensor's bytes as doubles.
func decode(_ bytes: [UInt8], _ dtype: DType) -> [Double] {
    bytes.withUnsafeBytes { raw in
        switch dtype {
        case .float32: return raw.bindMemory(to: Float.self).map(Double.init)
        case .float16: return raw.bindMemory(to: UInt16.self).map { Double(StageAveraging.floatFromFloat16($0)) }
        case .bfloat16: return raw.bindMemory(to: UInt16.self).map { Double(StageAveraging.floatFromBFloat16($0)) }
        default: return raw.map(Double.init)
        }
    }
}

/// Calls `body` with `TensorData` views of `data`.
func withTensorData<R>(_ specs: [TensorSpec], _ data: [[UInt8]], _ body: ([TensorData]) throws -> R) throws -> R {
    let buffers = data.map { bytes -> UnsafeMutableRawBufferPointer in
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 64)
        buffer.copyBytes(from: bytes)
        return buffer
    }
    defer { buffers.forEach { $0.deallocate() } }
    return try body(zip(specs, buffers).map { TensorData(spec: $0, bytes: UnsafeRawBufferPointer(rebasing: $1[0..<Int($0.byteLength)])) })
}

/// Runs this build's snapshotctl; its exit status and output.
func runSnapshotctl(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: Executables.path("snapshotctl"))
    process.arguments = arguments
    let (out, err) = (Pipe(), Pipe())
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
}

extension String {
    /// A hash that is the same in every process (Swift's `hashValue` is seeded per run).
    var hashValueStable: UInt32 { utf8.reduce(2_166_136_261) { ($0 ^ UInt32($1)) &* 16_777_619 } }
}
