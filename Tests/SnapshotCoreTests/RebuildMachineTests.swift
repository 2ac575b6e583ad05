import SnapshotProtocol
import Testing

@testable import SnapshotCore

/// The rebuild machine's rules, event by event (its runs over a network are
/// exercised by the cluster simulation).
@Suite struct RebuildMachineTests {
    typealias StepID = RebuildMachine.StepID
    let job = try! JobID("rebuild-job")  // a literal, valid by construction

    func steps(_ numbers: Step...) -> [StepID] { numbers.map { StepID(job: job, step: $0) } }

    @Test func anOrderPullsStateThenRebuildsEachMissingStepOnceAndReports() {
        var machine = RebuildMachine()
        #expect(machine.ordered(discovered: true, rebuildable: steps(1, 2)) == [.pullState])
        #expect(machine.isRunning)
        // The pull taught the node of step 3 as well.
        #expect(machine.statePulled(rebuildable: steps(1, 2, 3)) == [.rebuild(steps(1)[0])])
        #expect(machine.stepFinished(steps(1)[0], .rebuilt, rebuildable: steps(2, 3)) == [.rebuild(steps(2)[0])])
        #expect(machine.stepFinished(steps(2)[0], .notRebuildable(reason: "CRC"), rebuildable: steps(3)) == [.rebuild(steps(3)[0])])
        let actions = machine.stepFinished(steps(3)[0], .failed(reason: "peer 2 unreachable"), rebuildable: steps(3))
        var expected = RebuildMachine.Summary()
        expected.rebuilt = steps(1)
        expected.notRebuildable = [steps(2)[0]: "CRC"]
        expected.retryLater = [steps(3)[0]: "peer 2 unreachable"]
        #expect(actions == [.finished(expected)], "a step that failed is not retried within the run")
        #expect(!expected.isComplete)
        // Still "running" until the executor said how it went.
        #expect(machine.isRunning)
        machine.reported()
        #expect(machine.phase == .idle)
        // The next order starts afresh and tries step 3 again.
        #expect(machine.ordered(discovered: true, rebuildable: steps(3)) == [.pullState])
        #expect(machine.statePulled(rebuildable: steps(3)) == [.rebuild(steps(3)[0])])
    }

    @Test func anOrderBeforeDiscoveryWaitsForIt() {
        var machine = RebuildMachine()
        #expect(machine.ordered(discovered: false, rebuildable: []).isEmpty)
        #expect(machine.phase == .orderedBeforeDiscovery)
        #expect(machine.discovered(rebuildable: steps(4)) == [.pullState])
        // Discovery without an order starts nothing.
        var unordered = RebuildMachine()
        #expect(unordered.discovered(rebuildable: steps(4)).isEmpty)
        #expect(unordered.phase == .idle)
    }

    @Test func ordersDuringARunAreAbsorbedAndNothingMissingMeansNoRun() {
        var machine = RebuildMachine()
        #expect(machine.ordered(discovered: true, rebuildable: []).isEmpty)
        #expect(machine.phase == .idle)
        _ = machine.ordered(discovered: true, rebuildable: steps(1))
        #expect(machine.ordered(discovered: true, rebuildable: steps(1)).isEmpty)
        _ = machine.statePulled(rebuildable: steps(1))
        #expect(machine.ordered(discovered: true, rebuildable: steps(1)).isEmpty)
        // Events that do not match the phase are ignored.
        #expect(machine.stepFinished(steps(9)[0], .rebuilt, rebuildable: steps(1)).isEmpty)
        #expect(machine.statePulled(rebuildable: steps(1)).isEmpty)
        #expect(machine.phase == .rebuilding(steps(1)[0]))
    }

    @Test func stepsSettledMeanwhileAreSkippedAndNewOnesTakeAnotherPass() {
        var machine = RebuildMachine()
        _ = machine.ordered(discovered: true, rebuildable: steps(1, 2, 3))
        #expect(machine.statePulled(rebuildable: steps(1, 2, 3)) == [.rebuild(steps(1)[0])])
        // Retention dropped step 2 meanwhile; step 5 went missing.
        #expect(machine.stepFinished(steps(1)[0], .rebuilt, rebuildable: steps(3, 5)) == [.rebuild(steps(3)[0])])
        #expect(machine.stepFinished(steps(3)[0], .rebuilt, rebuildable: steps(5)) == [.rebuild(steps(5)[0])])
        guard case .finished(let summary)? = machine.stepFinished(steps(5)[0], .rebuilt, rebuildable: []).first else {
            Issue.record("the run did not finish")
            return
        }
        #expect(summary.rebuilt == steps(1, 3, 5))
        #expect(summary.isComplete)
    }

    /// A step that keeps coming back missing (rebuilt, then lost again) is
    /// still attempted once per run, and new steps appearing forever cannot
    /// keep a run going past its passes.
    @Test func aRunAlwaysEnds() {
        var machine = RebuildMachine()
        _ = machine.ordered(discovered: true, rebuildable: steps(1))
        var actions = machine.statePulled(rebuildable: steps(1))
        var next: Step = 2
        var rounds = 0
        while case .rebuild(let id)? = actions.first {
            rounds += 1
            #expect(rounds <= RebuildMachine.maximumPasses, "step \(id.step) was attempted in pass \(rounds)")
            if rounds > RebuildMachine.maximumPasses { return }
            actions = machine.stepFinished(id, .rebuilt, rebuildable: [id] + steps(next))
            next += 1
        }
        #expect(rounds == RebuildMachine.maximumPasses)
        guard case .finished(let summary)? = actions.first else {
            Issue.record("the run did not finish: \(actions)")
            return
        }
        #expect(summary.rebuilt.count == RebuildMachine.maximumPasses)
    }
}
