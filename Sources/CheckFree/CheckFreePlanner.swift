public import SnapshotProtocol

/// One rank's shard of a step as the cluster's reports describe it: enough
/// to plan a CheckFree rebuild without reading any tensor bytes.
public struct StageShard: Sendable, Equatable {
    public var rank: Rank
    public var node: NodeID
    public var topology: Topology
    public var specs: [TensorSpec]
    public var gradientNorm: Double?

    public init(rank: Rank, node: NodeID, topology: Topology, specs: [TensorSpec], gradientNorm: Double?) {
        self.rank = rank
        self.node = node
        self.topology = topology
        self.specs = specs
        self.gradientNorm = gradientNorm
    }

    public var stage: UInt32 { topology.pipelineStage }
}

/// A tensor of a source shard: `index` into its specs.
public struct TensorReference: Sendable, Equatable {
    public var rank: Rank
    public var index: Int
    public init(rank: Rank, index: Int) {
        self.rank = rank
        self.index = index
    }
}

/// Where each tensor of a rebuilt shard comes from.
public enum TensorSource: Sendable, Equatable {
    /// `weightPrevious·previous + weightNext·next` (the plan's reconstruction holds the weights).
    case average(previous: TensorReference, next: TensorReference)
    /// A byte copy: parameters of a first or last stage, embedding and LM-head
    /// copies, RNG and extra state from the neighbour used.
    case copy(TensorReference)
    /// Optimizer state starts fresh.
    case zeros
}

/// How to rebuild one lost rank.
public struct RankPlan: Sendable, Equatable {
    public var target: StageShard
    public var reconstruction: Reconstruction
    /// One per tensor of `target.specs`, in order.
    public var sources: [TensorSource]
    /// The rank whose metadata the rebuilt shard takes (the neighbour whose RNG it takes).
    public var metadataRank: Rank
}

public struct CheckFreePlan: Sendable, Equatable {
    public var step: Step
    public var ranks: [RankPlan]

    /// The distinct source ranks each plan reads, in rank order.
    public var sourceRanks: [Rank] { Array(Set(ranks.flatMap(\.reconstruction.sourceRanks))).sorted() }
}

/// Why CheckFree will not rebuild a step: never a silent guess.
public enum CheckFreeRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    case nothingLost
    case noPipelineStages
    case adjacentStagesLost(stage: UInt32, neighbour: UInt32)
    case noCounterpartRank(rank: Rank, stage: UInt32, neighbourStage: UInt32)
    case missingGradientNorm(rank: Rank, stage: UInt32)
    case unusableGradientNorms(ranks: [Rank])
    case tensorMissing(rank: Rank, tensor: String, neighbourStages: [UInt32])
    case tensorMismatch(rank: Rank, tensor: String, neighbourRank: Rank, reason: String)
    case cannotAverage(rank: Rank, tensor: String, dtype: DType)
    case nonFinite(tensor: String, sourceRank: Rank, sourceStage: UInt32)

    public var description: String {
        switch self {
        case .nothingLost: "no rank of the step is lost: nothing for CheckFree to rebuild"
        case .noPipelineStages: "the job has no pipeline stages (every rank reported stage 0): CheckFree needs neighbouring stages"
        case .adjacentStagesLost(let stage, let neighbour):
            "stages \(min(stage, neighbour)) and \(max(stage, neighbour)) are both lost: CheckFree rebuilds a stage only from intact neighbours"
        case .noCounterpartRank(let rank, let stage, let neighbourStage):
            "rank \(rank) (stage \(stage)) has no rank with the same tensor- and data-parallel index in stage \(neighbourStage)"
        case .missingGradientNorm(let rank, let stage):
            "rank \(rank) (stage \(stage)) saved no gradient norm: the average is weighted by the neighbours' norms (pass gradient_norm to save)"
        case .unusableGradientNorms(let ranks):
            "the gradient norms of ranks \(ranks.map(String.init).joined(separator: " and ")) cannot weigh an average (not finite, negative, or overflowing)"
        case .tensorMissing(let rank, let tensor, let stages):
            "tensor '\(tensor)' of rank \(rank) has no counterpart in stage(s) \(stages.map(String.init).joined(separator: " and ")) (tensor sets differ; name tensors stage-locally, mark embedding/LM-head copies as carried)"
        case .tensorMismatch(let rank, let tensor, let neighbourRank, let reason):
            "tensor '\(tensor)' of rank \(rank) differs from rank \(neighbourRank)'s: \(reason)"
        case .cannotAverage(let rank, let tensor, let dtype):
            "tensor '\(tensor)' of rank \(rank) is a \(dtype) parameter: CheckFree averages float32, float16 and bfloat16 only"
        case .nonFinite(let tensor, let rank, let stage):
            "tensor '\(tensor)' of rank \(rank) (stage \(stage)) holds NaN or infinity: rebuilding from it would spread it; restore an older step or the durable copy"
        }
    }
}

