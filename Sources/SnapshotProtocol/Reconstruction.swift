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

// MARK: Messages

/// A peer asks for one rank's committed shard (bulk reply: ``ShardData``).
public struct ShardGet: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var rank: Rank
    public init(job: JobID, step: Step, rank: Rank) {
        self.job = job
        self.step = step
        self.rank = rank
    }
}

/// A shard's segment, served whole (bulk = `segmentSizeBytes`). The asker
/// knows its manifest from the cluster's reports and checks every tensor's CRC.
public struct ShardData: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var rank: Rank
    public var segmentSizeBytes: UInt64
    public init(job: JobID, step: Step, rank: Rank, segmentSizeBytes: UInt64) {
        self.job = job
        self.step = step
        self.rank = rank
        self.segmentSizeBytes = segmentSizeBytes
    }
}

/// Rebuild a job's lost pipeline stages approximately (CheckFree). From an
/// operator (`request`): plan with the cluster's view and drive the nodes
/// that host the lost ranks. Between daemons, all or nothing: every such
/// node first computes its share (`prepare`), and only when all succeeded
/// installs it (`commit`); otherwise each drops what it computed (`abort`).
public struct CheckFreeRequest: Hashable, Sendable {
    public enum Phase: UInt8, Sendable, CaseIterable {
        case request = 0, prepare, commit, abort
    }

    public var job: JobID
    public var phase: Phase
    /// The step the planner chose; nil in an operator's request.
    public var step: Step?
    /// Names one rebuild across its phases (0 in an operator's request).
    public var token: UInt64
    public init(job: JobID, phase: Phase = .request, step: Step? = nil, token: UInt64 = 0) {
        self.job = job
        self.phase = phase
        self.step = step
        self.token = token
    }
}

/// One rank that was rebuilt approximately.
public struct RankReconstruction: Hashable, Sendable {
    public var rank: Rank
    public var stage: UInt32
    public var node: NodeID
    public var reconstruction: Reconstruction
    public init(rank: Rank, stage: UInt32, node: NodeID, reconstruction: Reconstruction) {
        self.rank = rank
        self.stage = stage
        self.node = node
        self.reconstruction = reconstruction
    }
}

/// What a CheckFree rebuild did.
public struct CheckFreeReply: Hashable, Sendable {
    public var job: JobID
    public var step: Step
    public var ranks: [RankReconstruction]
    public var summary: String
    public init(job: JobID, step: Step, ranks: [RankReconstruction], summary: String) {
        self.job = job
        self.step = step
        self.ranks = ranks
        self.summary = summary
    }
}

extension ByteWriter {
    mutating func write(_ m: CheckFreeReply) {
        write(m.job)
        write(m.step)
        writeCount(m.ranks.count)
        for r in m.ranks {
            write(r.rank)
            write(r.stage)
            write(r.node)
            write(r.reconstruction)
        }
        write(m.summary)
    }
}

extension ByteReader {
    mutating func readCheckFreeReply() throws(ProtocolError) -> CheckFreeReply {
        let job = try readJobID()
        let step = try read(Step.self, "step")
        let count = try readCount("ranks", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 12)
        var ranks: [RankReconstruction] = []
        for _ in 0..<count {
            ranks.append(RankReconstruction(
                rank: try read(Rank.self, "rank"), stage: try read(UInt32.self, "stage"), node: try read(NodeID.self, "node"),
                reconstruction: try readReconstruction()))
        }
        return CheckFreeReply(job: job, step: step, ranks: ranks, summary: try readString("summary", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true))
    }
}
