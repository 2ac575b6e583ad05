@testable import SnapshotCore
import SnapshotProtocol
import Testing

/// The protection machine's rules, each driven event by event through the
/// interleaving that broke it before (issue 8's observations).
@Suite("Protection machine")
struct ProtectionMachineTests {
    let job = try! JobID("job")

    /// A readiness report of `node` for `step` covering `ranks` (real manifests, from a store).
    func ready(_ node: NodeID, step: Step, ranks: [Rank], world: UInt32, bytes: UInt64 = 3000) throws -> StepReady {
        var store = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        for rank in ranks { try store.attach(session: SessionID(rank + 1), job: job, rank: rank, world: world, localWorld: UInt32(ranks.count)) }
        for rank in ranks {
            let key = ShardKey(job: job, step: step, rank: rank)
            _ = try store.beginSave(session: SessionID(rank + 1), key: key, specs: [try TensorSpec.blob(name: "w", byteCount: 100)], topology: Topology())
            _ = try store.commit(session: SessionID(rank + 1), key: key, clientChecksums: nil, gradientNorm: nil, metadata: [])
            _ = store.sealed(key: key, checksums: [UInt32(rank)])
        }
        let manifests = store.localShards(job: job, step: step).map { ManifestFile(key: ShardKey(job: job, step: step, rank: $0.rank), world: world, shard: $0.shard).encoded() }
        return StepReady(job: job, step: step, nodeID: node, world: world, dataSizeBytes: ranks.isEmpty ? 0 : bytes, manifests: manifests)
    }

    func machine(_ node: NodeID, nodes: Int = 3, parity: Int = 1, faults: ProtectionMachine.Faults = []) throws -> ProtectionMachine {
        var machine = try ProtectionMachine(selfID: node, configuration: try cluster(nodes: nodes, parity: parity), keptStepsPerJob: 2)
        machine.faults = faults
        return machine
    }

    /// The empty report a machine broadcast, if any.
    func emptyReport(in actions: [ProtectionMachine.Action], from node: NodeID) -> StepReady? {
        for case .broadcast(.stepReady(let ready)) in actions where ready.nodeID == node && ready.manifests.isEmpty { return ready }
        return nil
    }

    /// Observation 1: a node whose trainers attach late hears its peers'
    /// reports first. It must not announce an empty share it will contradict.
    @Test func aNodeWhoseTrainersAreLateDoesNotReportAnEmptyShare() throws {
        let empty = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var late = try machine(2)
        var actions = late.received(try ready(0, step: 1, ranks: [0], world: 3), store: empty, nowMilliseconds: 0)
        actions += late.received(try ready(1, step: 1, ranks: [1], world: 3), store: empty, nowMilliseconds: 0)
        #expect(emptyReport(in: actions, from: 2) == nil, "rank 2 is not covered by any report: node 2 may hold it")
        #expect(late.ledger.entry(job: job, step: 1)?.ready[2] == nil)
        // The old rule (any peer's report proves an empty share) gets this wrong.
        var eager = try machine(2, faults: .eagerEmptyShare)
        let eagerActions = eager.received(try ready(0, step: 1, ranks: [0], world: 3), store: empty, nowMilliseconds: 0)
        #expect(emptyReport(in: eagerActions, from: 2) != nil)
    }

    /// A node with no ranks reports an empty share once the others cover
    /// every rank, holds its parity, and only then reports itself protected.
    @Test func anEmptyShareIsReportedWhenProvenAndProtectedAfterItsParity() throws {
        let empty = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var bystander = try machine(2)
        var actions = bystander.received(try ready(0, step: 1, ranks: [0], world: 2), store: empty, nowMilliseconds: 0)
        #expect(emptyReport(in: actions, from: 2) == nil)
        actions = bystander.received(try ready(1, step: 1, ranks: [1], world: 2), store: empty, nowMilliseconds: 0)
        #expect(emptyReport(in: actions, from: 2) != nil)
        let hold = actions.firstIndex { if case .holdParity = $0 { true } else { false } }
        let protected = actions.firstIndex { if case .broadcast(.stepProtected) = $0 { true } else { false } }
        #expect(hold != nil && protected != nil && hold! < protected!, "\(actions)")
        #expect(!actions.contains { if case .sendFragments = $0 { true } else { false } }, "nothing to send")
    }