/// Decides how to rebuild lost pipeline stages from their neighbours
/// (docs/architecture.md, "CheckFree"). Pure: the cluster's
/// reports in, a plan or a refusal out.
public enum CheckFreePlanner {
    /// Plans the rebuild of every lost rank of `step`.
    ///
    /// - Parameters:
    ///   - shards: every rank's shard of the step (lost ones included: their
    ///     manifests say what to rebuild).
    ///   - lost: the ranks erasure coding cannot recover.
    public static func plan(step: Step, shards: [StageShard], lost: Set<Rank>) throws(CheckFreeRefusal) -> CheckFreePlan {
        guard !lost.isEmpty else { throw .nothingLost }
        let stages = Set(shards.map(\.stage))
        guard stages.count > 1, let first = stages.min(), let last = stages.max() else { throw .noPipelineStages }
        let lostStages = Set(shards.filter { lost.contains($0.rank) }.map(\.stage))
        var plans: [RankPlan] = []
        for target in shards.filter({ lost.contains($0.rank) }).sorted(by: { $0.rank < $1.rank }) {
            let stage = target.stage
            let previousStage: UInt32? = stage > first ? stage - 1 : nil
            let nextStage: UInt32? = stage < last ? stage + 1 : nil
            for neighbour in [previousStage, nextStage].compactMap({ $0 }) where lostStages.contains(neighbour) {
                throw .adjacentStagesLost(stage: stage, neighbour: neighbour)
            }
            func counterpart(in neighbourStage: UInt32) throws(CheckFreeRefusal) -> StageShard {
                let match = shards.first {
                    $0.stage == neighbourStage && $0.topology.tensorParallelIndex == target.topology.tensorParallelIndex
                        && $0.topology.dataParallelIndex == target.topology.dataParallelIndex
                }
                guard let match else { throw .noCounterpartRank(rank: target.rank, stage: stage, neighbourStage: neighbourStage) }
                return match
            }
            let previous = try previousStage.map { s throws(CheckFreeRefusal) in try counterpart(in: s) }
            let next = try nextStage.map { s throws(CheckFreeRefusal) in try counterpart(in: s) }
            plans.append(try planRank(target, step: step, previous: previous, next: next))
        }
        return CheckFreePlan(step: step, ranks: plans)
    }

