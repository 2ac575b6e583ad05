import Foundation
import SnapshotProtocol
import Testing

@testable import SnapshotCore

/// The CheckFree lifecycle machine (claim → compute → install or abort),
/// driven event by event through the interleavings that matter, then through
/// seeded random ones checked against its invariants. Its runs on real
/// daemons are CheckFreeRecoveryTests.
@Suite("CheckFree lifecycle")
struct CheckFreeLifecycleTests {
    typealias Machine = CheckFreeMachine<Int>
    typealias StepID = Machine.StepID

    static let claimTimeoutMilliseconds: Int64 = 1_000
    static let shareLifetimeMilliseconds: Int64 = 5_000
    static let node: NodeID = 3

    let job: JobID
    let id: StepID
    let other: StepID

    init() throws {
        job = try JobID("checkfree-job")
        id = StepID(job: job, step: 7)
        other = StepID(job: job, step: 8)
    }

    func machine() -> Machine {
        Machine(claimTimeoutMilliseconds: Self.claimTimeoutMilliseconds, shareLifetimeMilliseconds: Self.shareLifetimeMilliseconds)
    }

    /// The actions other than log lines (which the tests check only where they say something a test needs).
    func quiet(_ actions: [Machine.Action]) -> [Machine.Action] {
        actions.filter { if case .log = $0 { false } else { true } }
    }

    /// Claims `id` for `token` with nothing in the way and computes share `share`: the step is computed.
    func computed(_ machine: inout Machine, _ id: StepID, token: UInt64, share: Int, at now: Int64) {
        #expect(machine.claim(id, token: token, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: now) == [.answerClaim(id, token: token, .granted)])
        #expect(machine.computeFinished(id, token: token, share: share, nowMilliseconds: now) == [.reply(id, token: token, .prepared)])
    }

    /// No step is held.
    static func never(_: StepID) -> Bool { false }

    // MARK: Claims and the exact rebuild

