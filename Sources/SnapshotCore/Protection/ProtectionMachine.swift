import ErasureCoding
public import SnapshotProtocol

/// One node's part in protecting and committing steps across the cluster, as a
/// deterministic state machine (etcd/raft style): events in, actions out. The
/// network, the clock, segment files and the bytes live outside; the real
/// node (``ClusterNode``) and the cluster simulation in the tests execute the
/// same actions, so the simulation checks the rules the daemon runs.
///
/// The rules that make "committed" mean what docs/architecture.md ("The commit rule") says:
/// 1. **Reports are final.** The ledger keeps the first readiness report of a
///    node for a step; a different one later is a conflict and is ignored
///    (a fragment size, an expected-slot set or a parity fold made from the
///    first report would otherwise be silently wrong).
/// 2. **An empty share is a fact, not a guess.** A node reports that it holds
///    nothing of a step only once the other nodes' reports cover every rank of
///    the job and it has no shard of that step itself: a node whose trainers
///    attach late must not announce an empty share it will later contradict.
/// 3. **A node commits only what it holds**: its own share, reported by this
///    incarnation and protected, with every parity fragment it owes the step
///    sealed. A step the cluster committed that it does not hold is *missing*
///    (a rebuild is needed), never recorded as committed.
/// 4. **A replacement never re-reports a step** an earlier incarnation of its
///    node reported: that share is restored by rebuild, not by a new save.
///
/// Holders refuse a fragment that would change parity that is already sealed,
/// and a duplicate fragment whose bytes differ from the one folded
/// (``admit(_:record:)``).
public struct ProtectionMachine: Sendable {
    public typealias StepID = ClusterLedger.StepID

    public let selfID: NodeID
    public let configuration: ClusterConfiguration
    public let group: ClusterConfiguration.Group
    public let position: Int
    public let layout: StripeLayout
    /// Committed steps a job keeps (the store's retention): older ones are not rebuilt.
    public let keptStepsPerJob: Int
    /// How long a step waits for its group's reports before it resends and pulls.
    public let retryIntervalMilliseconds: Int64
    /// How long a protection may take before it is given up (the step cannot commit).
    public let protectionTimeoutMilliseconds: Int64
    /// Deliberately broken rules, so tests can show the simulation catches them.
    public var faults: Faults = []

    public private(set) var ledger: ClusterLedger
    /// Steps whose share this incarnation reported, and how far their protection got.
    public private(set) var own: [StepID: OwnStep] = [:]
    /// Steps that could not be rebuilt here, with the reason.
    public private(set) var lost: [StepID: String] = [:]
    private var lastInheritedPullMilliseconds: Int64 = .min / 2
    /// Nodes the monitor declared dead at the last tick: excused from the stable round.
    private var excusedNodes: Set<NodeID> = []

    public struct OwnStep: Sendable, Equatable {
        public var phase: Phase
        public var reportedAtMilliseconds: Int64
        public var lastRetryMilliseconds: Int64
    }

    public enum Phase: Sendable, Equatable {
        /// Reported; waiting for the group's reports to fix the fragment size.
        case awaitingGroup
        /// Fragments are on their way to their parity holders.
        case sending(fragmentSizeBytes: UInt64)
        /// Every fragment acknowledged (or nothing to send).
        case protected
        /// Gave up; the step cannot commit on this node.
        case failed(String)
    }