    private static func planRank(_ target: StageShard, step: Step, previous: StageShard?, next: StageShard?) throws(CheckFreeRefusal) -> RankPlan {
        let neighbours = [previous, next].compactMap { $0 }
        let reconstruction: Reconstruction
        if let previous, let next {
            guard let normPrevious = previous.gradientNorm else { throw .missingGradientNorm(rank: previous.rank, stage: previous.stage) }
            guard let normNext = next.gradientNorm else { throw .missingGradientNorm(rank: next.rank, stage: next.stage) }
            guard let weights = StageAveraging.weights(normPrevious: normPrevious, normNext: normNext) else {
                throw .unusableGradientNorms(ranks: [previous.rank, next.rank])
            }
            reconstruction = Reconstruction(
                method: .averagedNeighbours, sourceStages: [previous.stage, next.stage], sourceRanks: [previous.rank, next.rank],
                weights: [weights.previous, weights.next], sourceStep: step)
        } else {
            let only = neighbours[0]
            reconstruction = Reconstruction(method: .copiedNeighbour, sourceStages: [only.stage], sourceRanks: [only.rank], weights: [1], sourceStep: step)
        }
        // RNG, extra state and metadata come from one neighbour: the previous
        // stage when there are two (it feeds this stage's inputs), else the only one.
        let primary = previous ?? next!
        let indices = Dictionary(uniqueKeysWithValues: neighbours.map { n in
            (n.rank, Dictionary(n.specs.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a }))
        })
        func find(_ name: String, in shard: StageShard, kinds: Set<TensorKind>) -> TensorReference? {
            guard let index = indices[shard.rank]?[name], kinds.contains(shard.specs[index].kind) else { return nil }
            return TensorReference(rank: shard.rank, index: index)
        }
        func checked(_ reference: TensorReference, against spec: TensorSpec) throws(CheckFreeRefusal) -> TensorReference {
            let source = neighbours.first { $0.rank == reference.rank }!.specs[reference.index]
            guard source.dtype == spec.dtype, source.shape == spec.shape else {
                throw .tensorMismatch(
                    rank: target.rank, tensor: spec.name, neighbourRank: reference.rank,
                    reason: "\(spec.dtype) \(spec.shape) here, \(source.dtype) \(source.shape) there")
            }
            return reference
        }
        var sources: [TensorSource] = []
        sources.reserveCapacity(target.specs.count)
        for spec in target.specs {
            let missing = CheckFreeRefusal.tensorMissing(rank: target.rank, tensor: spec.name, neighbourStages: neighbours.map(\.stage))
            switch spec.kind {
            case .optimizer:
                sources.append(.zeros)
            case .rng, .extra:
                guard let reference = find(spec.name, in: primary, kinds: [spec.kind]) else {
                    throw .tensorMissing(rank: target.rank, tensor: spec.name, neighbourStages: [primary.stage])
                }
                sources.append(.copy(try checked(reference, against: spec)))
            case .carried:
                // This stage carried a copy of a neighbour's own tensor: the original is exact.
                let original = neighbours.lazy.compactMap { find(spec.name, in: $0, kinds: [.parameter]) }.first
                    ?? neighbours.lazy.compactMap { find(spec.name, in: $0, kinds: [.carried]) }.first
                guard let original else { throw missing }
                sources.append(.copy(try checked(original, against: spec)))
            case .parameter:
                let asParameter = neighbours.map { find(spec.name, in: $0, kinds: [.parameter]) }
                if asParameter.allSatisfy({ $0 != nil }) {
                    let references = try asParameter.map { r throws(CheckFreeRefusal) in try checked(r!, against: spec) }
                    if references.count == 2 {
                        guard StageAveraging.canAverage(spec.dtype) else { throw .cannotAverage(rank: target.rank, tensor: spec.name, dtype: spec.dtype) }
                        sources.append(.average(previous: references[0], next: references[1]))
                    } else {
                        sources.append(.copy(references[0]))
                    }
                } else if asParameter.allSatisfy({ $0 == nil }),
                    let carried = neighbours.lazy.compactMap({ find(spec.name, in: $0, kinds: [.carried]) }).first
                {
                    // The embedding or LM head this stage owns, carried by a neighbour (CheckFree+).
                    sources.append(.copy(try checked(carried, against: spec)))
                } else {
                    throw missing
                }
            }
        }
        return RankPlan(target: target, reconstruction: reconstruction, sources: sources, metadataRank: primary.rank)
    }
}