    @Test func aClaimWhileTheExactRebuildRunsWaitsAndIsGrantedWhenItStops() {
        var machine = machine()
        let waits = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 100)
        #expect(quiet(waits).isEmpty, "no answer yet: the order waits")
        #expect(waits.contains { if case .log(.info, _, id) = $0 { true } else { false } })
        #expect(machine.parts[id] == .waiting(token: 11, deadlineMilliseconds: 100 + Self.claimTimeoutMilliseconds))
        #expect(machine.deadlineMilliseconds(id, token: 11) == 1_100)
        #expect(machine.deadlineMilliseconds(id, token: 12) == nil)
        #expect(!machine.claims(id), "a waiting claim leaves the step to the exact rebuild")
        // The clock while the exact rebuild still runs changes nothing.
        #expect(machine.tick(nowMilliseconds: 600, exactRebuildRunning: true, holds: Self.never).isEmpty)
        #expect(machine.exactRebuildStopped(nowMilliseconds: 700, holds: Self.never) == [.answerClaim(id, token: 11, .granted)])
        #expect(machine.parts[id] == .computing(token: 11, abandoned: false))
        #expect(machine.claims(id), "a granted claim keeps the exact rebuild off the step")
    }

    @Test func aClaimStillWaitingAtItsDeadlineIsRefusedAsBefore() {
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        #expect(machine.tick(nowMilliseconds: 999, exactRebuildRunning: true, holds: Self.never).isEmpty)
        let actions = machine.tick(nowMilliseconds: 1_000, exactRebuildRunning: true, holds: Self.never)
        #expect(quiet(actions) == [.answerClaim(id, token: 11, .refused(.exactRebuildStillRunning))])
        #expect(actions.contains { if case .log(.warning, _, id) = $0 { true } else { false } })
        #expect(machine.parts.isEmpty)
        // The code and words the planner (and the operator through it) saw before the machine.
        let error = Machine.Refusal.exactRebuildStillRunning.error(node: Self.node, step: id)
        #expect(error.code == .unavailable)
        #expect(error.message == "node 3 is still running its exact rebuild; try again")
        // The exact rebuild stopping after the deadline grants nothing.
        #expect(machine.exactRebuildStopped(nowMilliseconds: 1_001, holds: Self.never).isEmpty)
    }

    @Test func theDeadlineWinsOverALateStopNotification() {
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        // No tick came at the deadline; the stop notification arrives after it.
        #expect(quiet(machine.exactRebuildStopped(nowMilliseconds: 1_500, holds: Self.never)) == [.answerClaim(id, token: 11, .refused(.exactRebuildStillRunning))])
    }

    @Test func aTickGrantsAWaitingClaimWhoseStopNotificationWasMissed() {
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        #expect(machine.tick(nowMilliseconds: 400, exactRebuildRunning: false, holds: Self.never) == [.answerClaim(id, token: 11, .granted)])
    }

    @Test func aClaimOfAHeldStepIsRefusedAtOnceOrWhenTheExactRebuildGotItBack() {
        var machine = machine()
        #expect(machine.claim(id, token: 11, holdsStep: true, exactRebuildRunning: false, nowMilliseconds: 0) == [.reply(id, token: 11, .refused(.alreadyHeld))])
        #expect(machine.parts.isEmpty)
        let error = Machine.Refusal.alreadyHeld.error(node: Self.node, step: id)
        #expect(error.code == .invalidRequest)
        #expect(error.message == "node 3 already holds step 7 of checkfree-job: nothing for CheckFree to rebuild here")
        // Waiting, and the exact rebuild it waited for recovered the step: erasure coding first.
        _ = machine.claim(id, token: 12, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        _ = machine.claim(other, token: 13, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        let stopped = machine.exactRebuildStopped(nowMilliseconds: 10) { $0 == id }
        #expect(stopped == [.answerClaim(id, token: 12, .refused(.alreadyHeld)), .answerClaim(other, token: 13, .granted)])
        #expect(machine.parts[id] == nil && machine.claims(other))
    }

    @Test func aSecondClaimOfTheStepIsRefusedInEveryPhaseOfTheFirst() {
        let refused: [Machine.Action] = [.reply(id, token: 99, .refused(.inProgress))]
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        #expect(machine.claim(id, token: 99, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 1) == refused, "waiting")
        _ = machine.exactRebuildStopped(nowMilliseconds: 2, holds: Self.never)
        #expect(machine.claim(id, token: 99, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 3) == refused, "computing")
        _ = machine.computeFinished(id, token: 11, share: 1, nowMilliseconds: 4)
        #expect(machine.claim(id, token: 99, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 5) == refused, "computed")
        _ = machine.commit(id, token: 11, nowMilliseconds: 6)
        #expect(machine.claim(id, token: 99, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 7) == refused, "installing")
        // The same token again is no exception: one order per step at a time.
        #expect(machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 8) == [.reply(id, token: 11, .refused(.inProgress))])
        // Another step is not in the way.
        #expect(machine.claim(other, token: 99, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 9) == [.answerClaim(other, token: 99, .granted)])
        #expect(machine.parts[id] == .installing(token: 11, share: 1))
        let error = Machine.Refusal.inProgress.error(node: Self.node, step: id)
        #expect(error.code == .unavailable)
        #expect(error.message == "a CheckFree rebuild of step 7 of checkfree-job is already in progress on node 3")
    }

    // MARK: Compute, commit, install

    @Test func aCommittedShareIsInstalledOnce() {
        var machine = machine()
        computed(&machine, id, token: 11, share: 42, at: 0)
        #expect(machine.parts[id] == .computed(token: 11, share: 42, computedMilliseconds: 0))
        #expect(machine.commit(id, token: 11, nowMilliseconds: 10) == [.installShare(id, token: 11, 42)])
        #expect(machine.claims(id), "the exact rebuild stays off the step while it is installed")
        // A second commit (a repeated order) installs nothing twice.
        #expect(machine.commit(id, token: 11, nowMilliseconds: 11) == [.reply(id, token: 11, .refused(.noComputedShare))])
        #expect(machine.installFinished(id, token: 11, nowMilliseconds: 12) == [.reply(id, token: 11, .installed)])
        #expect(machine.parts.isEmpty && !machine.claims(id))
    }

    @Test func aCommitWithoutAComputedShareOfItsRebuildIsRefused() {
        var machine = machine()
        let refusal = Machine.Refusal.noComputedShare
        #expect(machine.commit(id, token: 11, nowMilliseconds: 0) == [.reply(id, token: 11, .refused(refusal))], "never prepared")
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 0)
        #expect(machine.commit(id, token: 11, nowMilliseconds: 1) == [.reply(id, token: 11, .refused(refusal))], "still computing")
        _ = machine.computeFinished(id, token: 11, share: 5, nowMilliseconds: 2)
        #expect(machine.commit(id, token: 12, nowMilliseconds: 3) == [.reply(id, token: 12, .refused(refusal))], "another rebuild's token")
        #expect(machine.parts[id] == .computed(token: 11, share: 5, computedMilliseconds: 2))
        #expect(refusal.code == .invalidRequest)
        #expect(refusal.error(node: Self.node, step: id).message == "node 3 has no prepared CheckFree share of step 7 of checkfree-job for this rebuild")
    }

    @Test func aFailedInstallFreesTheShareAndTheStep() {
        var machine = machine()
        computed(&machine, id, token: 11, share: 42, at: 0)
        _ = machine.commit(id, token: 11, nowMilliseconds: 1)
        #expect(machine.installFailed(id, token: 11, nowMilliseconds: 2) == [.freeShare(id, token: 11, 42)])
        #expect(machine.parts.isEmpty)
        #expect(machine.claim(id, token: 12, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 3) == [.answerClaim(id, token: 12, .granted)])
    }

    @Test func aFailedComputeFreesTheStep() {
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 0)
        #expect(machine.computeFailed(id, token: 12, nowMilliseconds: 1).isEmpty)
        #expect(machine.parts[id] != nil, "another token's failure is not this claim's")
        #expect(machine.computeFailed(id, token: 11, nowMilliseconds: 2).isEmpty)
        #expect(machine.parts.isEmpty)
    }

    // MARK: Abort and tokens

    @Test func anAbortBeforeTheComputeEndsDropsTheLateShare() {
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 0)
        #expect(machine.abort(id, token: 11, nowMilliseconds: 1) == [.reply(id, token: 11, .aborted)])
        #expect(machine.parts[id] == .computing(token: 11, abandoned: true))
        // Still the step's: a new rebuild waits until the old computation has given back its memory.
        #expect(machine.claim(id, token: 12, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 2) == [.reply(id, token: 12, .refused(.inProgress))])
        let late = machine.computeFinished(id, token: 11, share: 42, nowMilliseconds: 3)
        #expect(quiet(late) == [.freeShare(id, token: 11, 42), .reply(id, token: 11, .refused(.abandonedWhileComputing))])
        #expect(machine.parts.isEmpty)
        #expect(machine.commit(id, token: 11, nowMilliseconds: 4) == [.reply(id, token: 11, .refused(.noComputedShare))], "nothing to install")
        let error = Machine.Refusal.abandonedWhileComputing.error(node: Self.node, step: id)
        #expect(error.code == .unavailable)
        #expect(error.message == "the CheckFree rebuild of step 7 was abandoned while this node computed its share")
    }

    @Test func aShareOfAnotherTokenIsFreedNotKept() {
        var machine = machine()
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: 0)
        #expect(quiet(machine.computeFinished(id, token: 12, share: 9, nowMilliseconds: 1)) == [.freeShare(id, token: 12, 9), .reply(id, token: 12, .refused(.abandonedWhileComputing))])
        #expect(machine.parts[id] == .computing(token: 11, abandoned: false), "the live claim is untouched")
    }

    @Test func anAbortInEachPhase() {
        var machine = machine()
        // Waiting: the claim is refused, so its order stops waiting and computes nothing.
        _ = machine.claim(id, token: 11, holdsStep: false, exactRebuildRunning: true, nowMilliseconds: 0)
        #expect(machine.abort(id, token: 11, nowMilliseconds: 1) == [.answerClaim(id, token: 11, .refused(.abandonedWhileWaiting)), .reply(id, token: 11, .aborted)])
        #expect(machine.parts.isEmpty)
        #expect(Machine.Refusal.abandonedWhileWaiting.code == .unavailable)
        // Computed: freed.
        computed(&machine, id, token: 12, share: 8, at: 2)
        #expect(machine.abort(id, token: 99, nowMilliseconds: 3) == [.reply(id, token: 99, .aborted)], "another rebuild's abort changes nothing")
        #expect(machine.abort(id, token: 12, nowMilliseconds: 4) == [.freeShare(id, token: 12, 8), .reply(id, token: 12, .aborted)])
        #expect(machine.parts.isEmpty)
        // Installing: too late, the install goes on.
        computed(&machine, id, token: 13, share: 9, at: 5)
        _ = machine.commit(id, token: 13, nowMilliseconds: 6)
        #expect(machine.abort(id, token: 13, nowMilliseconds: 7) == [.reply(id, token: 13, .refused(.alreadyInstalling))])
        #expect(Machine.Refusal.alreadyInstalling.code == .invalidRequest)
        #expect(machine.installFinished(id, token: 13, nowMilliseconds: 8) == [.reply(id, token: 13, .installed)])
        // Nothing here at all: answered all the same (the planner aborts every node).
        #expect(machine.abort(other, token: 14, nowMilliseconds: 9) == [.reply(other, token: 14, .aborted)])
    }

    // MARK: A share's lifetime

    @Test func aShareNeverCommittedIsDroppedAfterItsLifetime() {
        var machine = machine()
        computed(&machine, id, token: 11, share: 42, at: 1_000)
        #expect(machine.tick(nowMilliseconds: 1_000 + Self.shareLifetimeMilliseconds, exactRebuildRunning: false, holds: Self.never).isEmpty)
        let dropped = machine.tick(nowMilliseconds: 1_001 + Self.shareLifetimeMilliseconds, exactRebuildRunning: false, holds: Self.never)
        #expect(quiet(dropped) == [.freeShare(id, token: 11, 42)])
        #expect(dropped.contains { if case .log(.warning, _, id) = $0 { true } else { false } })
        #expect(machine.commit(id, token: 11, nowMilliseconds: 7_000) == [.reply(id, token: 11, .refused(.noComputedShare))])
    }

    @Test func aNewClaimAfterTheLifetimeFreesTheStaleShareAndIsGranted() {
        var machine = machine()
        computed(&machine, id, token: 11, share: 42, at: 0)
        // Within the lifetime the step is still taken.
        #expect(machine.claim(id, token: 12, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: Self.shareLifetimeMilliseconds) == [.reply(id, token: 12, .refused(.inProgress))])
        let claimed = machine.claim(id, token: 12, holdsStep: false, exactRebuildRunning: false, nowMilliseconds: Self.shareLifetimeMilliseconds + 1)
        #expect(quiet(claimed) == [.freeShare(id, token: 11, 42), .answerClaim(id, token: 12, .granted)])
    }

    // MARK: Random interleavings

    /// Seeded random interleavings of every event, with the exact rebuild
    /// starting and stopping and steps coming back, checked after each event:
    /// never two live claims of a step, never a grant while the exact rebuild
    /// runs or for a held step, never an install without a commit, every share
    /// freed or installed exactly once, every claim the machine took on
    /// answered exactly once. `SNAPSHOTD_TEST_SEED=<seed>` replays one.
    @Test func randomInterleavingsKeepTheInvariants() {
        let seed = ProcessInfo.processInfo.environment["SNAPSHOTD_TEST_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 0...UInt64.max)
        var random = SplitMix64(seed: seed)
        var failures: [String] = []
        for run in 0..<300 where failures.isEmpty {
            var world = Interleaving(steps: [id, other], machine: machine())
            for _ in 0..<120 where world.violations.isEmpty { world.step(&random) }
            world.drain()
            if !world.violations.isEmpty { failures.append("run \(run): \(world.violations.prefix(3).joined(separator: " | ")); events: \(world.trace.suffix(12).joined(separator: ", "))") }
        }
        if !failures.isEmpty { print("[CheckFree lifecycle] seed \(seed) failed (replay with SNAPSHOTD_TEST_SEED=\(seed))") }
        #expect(failures.isEmpty, "seed \(seed): \(failures.first ?? "")")
    }
}

