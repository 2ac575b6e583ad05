public import SnapshotProtocol

/// A node's part in CheckFree rebuilds (docs/architecture.md, "CheckFree") as a
/// pure machine, like ``RebuildMachine``: events in (a planner's order, the
/// node's exact rebuild stopped, a share computed or not, an install done,
/// the clock), actions out ("start computing", "reply", "install this share",
/// "free this share", "log"). It has no clock of its own: every event says
/// what time it is (monotonic milliseconds). The daemon
/// (`CheckFreeRebuild.swift`) executes the actions; `Share` is what the
/// executor computed (segments in the daemon, a number in the tests), held
/// here so that a share is freed or installed exactly once.
///
/// A planner's rebuild goes prepare → commit, or prepare → abort, on every node
/// that hosts lost ranks; one token names it. Here, per step:
///
///     claim ─▶ waiting ─(exact rebuild stopped)─▶ computing ─▶ computed ─(commit)─▶ installing ─▶ gone
///               │ deadline, abort                  │ failed      │ abort, lifetime      │ failed
///               ▼                                  ▼             ▼                      ▼
///            refused                              gone      share freed            share freed
///
/// Rules:
/// - **Erasure coding first.** A claim is granted only while the node's own
///   exact rebuild does not run (it may be retrying that very step); until
///   then it waits, for at most ``claimTimeoutMilliseconds``, and a claim of a
///   step the node holds is refused. A granted claim (``claims(_:)``) keeps
///   the exact rebuild off the step; a waiting one does not.
/// - **One rebuild of a step at a time**, whatever its phase; a second claim is refused.
/// - **Tokens.** Every event names its rebuild's token; one for another
///   token changes nothing, so an abandoned rebuild's late share is freed, not kept.
/// - **Nothing is installed without the planner's commit**, and an abort frees
///   what was computed (or, while computing, marks it to be freed when it arrives).
/// - **A share is not kept forever**: one whose planner never committed or
///   aborted it is freed ``shareLifetimeMilliseconds`` after it was computed.
public struct CheckFreeMachine<Share: Sendable>: Sendable {
    public typealias StepID = ClusterLedger.StepID
    public typealias LogLevel = ProtectionMachine.LogLevel

    /// This node's part in the rebuild of one step.
    public enum Part: Sendable {
        /// Ordered while the exact rebuild runs: granted when it stops, refused at the deadline.
        case waiting(token: UInt64, deadlineMilliseconds: Int64)
        /// Granted: the order's thread fetches the neighbours and computes.
        /// `abandoned`: the planner aborted meanwhile, so the result is freed when it comes.
        case computing(token: UInt64, abandoned: Bool)
        /// Computed; waits for the planner's commit or abort.
        case computed(token: UInt64, share: Share, computedMilliseconds: Int64)
        /// Committed: being written and adopted by the store.
        case installing(token: UInt64, share: Share)

        public var token: UInt64 {
            switch self {
            case .waiting(let token, _), .computing(let token, _), .computed(let token, _, _), .installing(let token, _): token
            }
        }
    }

    /// Why an order is refused. The codes are what a planner, and through it
    /// the operator, sees; nothing was changed by a refused order.
    public enum Refusal: Sendable, Equatable {
        /// The node holds the step: nothing to rebuild here (erasure coding got it back, or it never was lost).
        case alreadyHeld
        /// Another order of the step is claimed, computing or waiting for its commit.
        case inProgress
        /// The exact rebuild still ran at the claim's deadline; the operator may try again.
        case exactRebuildStillRunning
        /// The planner aborted while the claim waited for the exact rebuild.
        case abandonedWhileWaiting
        /// The planner aborted while the share was computed: the share is freed.
        case abandonedWhileComputing
        /// A commit without a computed share of this rebuild (another token, not computed yet, or dropped).
        case noComputedShare
        /// An abort after the commit: the install goes on.
        case alreadyInstalling

        public var code: ErrorCode {
            switch self {
            case .alreadyHeld, .noComputedShare, .alreadyInstalling: .invalidRequest
            case .inProgress, .exactRebuildStillRunning, .abandonedWhileWaiting, .abandonedWhileComputing: .unavailable
            }
        }

        /// The error a planner gets from node `node` for `id`.
        public func error(node: NodeID, step id: StepID) -> StoreError {
            let (job, step) = (id.job, id.step)
            return switch self {
            case .alreadyHeld: StoreError(code, "node \(node) already holds step \(step) of \(job): nothing for CheckFree to rebuild here")
            case .inProgress: StoreError(code, "a CheckFree rebuild of step \(step) of \(job) is already in progress on node \(node)")
            case .exactRebuildStillRunning: StoreError(code, "node \(node) is still running its exact rebuild; try again")
            case .abandonedWhileWaiting: StoreError(code, "the CheckFree rebuild of step \(step) was abandoned while node \(node) waited for its exact rebuild")
            case .abandonedWhileComputing: StoreError(code, "the CheckFree rebuild of step \(step) was abandoned while this node computed its share")
            case .noComputedShare: StoreError(code, "node \(node) has no prepared CheckFree share of step \(step) of \(job) for this rebuild")
            case .alreadyInstalling: StoreError(code, "node \(node) is installing its CheckFree share of step \(step) of \(job): too late to abort")
            }
        }
    }

