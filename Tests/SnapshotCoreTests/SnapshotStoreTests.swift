import Foundation
@testable import SnapshotCore
import SnapshotProtocol
import Testing

/// The store is a pure state machine: these tests drive it directly, including
/// interleavings that are hard to hit with real processes.
@Suite("Snapshot store state machine")
struct SnapshotStoreTests {
    let job = try! JobID("job")
    let spec = try! TensorSpec.blob(name: "w", byteCount: 1000)
    static let mib: UInt64 = 1 << 20

    func key(_ step: Step, _ rank: Rank) -> ShardKey { ShardKey(job: job, step: step, rank: rank) }

    /// Saves and seals `step` for `ranks`, each from session rank+1.
    @discardableResult
    func saveStep(_ store: inout SnapshotStore, _ step: Step, ranks: [Rank]) throws -> [SnapshotStore.Effects] {
        var all: [SnapshotStore.Effects] = []
        for rank in ranks {
            _ = try store.beginSave(session: SessionID(rank + 1), key: key(step, rank), specs: [spec], topology: Topology())
            _ = try store.commit(session: SessionID(rank + 1), key: key(step, rank), clientChecksums: nil, gradientNorm: nil, metadata: [])
            all.append(store.sealed(key: key(step, rank), checksums: [0]))
        }
        return all
    }

    func attached(world: UInt32, budget: UInt64 = 64 << 20, keep: Int = 2) throws -> SnapshotStore {
        var store = SnapshotStore(budgetBytes: budget, snapshotsKeptPerJob: keep)
        for rank in 0..<world { try store.attach(session: SessionID(rank + 1), job: job, rank: rank, world: world) }
        return store
    }

    @Test func stepCommitsOnlyWhenEveryRankIsSealed() throws {
        var store = try attached(world: 3)
        let effects = try saveStep(&store, 1, ranks: [0, 1])
        #expect(effects.allSatisfy { $0.committed.isEmpty })
        #expect(store.latestCommitted(job: job) == nil)
        #expect(throws: StoreError.self) { try store.restorable(job: job, rank: 0, step: nil) }
        let last = try saveStep(&store, 1, ranks: [2])
        #expect(last[0].committed.map(\.step) == [1])
        #expect(store.latestCommitted(job: job) == 1)
        #expect(store.checkInvariants().isEmpty)
    }

    @Test func retentionKeepsExactlyTheConfiguredCount() throws {
        var store = try attached(world: 2, keep: 3)
        var freed: [ShardKey] = []
        for step in 1...6 as ClosedRange<Step> {
            freed += try saveStep(&store, step, ranks: [0, 1]).flatMap(\.freed)
        }
        #expect(store.jobs[job]!.committedSteps == [4, 5, 6])
        #expect(Set(freed) == Set([1, 2, 3].flatMap { s in [key(s, 0), key(s, 1)] }))
        #expect(store.heldBytes == 6 * Self.mib)
        #expect(store.checkInvariants().isEmpty)
    }

    @Test func newestCommittedStepSurvivesUntilANewerCommits() throws {
        var store = try attached(world: 2, keep: 1)
        try saveStep(&store, 1, ranks: [0, 1])
        // Step 2 half done: step 1 must still be there and restorable.
        try saveStep(&store, 2, ranks: [0])
        #expect(try store.restorable(job: job, rank: 1, step: nil).step == 1)
        let effects = try saveStep(&store, 2, ranks: [1])
        #expect(Set(effects.flatMap(\.freed)) == [key(1, 0), key(1, 1)])
        #expect(effects.flatMap(\.uncommitted).map(\.step) == [1])
    }