/// The world around one machine in the random test: the exact rebuild, the
/// store's held steps, computations and installs in flight, and the
/// bookkeeping the invariants need. Shares are numbered, so conservation can
/// be counted. Random choices are made from sorted values: a set's order
/// changes from process to process, and a seed must replay.
private struct Interleaving {
    typealias Machine = CheckFreeMachine<Int>
    typealias StepID = Machine.StepID
    struct Claim: Hashable, Comparable, CustomStringConvertible {
        let id: StepID
        let token: UInt64
        static func < (a: Claim, b: Claim) -> Bool { (a.id, a.token) < (b.id, b.token) }
        var description: String { "\(id.step)/\(token)" }
    }

    let steps: [StepID]
    var machine: Machine
    var nowMilliseconds: Int64 = 0
    var exactRebuildRunning = false
    var held: Set<StepID> = []
    /// Claims taken on and not answered yet (their orders wait).
    var waiting: Set<Claim> = []
    /// Granted claims whose computation runs.
    var computing: Set<Claim> = []
    /// Computed shares the machine holds, by number.
    var kept: [Int: Claim] = [:]
    var installing: [Int: Claim] = [:]
    /// Rebuilds the planner abandoned: nothing of theirs may be kept or installed.
    var aborted: Set<Claim> = []
    var nextShare = 1
    var violations: [String] = []
    var trace: [String] = []

