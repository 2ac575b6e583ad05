import CheckFree
import SnapshotProtocol
import Testing

/// The planner's rules (docs/architecture.md, "CheckFree"), one
/// by one, on reports built here: which neighbours, which weights, which
/// source for every tensor, and a named refusal for everything that does not fit.
@Suite struct CheckFreePlannerTests {
    static func spec(_ name: String, _ kind: TensorKind = .parameter, _ dtype: DType = .float32, _ shape: [Int64] = [4, 4]) -> TensorSpec {
        try! TensorSpec(name: name, dtype: dtype, shape: shape, kind: kind)
    }

    /// `stages` pipeline stages × `replicas` data-parallel ranks; rank = stage·replicas + replica.
    /// Stage 0 owns the embedding (carried by stage 1), the last stage the head (carried by the one before).
    static func job(stages: UInt32 = 4, replicas: UInt32 = 1) -> [StageShard] {
        (0..<stages * replicas).map { rank in
            let stage = rank / replicas
            var specs = [spec("layers.0.weight"), spec("layers.0.bias", .parameter, .bfloat16, [4]), spec("layers.0.weight.exp_avg", .optimizer), spec("rng", .rng, .bytes, [16])]
            if stage == 0 { specs.append(spec("embed.weight", .parameter, .float16, [10, 4])) }
            if stage == 1 { specs.append(spec("embed.weight", .carried, .float16, [10, 4])) }
            if stage == stages - 2 { specs.append(spec("head.weight", .carried)) }
            if stage == stages - 1 { specs.append(spec("head.weight")) }
            return StageShard(
                rank: rank, node: rank, topology: Topology(pipelineStage: stage, dataParallelIndex: rank % replicas), specs: specs,
                gradientNorm: 0.5 + Double(rank))
        }
    }

    static func refusal(_ body: () throws(CheckFreeRefusal) -> CheckFreePlan) -> CheckFreeRefusal? {
        do {
            _ = try body()
            return nil
        } catch {
            return error
        }
    }

    static func index(_ shards: [StageShard], rank: Rank, _ name: String) -> Int { shards[Int(rank)].specs.firstIndex { $0.name == name }! }

