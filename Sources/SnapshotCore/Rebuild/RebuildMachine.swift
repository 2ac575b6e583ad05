/// The rebuild of a node's missing steps (docs/architecture.md, "Rebuild") as a pure
/// machine, like ``ClusterMonitor`` and ``ProtectionMachine``: events in (a
/// coordinator's order, discovery, the cluster's state pulled, one step's
/// outcome), actions out ("pull the cluster's state", "rebuild this step",
/// "finished, with every step's outcome"). Which steps are missing is the
/// protection machine's to say; each event carries that list. The daemon
/// (``ClusterNode``, `ClusterRebuild.swift`) and the cluster simulation
/// execute the actions.
///
/// Rules:
/// - One run at a time, one step at a time. An order during a run is
///   absorbed: steps that went missing meanwhile are picked up by the run's
///   next pass.
/// - An order before the node has learned the cluster's state waits for it:
///   a node that does not know what was committed cannot know what it misses.
/// - Every step is attempted at most once per run, and a run makes at most
///   ``maximumPasses`` passes over what is missing: a run always ends.
/// - A step ends rebuilt, not rebuildable (the surviving bytes fail their
///   checksums: waiting will not help, the step is reported lost and the
///   node serves its other steps), or failed for now (a peer unreachable:
///   the coordinator's next order tries again).
public struct RebuildMachine: Sendable, Equatable {
    public typealias StepID = ClusterLedger.StepID

    public static let maximumPasses = 4

    public enum Phase: Sendable, Equatable {
        case idle
        /// Ordered before the node learned the cluster's state; starts when it does.
        case orderedBeforeDiscovery
        /// Refreshing the node's knowledge of committed steps before choosing.
        case pullingState
        case rebuilding(StepID)
        /// The run ended; the node counts as rebuilding until the executor
        /// has reported how it went (``reported()``), so whoever sees the
        /// node healthy can read that report.
        case finishing
    }

    public enum Outcome: Sendable, Equatable {
        case rebuilt
        /// The surviving bytes fail their checksums.
        case notRebuildable(reason: String)
        /// Too few fragments could be read now (a peer unreachable, a timeout).
        case failed(reason: String)
    }

    /// What one run did.
    public struct Summary: Sendable, Equatable {
        public var rebuilt: [StepID] = []
        public var notRebuildable: [StepID: String] = [:]
        public var retryLater: [StepID: String] = [:]
        /// Nothing is left for a later order.
        public var isComplete: Bool { retryLater.isEmpty }
    }

    public enum Action: Sendable, Equatable {
        case pullState
        case rebuild(StepID)
        case finished(Summary)
    }

    public private(set) var phase: Phase = .idle
    private var pass = 0
    private var queue: [StepID] = []
    private var attempted: Set<StepID> = []
    private var summary = Summary()

    public init() {}

    public var isRunning: Bool {
        switch phase {
        case .pullingState, .rebuilding, .finishing: true
        case .idle, .orderedBeforeDiscovery: false
        }
    }

    /// The coordinator ordered this node to rebuild. `rebuildable`: the
    /// steps it misses that survivors can serve now.
    public mutating func ordered(discovered: Bool, rebuildable: [StepID]) -> [Action] {
        guard !isRunning else { return [] }
        guard discovered else {
            phase = .orderedBeforeDiscovery
            return []
        }
        guard !rebuildable.isEmpty else {
            phase = .idle
            return []
        }
        phase = .pullingState
        pass = 0
        queue = []
        attempted = []
        summary = Summary()
        return [.pullState]
    }

    /// The node learned the cluster's state: an order that came before starts now.
    public mutating func discovered(rebuildable: [StepID]) -> [Action] {
        guard phase == .orderedBeforeDiscovery else { return [] }
        return ordered(discovered: true, rebuildable: rebuildable)
    }

    public mutating func statePulled(rebuildable: [StepID]) -> [Action] {
        guard phase == .pullingState else { return [] }
        return next(rebuildable: rebuildable)
    }

    /// The step the machine asked for ended with `outcome`.
    public mutating func stepFinished(_ id: StepID, _ outcome: Outcome, rebuildable: [StepID]) -> [Action] {
        guard phase == .rebuilding(id) else { return [] }
        switch outcome {
        case .rebuilt: summary.rebuilt.append(id)
        case .notRebuildable(let reason): summary.notRebuildable[id] = reason
        case .failed(let reason): summary.retryLater[id] = reason
        }
        return next(rebuildable: rebuildable)
    }

    /// The next step of this pass that is still missing (retention or a
    /// concurrent commit may have settled one meanwhile), a new pass over
    /// what went missing since, or the end of the run.
    private mutating func next(rebuildable: [StepID]) -> [Action] {
        let missing = Set(rebuildable)
        while true {
            if queue.isEmpty {
                guard pass < Self.maximumPasses else { break }
                queue = rebuildable.filter { !attempted.contains($0) }
                guard !queue.isEmpty else { break }
                pass += 1
            }
            let id = queue.removeFirst()
            guard missing.contains(id), !attempted.contains(id) else { continue }
            attempted.insert(id)
            phase = .rebuilding(id)
            return [.rebuild(id)]
        }
        phase = .finishing
        defer { summary = Summary() }
        return [.finished(summary)]
    }

    /// The executor reported the run's summary: the run is over.
    public mutating func reported() {
        guard phase == .finishing else { return }
        phase = .idle
    }
}