    init(steps: [StepID], machine: Machine) {
        self.steps = steps
        self.machine = machine
    }

    mutating func step(_ random: inout SplitMix64) {
        nowMilliseconds += Int64(random.next(below: 4)) * [1, 100, 400, 3_000][Int(random.next(below: 4))]
        let id = steps[Int(random.next(below: UInt64(steps.count)))]
        let token = 1 + random.next(below: 3)
        let claim = Claim(id: id, token: token)
        switch random.next(below: 11) {
        case 0:
            exactRebuildRunning = true
            trace.append("exact started")
        case 1:
            exactRebuildRunning = false
            // The exact rebuild may have got back a step no CheckFree rebuild holds.
            for step in steps where !machine.claims(step) && random.next(below: 3) == 0 { held.insert(step) }
            feed("exact stopped") { $0.exactRebuildStopped(nowMilliseconds: $1.nowMilliseconds, holds: $1.holds) }
        case 2:
            // Retention or a new loss: a held step missing again.
            if let step = held.sorted().randomElement(using: &random) { held.remove(step) }
        case 3:
            let holds = held.contains(id)
            feed("claim \(claim)", order: claim, claiming: true) { $0.claim(id, token: token, holdsStep: holds, exactRebuildRunning: $1.exactRebuildRunning, nowMilliseconds: $1.nowMilliseconds) }
        case 4:
            // A computation ends, or a stray late one for a token that never was granted.
            let done = computing.sorted().randomElement(using: &random) ?? claim  // a stray late one when nothing computes
            computing.remove(done)
            if random.next(below: 4) == 0 {
                feed("compute failed \(done.id.step)/\(done.token)") { $0.computeFailed(done.id, token: done.token, nowMilliseconds: $1.nowMilliseconds) }
            } else {
                let share = nextShare
                nextShare += 1
                kept[share] = done  // until the machine frees it
                feed("computed \(done.id.step)/\(done.token) #\(share)", order: done) { $0.computeFinished(done.id, token: done.token, share: share, nowMilliseconds: $1.nowMilliseconds) }
            }
        case 5, 6:
            // Mostly a computed share's own rebuild; now and then any (another token, nothing computed).
            let target = random.next(below: 3) == 0 ? claim : kept.sorted { $0.key < $1.key }.randomElement(using: &random)?.value ?? claim
            feed("commit \(target.id.step)/\(target.token)", order: target, committing: true) { $0.commit(target.id, token: target.token, nowMilliseconds: $1.nowMilliseconds) }
        case 7:
            guard let (share, target) = installing.sorted(by: { $0.key < $1.key }).randomElement(using: &random) else { return }
            installing[share] = nil
            if random.next(below: 4) == 0 {
                feed("install failed #\(share)") { $0.installFailed(target.id, token: target.token, nowMilliseconds: $1.nowMilliseconds) }
                if kept[share] != nil { violations.append("a failed install of share \(share) did not free it") }
            } else {
                feed("installed #\(share)", order: target) { $0.installFinished(target.id, token: target.token, nowMilliseconds: $1.nowMilliseconds) }
                kept[share] = nil
                held.insert(target.id)
            }
        case 8:
            let live = (computing.sorted().first { $0.id == id } ?? waiting.sorted().first { $0.id == id }) ?? kept.values.sorted().first { $0.id == id }
            let target = random.next(below: 3) == 0 ? claim : live ?? claim
            feed("abort \(target.id.step)/\(target.token)", order: target) { $0.abort(target.id, token: target.token, nowMilliseconds: $1.nowMilliseconds) }
        default:
            feed("tick") { $0.tick(nowMilliseconds: $1.nowMilliseconds, exactRebuildRunning: $1.exactRebuildRunning, holds: $1.holds) }
        }
    }