    /// The answer to a claim the machine took on.
    public enum ClaimAnswer: Sendable, Equatable {
        /// Start computing the share; report ``computeFinished(_:token:share:nowMilliseconds:)`` or ``computeFailed(_:token:nowMilliseconds:)``.
        case granted
        case refused(Refusal)
    }

    /// The answer to the order an event came with.
    public enum Reply: Sendable, Equatable {
        case prepared
        case installed
        case aborted
        case refused(Refusal)
    }

    public enum Action: Sendable {
        /// A claim the machine took on is answered. It may come from a later
        /// event than the claim (the exact rebuild stopped, the deadline, an
        /// abort), so the executor delivers it to the order that waits.
        case answerClaim(StepID, token: UInt64, ClaimAnswer)
        /// The answer to the order of the event just fed (a claim refused at once, a prepare, commit or abort).
        case reply(StepID, token: UInt64, Reply)
        /// Write the share's manifests and commit marker, then let the store
        /// adopt it; report ``installFinished(_:token:nowMilliseconds:)`` or ``installFailed(_:token:nowMilliseconds:)``.
        case installShare(StepID, token: UInt64, Share)
        /// Give back what the share holds; it is no one's any more.
        case freeShare(StepID, token: UInt64, Share)
        case log(LogLevel, String, StepID)
    }

    public let claimTimeoutMilliseconds: Int64
    public let shareLifetimeMilliseconds: Int64
    public private(set) var parts: [StepID: Part] = [:]

    public init(
        claimTimeoutMilliseconds: Int64 = Limits.checkFreeClaimTimeoutMilliseconds,
        shareLifetimeMilliseconds: Int64 = Limits.checkFreeShareLifetimeMilliseconds
    ) {
        self.claimTimeoutMilliseconds = claimTimeoutMilliseconds
        self.shareLifetimeMilliseconds = shareLifetimeMilliseconds
    }

    /// A granted claim holds the step: the exact rebuild leaves it alone
    /// (the node still counts it as missing). A waiting claim does not: the
    /// exact rebuild it waits for may still get the step back.
    public func claims(_ id: StepID) -> Bool {
        switch parts[id] {
        case .computing, .computed, .installing: true
        case .waiting, nil: false
        }
    }

    /// When the claim of `token` stops waiting at the latest; nil when it does not wait.
    public func deadlineMilliseconds(_ id: StepID, token: UInt64) -> Int64? {
        guard case .waiting(token, let deadline) = parts[id] else { return nil }
        return deadline
    }

    // MARK: Events

    /// A planner's prepare order claims the step for rebuild `token`.
    /// `holdsStep`: the node holds a committed share of it.
    public mutating func claim(_ id: StepID, token: UInt64, holdsStep: Bool, exactRebuildRunning: Bool, nowMilliseconds: Int64) -> [Action] {
        var actions = expire(nowMilliseconds: nowMilliseconds)
        if holdsStep { return actions + [.reply(id, token: token, .refused(.alreadyHeld))] }
        if parts[id] != nil { return actions + [.reply(id, token: token, .refused(.inProgress))] }
        if exactRebuildRunning {
            parts[id] = .waiting(token: token, deadlineMilliseconds: nowMilliseconds + claimTimeoutMilliseconds)
            return actions + [.log(.info, "CheckFree order waits for this node's exact rebuild to stop", id)]
        }
        parts[id] = .computing(token: token, abandoned: false)
        actions.append(.answerClaim(id, token: token, .granted))
        return actions
    }

    /// The node's exact rebuild stopped: waiting claims are granted, or
    /// refused for a step it got back. `holds`: whether the node now holds a step.
    public mutating func exactRebuildStopped(nowMilliseconds: Int64, holds: (StepID) -> Bool) -> [Action] {
        tick(nowMilliseconds: nowMilliseconds, exactRebuildRunning: false, holds: holds)
    }

    /// The clock: claims past their deadline are refused and shares past
    /// their lifetime freed. When the exact rebuild is not running, waiting
    /// claims are granted as on ``exactRebuildStopped(nowMilliseconds:holds:)``
    /// (so a missed notification delays a claim by one tick, never forever).
    public mutating func tick(nowMilliseconds: Int64, exactRebuildRunning: Bool, holds: (StepID) -> Bool) -> [Action] {
        var actions = expire(nowMilliseconds: nowMilliseconds)
        guard !exactRebuildRunning else { return actions }
        for (id, part) in parts.sorted(by: { $0.key < $1.key }) {
            guard case .waiting(let token, _) = part else { continue }
            if holds(id) {
                parts[id] = nil
                actions.append(.answerClaim(id, token: token, .refused(.alreadyHeld)))
            } else {
                parts[id] = .computing(token: token, abandoned: false)
                actions.append(.answerClaim(id, token: token, .granted))
            }
        }
        return actions
    }

