/// How a shard that erasure coding could not recover was rebuilt
/// approximately from its pipeline neighbours (CheckFree,
/// docs/architecture.md, "CheckFree"). A restored shard carries it so the
/// trainer knows its parameters are an estimate and its optimizer starts fresh.
public struct Reconstruction: Hashable, Sendable, CustomStringConvertible {
    public enum Method: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        /// `W_i = (a·W_{i+1} + b·W_{i−1}) / (a + b)`, per tensor.
        case averagedNeighbours = 1
        /// The first or last stage: a copy of its one neighbour (CheckFree+).
        case copiedNeighbour = 2

        public var description: String {
            switch self {
            case .averagedNeighbours: "checkfree-average"
            case .copiedNeighbour: "checkfree-copy"
            }
        }
    }

    /// What the trainer should multiply the rebuilt stage's learning rate by
    /// (the CheckFree paper's recommendation).
    public static let recommendedLearningRateFactor = 1.1

    public var method: Method
    /// The stages the parameters came from: `[i−1, i+1]` for an average, one stage for a copy.
    public var sourceStages: [UInt32]
    /// The ranks whose shards were read, in the order of `sourceStages`.
    public var sourceRanks: [Rank]
    /// Each source's weight (`b/(a+b)`, `a/(a+b)` for an average; `1` for a copy).
    public var weights: [Double]
    /// The step the sources were saved at (the rebuilt shard's own step).
    public var sourceStep: Step
    /// Optimizer state was not rebuilt: it restores as zeros.
    public var optimizerReset: Bool
    public var learningRateFactor: Double

    public init(
        method: Method, sourceStages: [UInt32], sourceRanks: [Rank], weights: [Double], sourceStep: Step,
        optimizerReset: Bool = true, learningRateFactor: Double = Reconstruction.recommendedLearningRateFactor
    ) {
        self.method = method
        self.sourceStages = sourceStages
        self.sourceRanks = sourceRanks
        self.weights = weights
        self.sourceStep = sourceStep
        self.optimizerReset = optimizerReset
        self.learningRateFactor = learningRateFactor
    }

    public var description: String {
        "approximate (\(method) of stage(s) \(sourceStages.map(String.init).joined(separator: ", ")) at step \(sourceStep)"
            + ", weights \(weights.map { "\($0)" }.joined(separator: ", "))"
            + (optimizerReset ? ", optimizer state reset" : "") + "; raise this stage's learning rate ×\(learningRateFactor))"
    }
}

extension ByteWriter {
    public mutating func write(_ r: Reconstruction) {
        write(r.method.rawValue)
        writeCount(r.sourceStages.count)
        for stage in r.sourceStages { write(stage) }
        writeCount(r.sourceRanks.count)
        for rank in r.sourceRanks { write(rank) }
        writeCount(r.weights.count)
        for weight in r.weights { write(weight) }
        write(r.sourceStep)
        write(r.optimizerReset)
        write(r.learningRateFactor)
    }

    public mutating func writeOptional(_ r: Reconstruction?) {
        write(r != nil)
        if let r { write(r) }
    }
}

extension ByteReader {
    /// A stage has two neighbours at most.
    static let maximumReconstructionSources = 2

    public mutating func readReconstruction() throws(ProtocolError) -> Reconstruction {
        let method = try readEnum(Reconstruction.Method.self, "reconstruction.method")
        let limit = Self.maximumReconstructionSources
        let stageCount = try readCount("reconstruction.sourceStages", limit: limit, minimumElementBytes: 4)
        var stages: [UInt32] = []
        for _ in 0..<stageCount { stages.append(try read(UInt32.self, "reconstruction.sourceStages")) }
        let rankCount = try readCount("reconstruction.sourceRanks", limit: limit, minimumElementBytes: 4)
        var ranks: [Rank] = []
        for _ in 0..<rankCount { ranks.append(try read(Rank.self, "reconstruction.sourceRanks")) }
        let weightCount = try readCount("reconstruction.weights", limit: limit, minimumElementBytes: 8)
        var weights: [Double] = []
        for _ in 0..<weightCount {
            let weight = Double(bitPattern: try read(UInt64.self, "reconstruction.weights"))
            guard weight.isFinite, weight >= 0, weight <= 1 else {
                throw .invalidValue(field: "reconstruction.weights", reason: "must be in [0, 1], got \(weight)")
            }
            weights.append(weight)
        }
        let sources = method == .averagedNeighbours ? 2 : 1
        guard stages.count == sources, ranks.count == sources, weights.count == sources else {
            throw .invalidValue(field: "reconstruction", reason: "\(method) with \(stages.count) stages, \(ranks.count) ranks and \(weights.count) weights")
        }
        let step = try read(Step.self, "reconstruction.sourceStep")
        let reset = try readBool("reconstruction.optimizerReset")
        let factor = Double(bitPattern: try read(UInt64.self, "reconstruction.learningRateFactor"))
        guard factor.isFinite, factor > 0 else {
            throw .invalidValue(field: "reconstruction.learningRateFactor", reason: "must be finite and > 0, got \(factor)")
        }
        return Reconstruction(method: method, sourceStages: stages, sourceRanks: ranks, weights: weights, sourceStep: step, optimizerReset: reset, learningRateFactor: factor)
    }

    public mutating func readOptionalReconstruction() throws(ProtocolError) -> Reconstruction? {
        try readBool("hasReconstruction") ? try readReconstruction() : nil
    }
}