    /// Ends everything: the exact rebuild stops, every computation ends,
    /// every install finishes, time runs past every deadline and lifetime.
    /// Nothing may be left: no claim unanswered, no share unaccounted for.
    mutating func drain() {
        exactRebuildRunning = false
        feed("drain: exact stopped") { $0.exactRebuildStopped(nowMilliseconds: $1.nowMilliseconds, holds: $1.holds) }
        for claim in computing.sorted() {
            computing.remove(claim)
            feed("drain: compute failed") { $0.computeFailed(claim.id, token: claim.token, nowMilliseconds: $1.nowMilliseconds) }
        }
        for (share, claim) in installing.sorted(by: { $0.key < $1.key }) {
            installing[share] = nil
            kept[share] = nil
            feed("drain: installed", order: claim) { $0.installFinished(claim.id, token: claim.token, nowMilliseconds: $1.nowMilliseconds) }
        }
        nowMilliseconds += machine.shareLifetimeMilliseconds + machine.claimTimeoutMilliseconds + 1
        feed("drain: tick") { $0.tick(nowMilliseconds: $1.nowMilliseconds, exactRebuildRunning: $1.exactRebuildRunning, holds: $1.holds) }
        if !waiting.isEmpty { violations.append("claims never answered: \(waiting)") }
        if !kept.isEmpty { violations.append("shares neither freed nor installed: \(kept.keys.sorted())") }
        if !machine.parts.isEmpty { violations.append("parts left: \(machine.parts)") }
    }