    @Test func aMiddleStageIsTheNormWeightedAverageOfItsNeighbours() throws {
        let shards = Self.job(stages: 4, replicas: 2)
        let plan = try CheckFreePlanner.plan(step: 7, shards: shards, lost: [4, 5])
        #expect(plan.step == 7 && plan.ranks.map(\.target.rank) == [4, 5])
        for rankPlan in plan.ranks {
            // Each data-parallel slice pairs with the same slice of the neighbouring stages.
            let rank = rankPlan.target.rank
            let (previous, next) = (rank - 2, rank + 2)
            let r = rankPlan.reconstruction
            #expect(r.method == .averagedNeighbours && r.sourceStages == [1, 3] && r.sourceRanks == [previous, next] && r.sourceStep == 7)
            let a = (0.5 + Double(next)) + 1e-4, b = (0.5 + Double(previous)) + 1e-4
            #expect(abs(r.weights[0] - b / (a + b)) < 1e-15 && abs(r.weights[1] - a / (a + b)) < 1e-15)
            #expect(r.optimizerReset && r.learningRateFactor == 1.1)
            #expect(rankPlan.metadataRank == previous)
            let sources = Dictionary(uniqueKeysWithValues: zip(rankPlan.target.specs.map(\.name), rankPlan.sources))
            #expect(sources["layers.0.weight"] == .average(
                previous: TensorReference(rank: previous, index: Self.index(shards, rank: previous, "layers.0.weight")),
                next: TensorReference(rank: next, index: Self.index(shards, rank: next, "layers.0.weight"))))
            #expect(sources["layers.0.weight.exp_avg"] == .zeros)
            #expect(sources["rng"] == .copy(TensorReference(rank: previous, index: Self.index(shards, rank: previous, "rng"))))
            // The head copy stage 2 carried comes back from stage 3's own head, exactly.
            #expect(sources["head.weight"] == .copy(TensorReference(rank: next, index: Self.index(shards, rank: next, "head.weight"))))
        }
        #expect(plan.sourceRanks == [2, 3, 6, 7])
    }

    @Test func theFirstStageCopiesItsNeighbourAndTakesTheEmbeddingFromTheCarriedCopy() throws {
        let shards = Self.job()
        let plan = try CheckFreePlanner.plan(step: 3, shards: shards, lost: [0])
        let rankPlan = try #require(plan.ranks.first)
        #expect(rankPlan.reconstruction.method == .copiedNeighbour && rankPlan.reconstruction.sourceStages == [1] && rankPlan.reconstruction.weights == [1])
        let sources = Dictionary(uniqueKeysWithValues: zip(rankPlan.target.specs.map(\.name), rankPlan.sources))
        #expect(sources["layers.0.weight"] == .copy(TensorReference(rank: 1, index: Self.index(shards, rank: 1, "layers.0.weight"))))
        #expect(sources["embed.weight"] == .copy(TensorReference(rank: 1, index: Self.index(shards, rank: 1, "embed.weight"))))
        #expect(sources["layers.0.weight.exp_avg"] == .zeros)
    }

    @Test func theLastStageCopiesItsNeighbourAndTakesTheHeadFromTheCarriedCopy() throws {
        let shards = Self.job()
        let plan = try CheckFreePlanner.plan(step: 3, shards: shards, lost: [3])
        let rankPlan = try #require(plan.ranks.first)
        #expect(rankPlan.reconstruction.method == .copiedNeighbour && rankPlan.reconstruction.sourceRanks == [2])
        let sources = Dictionary(uniqueKeysWithValues: zip(rankPlan.target.specs.map(\.name), rankPlan.sources))
        #expect(sources["head.weight"] == .copy(TensorReference(rank: 2, index: Self.index(shards, rank: 2, "head.weight"))))
        #expect(sources["layers.0.bias"] == .copy(TensorReference(rank: 2, index: Self.index(shards, rank: 2, "layers.0.bias"))))
        // Without gradient norms a copy still works: only averages are weighted.
        var unweighted = shards
        for index in unweighted.indices { unweighted[index].gradientNorm = nil }
        #expect((try? CheckFreePlanner.plan(step: 3, shards: unweighted, lost: [3])) != nil)
    }

    @Test func theSecondStageCarryingTheEmbeddingGetsItBackFromTheOwner() throws {
        let shards = Self.job()
        let plan = try CheckFreePlanner.plan(step: 3, shards: shards, lost: [1])
        let rankPlan = try #require(plan.ranks.first)
        let sources = Dictionary(uniqueKeysWithValues: zip(rankPlan.target.specs.map(\.name), rankPlan.sources))
        #expect(sources["embed.weight"] == .copy(TensorReference(rank: 0, index: Self.index(shards, rank: 0, "embed.weight"))))
    }

    @Test func twoNonAdjacentLostStagesAreBothPlanned() throws {
        let plan = try CheckFreePlanner.plan(step: 1, shards: Self.job(stages: 5), lost: [1, 3])
        #expect(plan.ranks.map(\.target.rank) == [1, 3])
        #expect(plan.ranks.map(\.reconstruction.sourceStages) == [[0, 2], [2, 4]])
    }

    @Test func everyRefusalNamesItsReason() {
        let shards = Self.job()
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: shards, lost: []) } == .nothingLost)
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: shards, lost: [1, 2]) } == .adjacentStagesLost(stage: 1, neighbour: 2))

        var flat = shards
        for index in flat.indices { flat[index].topology = Topology() }
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: flat, lost: [1]) } == .noPipelineStages)

        var noNorm = shards
        noNorm[3].gradientNorm = nil
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: noNorm, lost: [2]) } == .missingGradientNorm(rank: 3, stage: 3))

        var huge = shards
        huge[1].gradientNorm = .greatestFiniteMagnitude
        huge[3].gradientNorm = .greatestFiniteMagnitude
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: huge, lost: [2]) } == .unusableGradientNorms(ranks: [1, 3]))

        var renamed = shards
        renamed[3].specs[0].name = "blocks.0.weight"
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: renamed, lost: [2]) }
            == .tensorMissing(rank: 2, tensor: "layers.0.weight", neighbourStages: [1, 3]))

        var reshaped = shards
        reshaped[1].specs[0] = Self.spec("layers.0.weight", .parameter, .float32, [4, 5])
        let mismatch = Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: reshaped, lost: [2]) }
        #expect(mismatch == .tensorMismatch(rank: 2, tensor: "layers.0.weight", neighbourRank: 1, reason: "F32 [4, 4] here, F32 [4, 5] there"))

        var integers = shards
        for rank in [1, 2, 3] { integers[rank].specs[0] = Self.spec("layers.0.weight", .parameter, .int32) }
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: integers, lost: [2]) }
            == .cannotAverage(rank: 2, tensor: "layers.0.weight", dtype: .int32))

        var tensorParallel = shards
        tensorParallel[1].topology.tensorParallelIndex = 1
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: tensorParallel, lost: [2]) }
            == .noCounterpartRank(rank: 2, stage: 2, neighbourStage: 1))

        var noRNG = shards
        noRNG[1].specs.removeAll { $0.name == "rng" }
        #expect(Self.refusal { () throws(CheckFreeRefusal) in try CheckFreePlanner.plan(step: 1, shards: noRNG, lost: [2]) }
            == .tensorMissing(rank: 2, tensor: "rng", neighbourStages: [1]))

        // Every reason reads as a sentence an operator can act on.
        #expect(CheckFreeRefusal.adjacentStagesLost(stage: 2, neighbour: 1).description == "stages 1 and 2 are both lost: CheckFree rebuilds a stage only from intact neighbours")
    }
}