    /// The share of rebuild `token` is computed: kept for the commit, or
    /// freed if the rebuild was abandoned meanwhile (or is not this one).
    public mutating func computeFinished(_ id: StepID, token: UInt64, share: Share, nowMilliseconds: Int64) -> [Action] {
        var actions = expire(nowMilliseconds: nowMilliseconds)
        guard case .computing(token, let abandoned) = parts[id], !abandoned else {
            if case .computing(token, _) = parts[id] { parts[id] = nil }
            actions.append(.freeShare(id, token: token, share))
            actions.append(.log(.warning, "CheckFree share computed for an abandoned rebuild: dropped", id))
            return actions + [.reply(id, token: token, .refused(.abandonedWhileComputing))]
        }
        parts[id] = .computed(token: token, share: share, computedMilliseconds: nowMilliseconds)
        return actions + [.reply(id, token: token, .prepared)]
    }

    /// Computing the share failed (the executor answers the order with why;
    /// it freed what it had made): the step is free again.
    public mutating func computeFailed(_ id: StepID, token: UInt64, nowMilliseconds: Int64) -> [Action] {
        let actions = expire(nowMilliseconds: nowMilliseconds)
        if case .computing(token, _) = parts[id] { parts[id] = nil }
        return actions
    }

    /// The planner's commit: every node's share is ready, install this one.
    public mutating func commit(_ id: StepID, token: UInt64, nowMilliseconds: Int64) -> [Action] {
        let actions = expire(nowMilliseconds: nowMilliseconds)
        guard case .computed(token, let share, _) = parts[id] else { return actions + [.reply(id, token: token, .refused(.noComputedShare))] }
        parts[id] = .installing(token: token, share: share)
        return actions + [.installShare(id, token: token, share)]
    }

    /// The store adopted the share (its manifests and commit marker were written first).
    public mutating func installFinished(_ id: StepID, token: UInt64, nowMilliseconds: Int64) -> [Action] {
        let actions = expire(nowMilliseconds: nowMilliseconds)
        guard case .installing(token, _) = parts[id] else { return actions }
        parts[id] = nil
        return actions + [.reply(id, token: token, .installed)]
    }

    /// Writing the share failed (the executor answers the commit with why): it is freed.
    public mutating func installFailed(_ id: StepID, token: UInt64, nowMilliseconds: Int64) -> [Action] {
        let actions = expire(nowMilliseconds: nowMilliseconds)
        guard case .installing(token, let share) = parts[id] else { return actions }
        parts[id] = nil
        return actions + [.freeShare(id, token: token, share)]
    }

    /// The planner abandoned rebuild `token` (another node could not compute
    /// its share, or did not answer in time). Always answered "aborted",
    /// unless the commit came first.
    public mutating func abort(_ id: StepID, token: UInt64, nowMilliseconds: Int64) -> [Action] {
        var actions = expire(nowMilliseconds: nowMilliseconds)
        switch parts[id] {
        case .waiting(token, _)?:
            parts[id] = nil
            actions.append(.answerClaim(id, token: token, .refused(.abandonedWhileWaiting)))
        case .computing(token, _)?:
            parts[id] = .computing(token: token, abandoned: true)  // its thread still holds what it computes
        case .computed(token, let share, _)?:
            parts[id] = nil
            actions.append(.freeShare(id, token: token, share))
        case .installing(token, _)?:
            return actions + [.reply(id, token: token, .refused(.alreadyInstalling))]
        default:
            break  // nothing of this rebuild here (never prepared, or already dropped)
        }
        return actions + [.reply(id, token: token, .aborted)]
    }

    /// What time alone decides, before every event: claims past their
    /// deadline are refused, shares past their lifetime freed.
    private mutating func expire(nowMilliseconds: Int64) -> [Action] {
        var actions: [Action] = []
        for (id, part) in parts.sorted(by: { $0.key < $1.key }) {
            switch part {
            case .waiting(let token, let deadline) where nowMilliseconds >= deadline:
                parts[id] = nil
                actions.append(.log(.warning, "CheckFree order refused: this node's exact rebuild still ran after \(claimTimeoutMilliseconds) ms", id))
                actions.append(.answerClaim(id, token: token, .refused(.exactRebuildStillRunning)))
            case .computed(let token, let share, let computed) where nowMilliseconds - computed > shareLifetimeMilliseconds:
                parts[id] = nil
                actions.append(.log(.warning, "CheckFree share dropped: its planner neither committed nor aborted it within \(shareLifetimeMilliseconds) ms", id))
                actions.append(.freeShare(id, token: token, share))
            default:
                break
            }
        }
        return actions
    }
}

extension CheckFreeMachine.Part: Equatable where Share: Equatable {}
extension CheckFreeMachine.Action: Equatable where Share: Equatable {}