    /// What an event is told of the world.
    struct Moment {
        let nowMilliseconds: Int64
        let exactRebuildRunning: Bool
        let held: Set<StepID>
        func holds(_ id: StepID) -> Bool { held.contains(id) }
    }

    /// Feeds one event and checks its actions.
    /// `order`: the order the event came with, which gets at most one reply and no other.
    private mutating func feed(
        _ what: String, order: Claim? = nil, claiming: Bool = false, committing: Bool = false,
        _ event: (inout Machine, Moment) -> [Machine.Action]
    ) {
        trace.append("\(what) @\(nowMilliseconds)\(exactRebuildRunning ? " (exact running)" : "")")
        let actions = event(&machine, Moment(nowMilliseconds: nowMilliseconds, exactRebuildRunning: exactRebuildRunning, held: held))
        var replies = 0
        var answeredOwnClaim = false
        for action in actions {
            switch action {
            case .answerClaim(let id, let token, let answer):
                let claim = Claim(id: id, token: token)
                if claim == order, claiming { answeredOwnClaim = true } else if waiting.remove(claim) == nil { violations.append("\(what): answered \(claim), which no order waits for") }
                guard answer == .granted else { continue }
                if exactRebuildRunning { violations.append("\(what): granted \(claim) while the exact rebuild runs") }
                if held.contains(id) { violations.append("\(what): granted \(claim) of a held step") }
                let live = computing.contains { $0.id == id } || kept.values.contains { $0.id == id } || installing.values.contains { $0.id == id }
                if live { violations.append("\(what): granted \(claim) while another claim of the step is live") }
                computing.insert(claim)
                aborted.remove(claim)  // a new rebuild that happens to reuse the token (the tests' tokens are few)
            case .reply(let id, let token, let reply):
                let claim = Claim(id: id, token: token)
                replies += 1
                if claim != order { violations.append("\(what): a reply to \(claim), not to this event's order") }
                if reply == .prepared, aborted.contains(claim) { violations.append("\(what): kept the share of abandoned rebuild \(claim)") }
                if reply == .aborted { aborted.insert(claim) }
            case .installShare(let id, let token, let share):
                if !committing || Claim(id: id, token: token) != order { violations.append("\(what): installed share \(share) without its commit") }
                if aborted.contains(Claim(id: id, token: token)) { violations.append("\(what): installed share \(share) of an abandoned rebuild") }
                if kept[share] != Claim(id: id, token: token) || installing[share] != nil { violations.append("\(what): installed share \(share), which is not this rebuild's kept share") }
                installing[share] = Claim(id: id, token: token)
            case .freeShare(_, _, let share):
                if kept.removeValue(forKey: share) == nil { violations.append("\(what): freed share \(share) twice or never made") }
                if installing[share] != nil { violations.append("\(what): freed share \(share) while it is installed") }
            case .log:
                break
            }
        }
        if replies > 1 { violations.append("\(what): \(replies) replies to one order") }
        if claiming, let order, replies == 0, !answeredOwnClaim { waiting.insert(order) }
        // At most one part per step is the machine's structure; a live claim must also be one the machine has.
        for claim in computing where machine.parts[claim.id]?.token != claim.token {
            violations.append("\(what): \(claim) computes but the machine does not know it")
        }
    }
}