    @Test func overBudgetIsRefusedUpFrontAndTouchesNothing() throws {
        var store = try attached(world: 1, budget: 3 << 20)
        try saveStep(&store, 1, ranks: [0])
        let before = store
        let big = try TensorSpec.blob(name: "big", byteCount: 5 << 20)
        #expect {
            _ = try store.beginSave(session: 1, key: key(2, 0), specs: [big], topology: Topology())
        } throws: { error in
            guard let error = error as? StoreError else { return false }
            return error.code == .overBudget && error.message.contains("2097152 of 3145728 budget bytes are free")
        }
        #expect(store.jobs == before.jobs && store.heldBytes == before.heldBytes)
    }

    @Test func aSessionThatDiesMidSaveLeavesNothingRestorable() throws {
        var store = try attached(world: 2)
        try saveStep(&store, 1, ranks: [0, 1])
        _ = try store.beginSave(session: 2, key: key(2, 1), specs: [spec], topology: Topology())
        try saveStep(&store, 2, ranks: [0])
        let effects = store.detach(session: 2)
        #expect(effects.freed == [key(2, 1)])
        #expect(store.latestCommitted(job: job) == 1)
        #expect(throws: StoreError.self) { try store.restorable(job: job, rank: 0, step: 2) }
        // The rank is free again: a restarted trainer attaches and re-saves step 2.
        try store.attach(session: 9, job: job, rank: 1, world: 2)
        _ = try store.beginSave(session: 9, key: key(2, 1), specs: [spec], topology: Topology())
        _ = try store.commit(session: 9, key: key(2, 1), clientChecksums: nil, gradientNorm: nil, metadata: [])
        #expect(store.sealed(key: key(2, 1), checksums: [0]).committed.map(\.step) == [2])
        #expect(store.checkInvariants().isEmpty)
    }

    /// In a cluster, a step interrupted by a rank failure never commits, and a
    /// sealed shard (possibly folded into peers' parity) is never replaced.
    @Test func clusterModeNeverReplacesDataThatPeersMayHaveEncoded() throws {
        var store = SnapshotStore(budgetBytes: 64 << 20, snapshotsKeptPerJob: 2, commitsLocally: false)
        for rank in 0..<2 as Range<Rank> { try store.attach(session: SessionID(rank + 1), job: job, rank: rank, world: 4, localWorld: 2) }
        try saveStep(&store, 1, ranks: [0])
        #expect(throws: StoreError(.invalidRequest, "job/step 1/rank 0 is already sealed and being protected across the cluster; save a newer step")) {
            _ = try store.beginSave(session: 1, key: key(1, 0), specs: [spec], topology: Topology())
        }
        _ = try store.beginSave(session: 2, key: key(1, 1), specs: [spec], topology: Topology())
        _ = store.detach(session: 2)  // rank 1 dies mid-save
        try store.attach(session: 5, job: job, rank: 1, world: 4, localWorld: 2)
        #expect(throws: StoreError(.invalidRequest, "step 1 of job job was interrupted by a rank failure on this node and can no longer commit; save a newer step")) {
            _ = try store.beginSave(session: 5, key: key(1, 1), specs: [spec], topology: Topology())
        }
        // The next step works, and its local completion is reported for protection instead of committing.
        _ = try store.beginSave(session: 1, key: key(2, 0), specs: [spec], topology: Topology())
        _ = try store.commit(session: 1, key: key(2, 0), clientChecksums: nil, gradientNorm: nil, metadata: [])
        _ = try store.beginSave(session: 5, key: key(2, 1), specs: [spec], topology: Topology())
        _ = try store.commit(session: 5, key: key(2, 1), clientChecksums: nil, gradientNorm: nil, metadata: [])
        _ = store.sealed(key: key(2, 0), checksums: [0])
        let effects = store.sealed(key: key(2, 1), checksums: [0])
        #expect(effects.localComplete.map(\.step) == [2])
        #expect(effects.committed.isEmpty)
        #expect(store.markCommitted(job: job, step: 2, world: 4).committed.map(\.step) == [2])
        #expect(store.latestCommitted(job: job) == 2)
    }

    @Test func sessionErrors() throws {
        var store = try attached(world: 2)
        #expect(throws: StoreError(.duplicateRank, "rank 0 of job job is already connected (session 1)")) {
            try store.attach(session: 7, job: job, rank: 0, world: 2)
        }
        #expect(throws: StoreError(.wrongJob, "job job has world size 2, this session says 4")) {
            try store.attach(session: 7, job: job, rank: 3, world: 4)
        }
        #expect(throws: StoreError(.unknownStep, "commit of job/step 1/rank 0 without a begin-save")) {
            _ = try store.commit(session: 1, key: key(1, 0), clientChecksums: nil, gradientNorm: nil, metadata: [])
        }
        #expect(throws: StoreError(.helloRequired, "session is not attached to job rank 1")) {
            _ = try store.beginSave(session: 1, key: key(1, 1), specs: [spec], topology: Topology())
        }
        try saveStep(&store, 3, ranks: [0, 1])
        #expect(throws: StoreError(.invalidRequest, "step 2 is not newer than committed step 3 of job job")) {
            _ = try store.beginSave(session: 1, key: key(2, 0), specs: [spec], topology: Topology())
        }
    }

    @Test func pinnedShardsAreFreedOnlyAfterTheLastRelease() throws {
        var store = try attached(world: 1, keep: 1)
        try saveStep(&store, 1, ranks: [0])
        store.pin(key(1, 0))
        let effects = try saveStep(&store, 2, ranks: [0])
        #expect(effects.flatMap(\.freed).isEmpty, "a client still maps step 1")
        #expect(store.doomed == [key(1, 0)])
        #expect(store.heldBytes == 2 * Self.mib)
        #expect(store.unpin(key(1, 0)).freed == [key(1, 0)])
        #expect(store.heldBytes == 1 * Self.mib)
        #expect(store.checkInvariants().isEmpty)
    }

    @Test func resavingAnUncommittedStepReplacesTheShard() throws {
        var store = try attached(world: 2)
        _ = try store.beginSave(session: 1, key: key(1, 0), specs: [spec], topology: Topology())
        let (_, effects) = try store.beginSave(session: 1, key: key(1, 0), specs: [spec], topology: Topology())
        #expect(effects.freed == [key(1, 0)])
        #expect(store.heldBytes == Self.mib)
    }

    /// Random sequences of operations from several sessions never break the
    /// invariants, and the newest committed step always stays restorable.
    @Test func randomOperationSequencesKeepInvariants() throws {
        let seed = ProcessInfo.processInfo.environment["SNAPSHOTD_TEST_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 0...UInt64.max)
        print("[randomOperationSequences] seed \(seed) (replay with SNAPSHOTD_TEST_SEED=\(seed))")
        var rng = SplitMix64(seed: seed)
        for _ in 0..<200 {
            var store = SnapshotStore(budgetBytes: 12 << 20, snapshotsKeptPerJob: Int.random(in: 1...3, using: &rng))
            let world: UInt32 = 3
            var sessions: [Rank: SessionID] = [:]
            var nextSession: SessionID = 1
            var step: Step = 1
            for _ in 0..<60 {
                let rank = Rank.random(in: 0..<world, using: &rng)
                let action = Int.random(in: 0..<6, using: &rng)
                if sessions[rank] == nil {
                    try store.attach(session: nextSession, job: job, rank: rank, world: world)
                    sessions[rank] = nextSession
                    nextSession += 1
                }
                let session = sessions[rank]!
                let before = store.latestCommitted(job: job)
                switch action {
                case 0: _ = store.detach(session: session); sessions[rank] = nil
                case 1: step += 1
                default:
                    if (try? store.beginSave(session: session, key: key(step, rank), specs: [spec], topology: Topology())) != nil,
                        (try? store.commit(session: session, key: key(step, rank), clientChecksums: nil, gradientNorm: nil, metadata: [])) != nil
                    {
                        _ = store.sealed(key: key(step, rank), checksums: [0])
                    }
                }
                #expect(store.checkInvariants().isEmpty)
                #expect(store.heldBytes <= store.budgetBytes)
                if let before {
                    let latest = try #require(store.latestCommitted(job: job))
                    #expect(latest >= before)
                    for r in 0..<world { #expect((try? store.restorable(job: job, rank: r, step: nil)) != nil) }
                }
            }
        }
    }
}