    /// A node's view travels in pages (at LLM scale it is gigabytes of
    /// manifests): every page brings at least one new report, a step is
    /// marked committed only in the page that completes its reports, and the
    /// pages together teach a fresh node everything the whole view would.
    @Test func clusterStateTravelsInPagesThatNeverMarkAnIncompleteStep() throws {
        let fresh = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var source = try machine(0)
        for step: Step in [1, 2] {
            let reports = try (0..<3).map { try ready(NodeID($0), step: step, ranks: [Rank($0)], world: 3) }
            _ = source.merge(ClusterStateReply(steps: [ClusterStepState(job: job, step: step, committed: true, ready: reports, protectedNodes: [0, 1, 2])]), store: fresh, nowMilliseconds: 0)
        }
        var learner = try machine(1)
        var sent: Set<ReportID> = []
        var pages = 0
        while pages < 100 {
            pages += 1
            let page = source.ledger.clusterState(omitting: Set(learner.ledger.knownReports).union(sent), pageBytes: 1)
            #expect(page.steps.flatMap(\.ready).count == 1, "one report per page at this page size: \(page.steps.map(\.ready.count))")
            _ = learner.merge(page, store: fresh, nowMilliseconds: 0)
            for step in page.steps {
                sent.formUnion(step.ready.map { ReportID(job: step.job, step: step.step, node: $0.nodeID) })
                if step.committed {
                    #expect(learner.ledger.entry(job: job, step: step.step)?.ready.count == 3, "step \(step.step) marked committed before its reports arrived")
                }
            }
            if page.complete { break }
        }
        #expect(pages == 6, "six reports, one per page")
        #expect(Set(learner.ledger.knownReports) == Set(source.ledger.knownReports))
        for step: Step in [1, 2] { #expect(learner.ledger.entry(job: job, step: step)?.committed == true, "step \(step)") }
        // The whole view in one page, as before paging.
        #expect(source.ledger.clusterState().complete)
        #expect(source.ledger.clusterState().steps.flatMap(\.ready).count == 6)
    }

    /// Observation 2: a replacement learns that a step its predecessor
    /// reported is committed. It must not commit it (it holds nothing of it):
    /// the step is missing, to rebuild, and a trainer cannot save it again.
    @Test func aReplacementNeverCommitsAStepItDoesNotHold() throws {
        let fresh = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var replacement = try machine(1)
        let reports = try [ready(0, step: 5, ranks: [0], world: 3), ready(1, step: 5, ranks: [1], world: 3), ready(2, step: 5, ranks: [2], world: 3)]
        let state = ClusterStateReply(steps: [ClusterStepState(job: job, step: 5, committed: true, ready: reports, protectedNodes: [0, 1, 2])])
        let actions = replacement.merge(state, store: fresh, nowMilliseconds: 0)
        #expect(!actions.contains { if case .commit = $0 { true } else { false } }, "\(actions)")
        #expect(replacement.missingSteps(store: fresh) == [.init(job: job, step: 5)])
        #expect(replacement.refusalOfSave(job: job, step: 5)?.code == .invalidRequest)
        #expect(replacement.refusalOfSave(job: job, step: 6) == nil)
        // Counting the ledger's word as holding is the old bug.
        var broken = try machine(1, faults: .commitWithoutHolding)
        #expect(broken.merge(state, store: fresh, nowMilliseconds: 0).contains { if case .commit = $0 { true } else { false } })
    }

    /// A replacement whose predecessor's protected report arrived only at
    /// some peers still counts it (it is what the cluster counted), and votes
    /// that it knows every report: the node that committed may have died
    /// before its own vote left. The step commits once every node voted, and
    /// is then missing here (to rebuild).
    @Test func aReplacementCountsItsPredecessorsReportAndVotes() throws {
        let fresh = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var replacement = try machine(1)
        let reports = try [ready(0, step: 5, ranks: [0], world: 3), ready(1, step: 5, ranks: [1], world: 3), ready(2, step: 5, ranks: [2], world: 3)]
        _ = replacement.merge(ClusterStateReply(steps: [ClusterStepState(job: job, step: 5, committed: false, ready: reports, protectedNodes: [0, 1])]), store: fresh, nowMilliseconds: 0)
        let knowing = replacement.received(StepProtected(job: job, step: 5, nodeID: 2, stable: true), store: fresh)
        #expect(knowing.contains(.broadcast(.stepProtected(StepProtected(job: job, step: 5, nodeID: 1, stable: true)))), "it now knows every report and says so")
        #expect(replacement.ledger.entry(job: job, step: 5)?.committed == false, "node 0 has not said it knows every report")
        _ = replacement.received(StepProtected(job: job, step: 5, nodeID: 0, stable: true), store: fresh)
        #expect(replacement.ledger.entry(job: job, step: 5)?.committed == true)
        #expect(replacement.missingSteps(store: fresh).map(\.step) == [5])
    }

    /// Step 0 is a step like any other: a replacement rebuilds it.
    @Test func stepZeroIsRebuiltLikeAnyOther() throws {
        let fresh = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var replacement = try machine(1)
        let reports = try [ready(0, step: 0, ranks: [0], world: 3), ready(1, step: 0, ranks: [1], world: 3), ready(2, step: 0, ranks: [2], world: 3)]
        _ = replacement.merge(ClusterStateReply(steps: [ClusterStepState(job: job, step: 0, committed: true, ready: reports, protectedNodes: [0, 1, 2], stableNodes: [0, 1, 2])]), store: fresh, nowMilliseconds: 0)
        #expect(replacement.missingSteps(store: fresh).map(\.step) == [0])
    }

    /// The last node to report protected must not commit alone: if it died
    /// right after, no survivor would know the step had committed.
    @Test func theLastReporterDoesNotCommitBeforeEveryNodeKnows() throws {
        let empty = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var last = try machine(0, nodes: 2)
        var store = empty
        let mine = try ready(0, step: 1, ranks: [0], world: 2)
        _ = last.received(try ready(1, step: 1, ranks: [1], world: 2), store: store, nowMilliseconds: 0)
        _ = last.received(StepProtected(job: job, step: 1, nodeID: 1), store: store)
        _ = last.shareSealed(mine, store: store, nowMilliseconds: 0)
        // Its parity of node 1's data (stripe 0) is sealed; its own fragments are acknowledged.
        _ = try store.reserveParity(ParityKey(job: job, step: 1, stripe: 0), row: 0, fragmentSizeBytes: 3000, world: 2)
        store.updateParity(ParityKey(job: job, step: 1, stripe: 0)) { $0.crc32c = 7 }
        let actions = last.fragmentsAcknowledged(job: job, step: 1, store: store)
        #expect(!actions.contains { if case .commit = $0 { true } else { false } }, "\(actions)")
        #expect(actions.contains(.broadcast(.stepProtected(StepProtected(job: job, step: 1, nodeID: 0, stable: true)))))
        let committed = last.received(StepProtected(job: job, step: 1, nodeID: 1, stable: true), store: store)
        #expect(committed.contains(.commit(job: job, step: 1, world: 2)))
    }

    /// The node that committed may die before its stable vote leaves. Every
    /// live node knows every protected report, so nothing is lost with it:
    /// once the monitor declares it dead, the survivors commit without its
    /// vote instead of stalling until a replacement arrives (found by running
    /// the late-trainer test under load). While it is only silent, not dead,
    /// they wait.
    @Test func aDeadNodesMissingVoteDoesNotStallTheCommit() throws {
        let fresh = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var survivor = try machine(1)
        let reports = try [ready(0, step: 5, ranks: [0], world: 3), ready(1, step: 5, ranks: [1], world: 3), ready(2, step: 5, ranks: [2], world: 3)]
        _ = survivor.merge(ClusterStateReply(steps: [ClusterStepState(job: job, step: 5, committed: false, ready: reports, protectedNodes: [0, 1, 2], stableNodes: [1])]), store: fresh, nowMilliseconds: 0)
        _ = survivor.received(StepProtected(job: job, step: 5, nodeID: 2, stable: true), store: fresh)
        _ = survivor.tick(nowMilliseconds: 100, liveNodes: [0, 1, 2], store: fresh)
        #expect(survivor.ledger.entry(job: job, step: 5)?.committed == false, "node 0 is alive and has not voted")
        _ = survivor.tick(nowMilliseconds: 2000, liveNodes: [1, 2], store: fresh)
        #expect(survivor.ledger.entry(job: job, step: 5)?.committed == true, "node 0 is dead: its vote is excused")
    }

    /// Reports are final: a second, different report of a node is ignored.
    @Test func aSecondDifferentReportDoesNotReplaceTheFirst() throws {
        let empty = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var node = try machine(0)
        let first = try ready(2, step: 1, ranks: [2], world: 3, bytes: 3000)
        let second = try ready(2, step: 1, ranks: [2], world: 3, bytes: 9000)
        _ = node.received(first, store: empty, nowMilliseconds: 0)
        let actions = node.received(second, store: empty, nowMilliseconds: 0)
        #expect(node.ledger.entry(job: job, step: 1)?.ready[2] == first)
        #expect(actions.contains { if case .log(.error, let text, _, _) = $0 { text.contains("second, different report") } else { false } })
    }

    /// Holders fold a slot once: the same bytes again are acknowledged,
    /// other bytes for it are refused, and sealed parity takes no new slot.
    @Test func holdersRefuseFragmentsThatWouldChangeTheirParity() throws {
        let store = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        let node = try machine(0)
        func put(slot: UInt16, crc: UInt32) -> FragmentPut {
            FragmentPut(fragment: FragmentID(job: job, step: 1, stripe: 0, index: slot), sourceNode: 1, fragmentSizeBytes: 4096, crc32c: crc)
        }
        var record = ParityRecord(row: 0, fragmentSizeBytes: 4096, segmentSizeBytes: 1 << 20, foldedSlots: [0: 111])
        #expect(node.admit(put(slot: 0, crc: 111), record: record, store: store) == .duplicate)
        guard case .refuse(let conflict) = node.admit(put(slot: 0, crc: 222), record: record, store: store) else { Issue.record("conflict admitted"); return }
        #expect(conflict.code == .invalidRequest && conflict.message.contains("already folded with different bytes"))
        #expect(node.admit(put(slot: 1, crc: 333), record: record, store: store) == .fold)
        record.crc32c = 42
        guard case .refuse(let sealed) = node.admit(put(slot: 1, crc: 333), record: record, store: store) else { Issue.record("sealed parity took a slot"); return }
        #expect(sealed.code == .invalidRequest && sealed.message.contains("is sealed"))
        guard case .refuse(let size) = node.admit(FragmentPut(fragment: FragmentID(job: job, step: 1, stripe: 0, index: 1), sourceNode: 1, fragmentSizeBytes: 8192, crc32c: 1), record: record, store: store) else { Issue.record("wrong size admitted"); return }
        #expect(size.message.contains("8192"))
    }

    /// Observation 4: a step that could not be rebuilt is reported lost with
    /// exactly its ranks, and the newest step restorable in full is named.
    @Test func aLostStepIsReportedWithItsRanksAndTheNewestRestorableStep() throws {
        let fresh = SnapshotStore(budgetBytes: 1 << 30, snapshotsKeptPerJob: 2, commitsLocally: false)
        var replacement = try machine(1)
        var steps: [ClusterStepState] = []
        for step: Step in [4, 5] {
            let reports = try [ready(0, step: step, ranks: [0, 1], world: 6), ready(1, step: step, ranks: [2, 3], world: 6), ready(2, step: step, ranks: [4, 5], world: 6)]
            steps.append(ClusterStepState(job: job, step: step, committed: true, ready: reports, protectedNodes: [0, 1, 2]))
        }
        _ = replacement.merge(ClusterStateReply(steps: steps), store: fresh, nowMilliseconds: 0)
        replacement.stepLost(job: job, step: 5, reason: "rank 2 failed its CRC after decoding")
        #expect(replacement.missingSteps(store: fresh).map(\.step) == [4], "the lost step is not retried forever")
        let report = try #require(replacement.recovery(lostNodes: []).first)
        #expect(report.latestCommitted == 5 && report.lostRanks == [2, 3] && report.newestRestorable == 4)
        #expect(report.summary.contains("could not be rebuilt") && report.summary.contains("newest fully restorable step is 4"))
    }
}