    public struct Faults: OptionSet, Sendable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        /// Report an empty share as soon as a peer's report arrives (the old bug).
        public static let eagerEmptyShare = Faults(rawValue: 1 << 0)
        /// Commit a step the ledger committed without holding it.
        public static let commitWithoutHolding = Faults(rawValue: 1 << 1)
        /// Let a later readiness report replace an earlier one.
        public static let mutableReports = Faults(rawValue: 1 << 2)
        /// Commit as soon as this node knows every protected report, before
        /// every node does (the last reporter can then commit and die alone
        /// knowing it).
        public static let commitBeforeStable = Faults(rawValue: 1 << 3)
    }

    public enum Action: Sendable, Equatable {
        /// Send to every peer.
        case broadcast(Message)
        /// Send to these peers only (a report they may have missed).
        case send(Message, to: [NodeID])
        /// Ask these peers for their view of the cluster's steps.
        case pullState(from: [NodeID])
        /// Make sure this node's parity buffers of the step exist (zeroed),
        /// then seal those that are complete.
        case holdParity(job: JobID, step: Step, fragmentSizeBytes: UInt64)
        /// Cut this node's share into fragments and send each to its holders;
        /// report ``fragmentsAcknowledged(job:step:)`` or ``protectionFailed(job:step:reason:)``.
        case sendFragments(job: JobID, step: Step, fragmentSizeBytes: UInt64)
        /// Commit the step in the store (it holds everything the step needs here).
        case commit(job: JobID, step: Step, world: UInt32)
        /// The node's own share of a step conflicts with what the cluster
        /// already has from an earlier incarnation: drop it.
        case discardShare(job: JobID, step: Step, reason: String)
        /// Something for the log.
        case log(LogLevel, String, job: JobID, step: Step)
    }

    public enum LogLevel: Sendable, Equatable { case info, warning, error }

    /// What a holder does with an arriving data fragment.
    public enum Admission: Sendable, Equatable {
        case fold
        /// The same bytes were folded already: acknowledge only.
        case duplicate
        case refuse(StoreError)
    }

    public init(
        selfID: NodeID, configuration: ClusterConfiguration, keptStepsPerJob: Int,
        retryIntervalMilliseconds: Int64 = Limits.protectionRetryIntervalMilliseconds,
        protectionTimeoutMilliseconds: Int64 = Limits.protectionTimeoutMilliseconds
    ) throws(ConfigurationError) {
        guard let group = configuration.group(of: selfID), let position = group.position(of: selfID) else {
            throw ConfigurationError("node \(selfID) is not in the cluster file")
        }
        precondition(keptStepsPerJob >= 1 && retryIntervalMilliseconds > 0 && protectionTimeoutMilliseconds > retryIntervalMilliseconds)
        self.selfID = selfID
        self.configuration = configuration
        self.group = group
        self.position = position
        layout = group.layout
        self.keptStepsPerJob = keptStepsPerJob
        self.retryIntervalMilliseconds = retryIntervalMilliseconds
        self.protectionTimeoutMilliseconds = protectionTimeoutMilliseconds
        ledger = ClusterLedger(configuration: configuration)
    }

    // MARK: Saves

    /// Whether a trainer may start saving `step` here (rule 4).
    public func refusalOfSave(job: JobID, step: Step) -> StoreError? {
        let id = StepID(job: job, step: step)
        if own[id] == nil, ledger.entry(job: job, step: step)?.ready[selfID] != nil {
            return StoreError(.invalidRequest, "step \(step) of job \(job) was reported by this node before it restarted or was replaced; it is restored by rebuild, not saved again: save a newer step")
        }
        if lost[id] != nil { return StoreError(.invalidRequest, "step \(step) of job \(job) was lost on this node; save a newer step") }
        return nil
    }

    /// This node's share of a step is sealed: report it and start protecting it.
    public mutating func shareSealed(_ ready: StepReady, store: SnapshotStore, nowMilliseconds now: Int64) -> [Action] {
        precondition(ready.nodeID == selfID)
        let id = StepID(job: ready.job, step: ready.step)
        if !faults.contains(.mutableReports) {
            if ledger.entry(job: ready.job, step: ready.step)?.ready[selfID] != nil {
                return [.discardShare(job: ready.job, step: ready.step, reason: "the cluster already holds a report of this node's share of the step (from an earlier incarnation, or an empty share)")]
            }
            guard own[id] == nil else { return [] }
        }
        own[id] = OwnStep(phase: .awaitingGroup, reportedAtMilliseconds: now, lastRetryMilliseconds: now)
        record(ready)
        return [.broadcast(.stepReady(ready))] + advance(id, store: store)
    }

    // MARK: Reports from peers

    public mutating func received(_ ready: StepReady, store: SnapshotStore, nowMilliseconds now: Int64) -> [Action] {
        guard ready.nodeID != selfID, configuration.node(ready.nodeID) != nil else { return [] }
        var actions = record(ready)
        actions += reportEmptyShareIfProven(StepID(job: ready.job, step: ready.step), store: store, nowMilliseconds: now)
        return actions + advance(StepID(job: ready.job, step: ready.step), store: store)
    }

    public mutating func received(_ report: StepProtected, store: SnapshotStore) -> [Action] {
        guard report.nodeID != selfID else { return [] }
        if report.stable {
            ledger.recordStable(job: report.job, step: report.step, node: report.nodeID)
        } else {
            ledger.recordProtected(job: report.job, step: report.step, node: report.nodeID)
        }
        return advance(StepID(job: report.job, step: report.step), store: store)
    }

    /// A peer's view of the cluster's steps: its reports fill in what this node missed.
    public mutating func merge(_ state: ClusterStateReply, store: SnapshotStore, nowMilliseconds now: Int64) -> [Action] {
        var actions: [Action] = []
        for step in state.steps {
            let id = StepID(job: step.job, step: step.step)
            for ready in step.ready where ready.nodeID != selfID || own[id] == nil {
                actions += record(ready)
            }
            // This node's own protected report too: an earlier incarnation's report is what the cluster counted.
            for node in step.protectedNodes { ledger.recordProtected(job: step.job, step: step.step, node: node) }
            // An earlier incarnation's vote too: it held its part when it gave it.
            for node in step.stableNodes { ledger.recordStable(job: step.job, step: step.step, node: node) }
            if step.committed { ledger.markCommitted(job: step.job, step: step.step) }
            actions += reportEmptyShareIfProven(id, store: store, nowMilliseconds: now)
            actions += advance(id, store: store)
        }
        return actions
    }

    // MARK: Progress reported by the executors

    public mutating func fragmentsAcknowledged(job: JobID, step: Step, store: SnapshotStore) -> [Action] {
        let id = StepID(job: job, step: step)
        guard case .sending = own[id]?.phase else { return [] }
        own[id]!.phase = .protected
        ledger.recordProtected(job: job, step: step, node: selfID)
        return [.broadcast(.stepProtected(StepProtected(job: job, step: step, nodeID: selfID)))] + advance(id, store: store)
    }

    public mutating func protectionFailed(job: JobID, step: Step, reason: String) -> [Action] {
        let id = StepID(job: job, step: step)
        guard let phase = own[id]?.phase, phase != .protected else { return [] }
        own[id]!.phase = .failed(reason)
        return [.log(.error, "protection failed; the step cannot commit: \(reason)", job: job, step: step)]
    }

    /// A parity fragment of the step was sealed here: the step may now be held.
    public mutating func paritySealed(job: JobID, step: Step, store: SnapshotStore) -> [Action] {
        advance(StepID(job: job, step: step), store: store)
    }

    /// The step was rebuilt and adopted by the store.
    public mutating func stepRebuilt(job: JobID, step: Step) {
        lost[StepID(job: job, step: step)] = nil
    }

    /// The step cannot be rebuilt here (its surviving bytes fail their checksums).
    public mutating func stepLost(job: JobID, step: Step, reason: String) {
        lost[StepID(job: job, step: step)] = reason
    }

    /// Periodic work: resend reports to silent group members, pull state for
    /// steps stuck short of a commit, give up protections that took too long.
    public mutating func tick(nowMilliseconds now: Int64, liveNodes: Set<NodeID>, store: SnapshotStore) -> [Action] {
        var actions: [Action] = []
        // Dead nodes are excused from the stable round; a step that waited
        // only for a dead node's vote commits now.
        let dead = Set(configuration.nodeIDs).subtracting(liveNodes).subtracting([selfID])
        if dead != excusedNodes {
            excusedNodes = dead
            for (id, entry) in ledger.steps.sorted(by: { $0.key < $1.key }) where !entry.committed && ledger.isFullyProtected(job: id.job, step: id.step) {
                actions += advance(id, store: store)
            }
        }
        // A peer's state covers every step: one pull per peer per tick, however many steps wait.
        var pullFrom = Set<NodeID>()
        let live = configuration.nodeIDs.filter { $0 != selfID && liveNodes.contains($0) }
        for (id, step) in own.sorted(by: { $0.key < $1.key }) {
            guard now - step.lastRetryMilliseconds >= retryIntervalMilliseconds, let entry = ledger.entry(job: id.job, step: id.step), !entry.committed else { continue }
            switch step.phase {
            case .awaitingGroup:
                if now - step.reportedAtMilliseconds > protectionTimeoutMilliseconds {
                    own[id]!.phase = .failed("not every member of group \(group.index) reported the step within \(protectionTimeoutMilliseconds) ms")
                    actions.append(.log(.warning, "protection gave up: not every member of the group reported the step", job: id.job, step: id.step))
                    continue
                }
                let silent = configuration.nodeIDs.filter { $0 != selfID && entry.ready[$0] == nil }
                if let mine = entry.ready[selfID], !silent.isEmpty { actions.append(.send(.stepReady(mine), to: silent)) }
                pullFrom.formUnion(silent)
            case .protected:
                // Anti-entropy: every live peer may hold the reports this node
                // missed (the node that sent one may have died right after).
                pullFrom.formUnion(live)
            case .sending, .failed:
                continue
            }
            own[id]!.lastRetryMilliseconds = now
        }
        // Steps an earlier incarnation of this node reported: learn their outcome (commit → rebuild).
        if now - lastInheritedPullMilliseconds >= retryIntervalMilliseconds {
            let inherited = ledger.steps.contains { id, entry in !entry.committed && own[id] == nil && entry.ready[selfID] != nil }
            if inherited, !live.isEmpty {
                pullFrom.formUnion(live)
                lastInheritedPullMilliseconds = now
            }
        }
        if !pullFrom.isEmpty { actions.append(.pullState(from: pullFrom.sorted())) }
        return actions
    }

    // MARK: Holder side

    /// What to do with a data fragment arriving for parity this node holds.
    /// A fragment of a step already committed here is late (its source
    /// retried): the parity is complete and was checked, so it is acknowledged only.
    public func admit(_ put: FragmentPut, record: ParityRecord?, store: SnapshotStore) -> Admission {
        let slot = Int(put.fragment.index)
        let id = StepID(job: put.fragment.job, step: put.fragment.step)
        if store.isCommitted(job: id.job, step: id.step) {
            // Late (its source retried): acknowledged only, unless it brings other bytes than were folded.
            if let record, let folded = record.foldedSlots[slot], folded != put.crc32c {
                return .refuse(StoreError(.invalidRequest, "slot \(slot) of committed \(id.job)/\(id.step) stripe \(put.fragment.stripe) was folded with other bytes (CRC \(folded), now \(put.crc32c))"))
            }
            return .duplicate
        }
        if let size = ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group), size != put.fragmentSizeBytes {
            return .refuse(StoreError(.invalidRequest, "fragment \(put.fragment) is \(put.fragmentSizeBytes) bytes; the group's reports give \(size)"))
        }
        guard let record else { return .fold }
        if record.fragmentSizeBytes != put.fragmentSizeBytes {
            return .refuse(StoreError(.invalidRequest, "parity of \(put.fragment) uses \(record.fragmentSizeBytes)-byte fragments, got \(put.fragmentSizeBytes)"))
        }
        if let folded = record.foldedSlots[slot] {
            if folded == put.crc32c { return .duplicate }
            return .refuse(StoreError(.invalidRequest, "slot \(slot) of \(put.fragment.job)/\(put.fragment.step) stripe \(put.fragment.stripe) was already folded with different bytes (CRC \(folded), now \(put.crc32c)); its source changed its share"))
        }
        if record.isComplete {
            return .refuse(StoreError(.invalidRequest, "parity of \(put.fragment.job)/\(put.fragment.step) stripe \(put.fragment.stripe) is sealed; slot \(slot) does not belong in it"))
        }
        return .fold
    }

    /// Whether parity `record` of `stripe` has folded every slot that carries bytes.
    public func isParityComplete(job: JobID, step: Step, stripe: Int, record: ParityRecord) -> Bool {
        guard let expected = ledger.nonZeroSlots(job: job, step: step, group: group, stripe: stripe, fragmentSizeBytes: record.fragmentSizeBytes) else { return false }
        return Set(record.foldedSlots.keys).isSuperset(of: expected)
    }

    // MARK: What this node holds

    /// Steps this node took part in and does not hold, that are committed or
    /// about to be (every node's protected report is known: the votes that
    /// commit it follow), within retention: while any is left the node counts
    /// as rebuilding. Steps lost here are not in it, nor steps older than the
    /// newest one the store committed (the cluster committed them out of
    /// order; the store already superseded them).
    public func missingSteps(store: SnapshotStore) -> [StepID] {
        ledger.steps.filter { id, entry in
            (entry.committed || ledger.isFullyProtected(job: id.job, step: id.step)) && entry.ready[selfID] != nil
                && !store.isCommitted(job: id.job, step: id.step)
                && store.latestCommitted(job: id.job).map { id.step > $0 } ?? true
                && lost[id] == nil && isWithinRetention(id) && !holds(id, store: store)
        }.map(\.key).sorted()
    }

    /// The missing steps a rebuild can work on now: committed ones (survivors
    /// serve fragments of committed steps only).
    public func rebuildableSteps(store: SnapshotStore) -> [StepID] {
        missingSteps(store: store).filter { ledger.entry(job: $0.job, step: $0.step)?.committed == true }
    }

    /// The newest step the cluster committed for `job`, as far as this node knows.
    public func newestCommitted(job: JobID) -> Step? {
        ledger.steps.keys.filter { $0.job == job && ledger.steps[$0]!.committed }.map(\.step).max()
    }

    public func lostReason(job: JobID, step: Step) -> String? { lost[StepID(job: job, step: step)] }

    /// The recovery picture, with what this node could not rebuild counted as lost.
    public func recovery(lostNodes: Set<NodeID>) -> [JobRecovery] {
        ledger.recovery(lostNodes: lostNodes, lostShares: Dictionary(uniqueKeysWithValues: lost.keys.map { ($0, selfID) }))
    }

    /// Ranks of one step that cannot be restored, as ``recovery(lostNodes:)`` counts them.
    public func lostRanks(job: JobID, step: Step, lostNodes: Set<NodeID>) -> [Rank] {
        let id = StepID(job: job, step: step)
        guard let entry = ledger.entry(job: job, step: step) else { return [] }
        return ledger.lostRanks(entry, id: id, lostNodes: lostNodes, lostShares: lost[id] != nil ? [id: selfID] : [:])
    }

    /// After the store committed a step: forget steps older than the oldest
    /// one it keeps (bounded memory; they can never be restored or rebuilt).
    public mutating func forget(job: JobID, olderThan oldest: Step) {
        for id in ledger.steps.keys where id.job == job && id.step < oldest { ledger.forget(job: id.job, step: id.step) }
        own = own.filter { $0.key.job != job || $0.key.step >= oldest }
        lost = lost.filter { $0.key.job != job || $0.key.step >= oldest }
    }

    // MARK: Internals

    /// Records a readiness report; a second, different one from the same node is a conflict (rule 1).
    @discardableResult
    private mutating func record(_ ready: StepReady) -> [Action] {
        // A report already known is the common case (every state pull repeats
        // them all): compare before decoding anything, so a repeat of an
        // LLM-sized report costs a memcmp, not a decode of its manifests.
        if let earlier = ledger.entry(job: ready.job, step: ready.step)?.ready[ready.nodeID], !faults.contains(.mutableReports) {
            guard !Self.sameReport(earlier, ready) else { return [] }
            return [.log(.error, "node \(ready.nodeID) sent a second, different report of its share; the first one stands", job: ready.job, step: ready.step)]
        }
        switch Self.validate(ready, dataFragments: layout.dataFragmentCount) {
        case .failure(let problem):
            return [.log(.error, "ignoring node \(ready.nodeID)'s report: \(problem.reason)", job: ready.job, step: ready.step)]
        case .success(let ranks):
            ledger.recordReady(ready, ranks: ranks)
            return []
        }
    }

    /// Rule 2: report an empty share once the other nodes' reports cover
    /// every rank of the job and no shard of the step is here.
    private mutating func reportEmptyShareIfProven(_ id: StepID, store: SnapshotStore, nowMilliseconds now: Int64) -> [Action] {
        guard let entry = ledger.entry(job: id.job, step: id.step), entry.ready[selfID] == nil, own[id] == nil,
            store.jobs[id.job]?.steps[id.step]?.isEmpty ?? true, !store.isCommitted(job: id.job, step: id.step)
        else { return [] }
        if !faults.contains(.eagerEmptyShare) {
            let covered = Set(entry.ranksByNode.values.joined())
            guard covered.count == Int(entry.world), covered == Set(0..<entry.world) else { return [] }
            // A node with ranks of this job that has not saved the step yet is not empty.
            if let record = store.jobs[id.job], record.localWorld > 0, !record.sessions.isEmpty || !record.steps.isEmpty { return [] }
        }
        let empty = StepReady(job: id.job, step: id.step, nodeID: selfID, world: entry.world, dataSizeBytes: 0, manifests: [])
        own[id] = OwnStep(phase: .awaitingGroup, reportedAtMilliseconds: now, lastRetryMilliseconds: now)
        record(empty)
        return [.broadcast(.stepReady(empty))]
    }

    /// After any change to a step: start sending once the group's reports fix
    /// the fragment size, hold parity, commit what is held.
    private mutating func advance(_ id: StepID, store: SnapshotStore) -> [Action] {
        guard let entry = ledger.entry(job: id.job, step: id.step) else { return [] }
        var actions: [Action] = []
        let size = ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group)
        if let size, case .awaitingGroup = own[id]?.phase {
            actions.append(.holdParity(job: id.job, step: id.step, fragmentSizeBytes: size))
            if (entry.ready[selfID]?.dataSizeBytes ?? 0) > 0 {
                own[id]!.phase = .sending(fragmentSizeBytes: size)
                actions.append(.sendFragments(job: id.job, step: id.step, fragmentSizeBytes: size))
            } else {
                // Nothing to send; the report goes out after the parity is held (the action before it).
                own[id]!.phase = .protected
                ledger.recordProtected(job: id.job, step: id.step, node: selfID)
                actions.append(.broadcast(.stepProtected(StepProtected(job: id.job, step: id.step, nodeID: selfID))))
            }
        }
        // Knowing every protected report, this node says so: the step commits
        // once every node has (then a commit anywhere survives any m losses
        // of the knowledge as well as of the bytes).
        // Any process of this node votes, a replacement too: the node that
        // committed may have died before its own vote left, and without the
        // replacement's vote the survivors would never learn of a commit its
        // trainers were told about. (A replacement's missing share is then
        // rebuilt like any lost node's.)
        if ledger.isFullyProtected(job: id.job, step: id.step), ledger.entry(job: id.job, step: id.step)?.stableNodes.contains(selfID) == false {
            ledger.recordStable(job: id.job, step: id.step, node: selfID)
            actions.append(.broadcast(.stepProtected(StepProtected(job: id.job, step: id.step, nodeID: selfID, stable: true))))
        }
        _ = ledger.commitIfComplete(job: id.job, step: id.step, requireStable: !faults.contains(.commitBeforeStable), excused: excusedNodes)
        if ledger.entry(job: id.job, step: id.step)?.committed == true, !store.isCommitted(job: id.job, step: id.step),
            holds(id, store: store) || faults.contains(.commitWithoutHolding)
        {
            actions.append(.commit(job: id.job, step: id.step, world: entry.world))
        }
        return actions
    }

    /// Rule 3: this incarnation reported the share, it is protected, and
    /// every parity fragment the node owes the step is sealed.
    public func holds(_ id: StepID, store: SnapshotStore) -> Bool {
        store.isCommitted(job: id.job, step: id.step) || holdsOwnPart(id, store: store)
    }

    /// This process reported its share, protected it, and sealed every parity
    /// fragment it owes the step.
    private func holdsOwnPart(_ id: StepID, store: SnapshotStore) -> Bool {
        guard own[id]?.phase == .protected, let size = ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group),
            let stripes = try? layout.parityStripes(node: position)
        else { return false }
        for (stripe, _) in stripes {
            guard let record = store.parity(ParityKey(job: id.job, step: id.step, stripe: stripe)), record.isComplete,
                record.fragmentSizeBytes == size
            else { return false }
        }
        return true
    }

    /// Among the newest `keptStepsPerJob` steps the ledger committed for the job.
    private func isWithinRetention(_ id: StepID) -> Bool {
        let newer = ledger.steps.filter { $0.key.job == id.job && $0.key.step > id.step && $0.value.committed }.count
        return newer < keptStepsPerJob
    }

    /// Why a readiness report cannot be used, if it cannot: sizes beyond what
    /// a group can encode, or manifests of another step or with repeated ranks.
    /// Equality of two reports, comparing manifests a word at a time (the
    /// synthesized `==` compares them byte by byte, which at tens of MiB per
    /// report is slow outside optimized builds).
    static func sameReport(_ a: StepReady, _ b: StepReady) -> Bool {
        guard a.job == b.job, a.step == b.step, a.nodeID == b.nodeID, a.world == b.world, a.dataSizeBytes == b.dataSizeBytes,
            a.manifests.count == b.manifests.count
        else { return false }
        return zip(a.manifests, b.manifests).allSatisfy { x, y in
            x.count == y.count && x.withUnsafeBytes { p in y.withUnsafeBytes { q in sameBytes(p, q) } }
        }
    }

    /// Whether two buffers of equal length hold the same bytes.
    static func sameBytes(_ p: UnsafeRawBufferPointer, _ q: UnsafeRawBufferPointer) -> Bool {
        precondition(p.count == q.count)
        let words = p.count / 8
        for index in 0..<words where p.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self) != q.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self) {
            return false
        }
        for index in (words * 8)..<p.count where p[index] != q[index] { return false }
        return true
    }

    struct InvalidReport: Error {
        let reason: String
    }

    /// Checks a peer's report (sizes within what RS fragments carry, a sane
    /// world, manifests that decode and belong to this step with distinct
    /// ranks) and returns the ranks it covers, decoding each manifest once.
    static func validate(_ ready: StepReady, dataFragments: Int) -> Result<[Rank], InvalidReport> {
        guard ready.dataSizeBytes <= UInt64(dataFragments) * UInt64(ReedSolomon.maximumFragmentSizeBytes) else {
            return .failure(InvalidReport(reason: "its share of \(ready.dataSizeBytes) bytes exceeds what RS(\(dataFragments), m) fragments can carry"))
        }
        guard ready.world > 0, ready.world <= UInt32(Int32.max) else { return .failure(InvalidReport(reason: "world size \(ready.world) is out of range")) }
        var ranks: [Rank] = []
        var seen = Set<Rank>()
        for manifest in ready.manifests {
            guard let decoded = try? ManifestFile(decoding: manifest) else { return .failure(InvalidReport(reason: "a manifest does not decode")) }
            guard decoded.key.job == ready.job, decoded.key.step == ready.step, decoded.key.rank < ready.world, seen.insert(decoded.key.rank).inserted else {
                return .failure(InvalidReport(reason: "manifest \(decoded.key) does not belong in this report"))
            }
            ranks.append(decoded.key.rank)
        }
        return .success(ranks)
    }

}
