public import SnapshotProtocol

/// The daemon's bookkeeping as a deterministic state machine: calls in,
/// decisions out. No I/O, no clock, no threads: the server applies the
/// decisions (create/free segment files, write markers) around it, and tests
/// drive every interleaving directly.
///
/// Invariants (checked by ``checkInvariants()``):
/// - `heldBytes` is the sum of the segment sizes of all shards and parity held.
/// - `heldBytes + reservedBytes` stays within the budget for every admission.
/// - The newest committed step of a job is never freed before a newer one commits.
/// - Only committed steps are restorable; every rank restores the same step.
public struct SnapshotStore: Sendable {
    public let budgetBytes: UInt64
    public let snapshotsKeptPerJob: Int
    /// Single node: a step commits when all its shards are sealed here. In a
    /// cluster the node only reports its share complete (`localComplete`) and
    /// the cluster decides (``markCommitted(job:step:world:)``).
    public let commitsLocally: Bool

    public private(set) var jobs: [JobID: JobRecord] = [:]
    public private(set) var heldBytes: UInt64 = 0
    /// Bytes promised to work that is still allocating them (a rebuild's
    /// segments), by reservation: counted against the budget, held by no
    /// record until ``adoptCommitted(job:step:world:shards:parity:reservation:)``
    /// turns them into held bytes or ``cancelReservation(_:)`` frees them.
    public private(set) var reservations: [ReservationID: UInt64] = [:]
    private var nextReservation: ReservationID = 1
    /// Shards still mapped by restoring clients: freed only when the count drops to 0.
    public private(set) var restorePins: [ShardKey: Int] = [:]
    /// Shards retention released while pinned; freed on the last unpin.
    public private(set) var doomed: Set<ShardKey> = []
    /// Cluster mode: steps a rank failure interrupted on this node. Their
    /// other shards may already be folded into parity on peers, so a re-save
    /// would leave that parity stale; such a step never commits.
    public private(set) var interruptedSteps: [JobID: Set<Step>] = [:]

    public struct JobRecord: Sendable, Equatable {
        public var world: UInt32
        /// Ranks of the job served by this node (== world on a single node).
        public var localWorld: UInt32
        public var steps: [Step: [Rank: ShardRecord]] = [:]
        /// Parity fragments this node holds for other nodes' data, by step and stripe.
        public var parity: [Step: [Int: ParityRecord]] = [:]
        public var committedSteps: [Step] = []  // ascending
        public var sessions: [Rank: SessionID] = [:]

        public var latestCommitted: Step? { committedSteps.last }
    }

    /// What the server must do after a call.
    public struct Effects: Sendable, Equatable {
        /// Segments to release (files to unlink or pool).
        public var freed: [ShardKey] = []
        /// Steps that just became committed (write the marker).
        public var committed: [(job: JobID, step: Step, world: UInt32)] = []
        /// Steps whose committed marker must go before their files are freed.
        public var uncommitted: [(job: JobID, step: Step)] = []
        /// Cluster mode: this node's share of these steps is sealed; protect it.
        public var localComplete: [(job: JobID, step: Step)] = []
        /// Parity segments to release.
        public var freedParity: [ParityKey] = []

        public static func == (a: Effects, b: Effects) -> Bool {
            a.freed == b.freed && a.committed.map { "\($0.job)/\($0.step)" } == b.committed.map { "\($0.job)/\($0.step)" }
                && a.uncommitted.map { "\($0.job)/\($0.step)" } == b.uncommitted.map { "\($0.job)/\($0.step)" }
                && a.localComplete.map { "\($0.job)/\($0.step)" } == b.localComplete.map { "\($0.job)/\($0.step)" }
                && a.freedParity == b.freedParity
        }

        public mutating func merge(_ other: Effects) {
            freed += other.freed
            committed += other.committed
            uncommitted += other.uncommitted
            localComplete += other.localComplete
            freedParity += other.freedParity
        }
    }

    public init(budgetBytes: UInt64, snapshotsKeptPerJob: Int, commitsLocally: Bool = true) {
        precondition(snapshotsKeptPerJob >= 1, "at least the newest committed step is kept")
        self.budgetBytes = budgetBytes
        self.snapshotsKeptPerJob = snapshotsKeptPerJob
        self.commitsLocally = commitsLocally
    }

    public var reservedBytes: UInt64 { reservations.values.reduce(0, +) }

    public var freeBytes: UInt64 {
        let used = heldBytes + reservedBytes
        return budgetBytes > used ? budgetBytes - used : 0
    }

    // MARK: Reservations

    /// Promises `bytes` of the budget to work that allocates them later;
    /// refused up front, touching nothing held, when they are not free.
    public mutating func reserve(bytes: UInt64, for purpose: String) throws(StoreError) -> ReservationID {
        guard bytes <= freeBytes else {
            throw StoreError(.overBudget, "\(purpose) needs \(bytes) bytes; \(freeBytes) of \(budgetBytes) budget bytes are free")
        }
        let id = nextReservation
        nextReservation += 1
        reservations[id] = bytes
        return id
    }

    /// The work gave up: its bytes are free again. A reservation already
    /// adopted or cancelled is ignored, so every error path may call this.
    public mutating func cancelReservation(_ id: ReservationID) {
        reservations[id] = nil
    }

    // MARK: Sessions

    /// A trainer session claims (job, rank). A rank has one live session.
    /// `localWorld` 0 means every rank of the job is local.
    public mutating func attach(session: SessionID, job: JobID, rank: Rank, world: UInt32, localWorld: UInt32 = 0) throws(StoreError) {
        let local = localWorld == 0 ? world : localWorld
        if let record = jobs[job] {
            guard record.world == world else {
                throw StoreError(.wrongJob, "job \(job) has world size \(record.world), this session says \(world)")
            }
            if let other = record.sessions[rank], other != session {
                throw StoreError(.duplicateRank, "rank \(rank) of job \(job) is already connected (session \(other))")
            }
            if record.localWorld == 0 {
                jobs[job]!.localWorld = local  // the job was known here only through parity
            } else if record.localWorld != local {
                throw StoreError(.wrongJob, "job \(job) has \(record.localWorld) ranks on this node, this session says \(local)")
            }
        } else {
            jobs[job] = JobRecord(world: world, localWorld: local)
        }
        jobs[job]!.sessions[rank] = session
    }

    /// The session ended (cleanly or not): shards it was still writing are
    /// discarded, never restored.
    public mutating func detach(session: SessionID) -> Effects {
        var effects = Effects()
        for (job, record) in jobs {
            for (rank, owner) in record.sessions where owner == session { jobs[job]!.sessions[rank] = nil }
            for (step, shards) in record.steps {
                for (rank, shard) in shards where shard.writer == session && shard.state == .receiving {
                    effects.freed.append(removeShard(ShardKey(job: job, step: step, rank: rank)))
                    if !commitsLocally { interruptedSteps[job, default: []].insert(step) }
                }
            }
        }
        return effects
    }

    // MARK: Saving

    /// Reserves memory for a shard. Refused up front, touching nothing held,
    /// when over budget; a rank re-saving an uncommitted step replaces its shard.
    public mutating func beginSave(
        session: SessionID, key: ShardKey, specs: [TensorSpec], topology: Topology
    ) throws(StoreError) -> (record: ShardRecord, effects: Effects) {
        guard let record = jobs[key.job], record.sessions[key.rank] == session else {
            throw StoreError(.helloRequired, "session is not attached to \(key.job) rank \(key.rank)")
        }
        if let latest = record.latestCommitted, key.step <= latest {
            throw StoreError(.invalidRequest, "step \(key.step) is not newer than committed step \(latest) of job \(key.job)")
        }
        if !commitsLocally, interruptedSteps[key.job]?.contains(key.step) == true {
            throw StoreError(.invalidRequest, "step \(key.step) of job \(key.job) was interrupted by a rank failure on this node and can no longer commit; save a newer step")
        }
        var effects = Effects()
        var reclaimable: UInt64 = 0
        if let existing = record.steps[key.step]?[key.rank] {
            guard existing.writer == nil || existing.writer == session || existing.state != .receiving else {
                throw StoreError(.saveInProgress, "\(key) is being written by another session")
            }
            // In a cluster a sealed shard may already be folded into peers' parity.
            guard commitsLocally || existing.state == .receiving else {
                throw StoreError(.invalidRequest, "\(key) is already sealed and being protected across the cluster; save a newer step")
            }
            reclaimable = existing.segmentSizeBytes
        }
        guard let layout = SegmentLayout.offsets(for: specs) else {
            throw StoreError(.invalidRequest, "save of \(key): its \(specs.count) tensors add up to more than \(SegmentLayout.maximumSegmentBytes) bytes, the most any shard may hold")
        }
        let available = freeBytes + reclaimable
        guard layout.segmentSizeBytes <= available else {
            throw StoreError(.overBudget, "save of \(key) needs \(layout.segmentSizeBytes) bytes; \(freeBytes) of \(budgetBytes) budget bytes are free")
        }
        if reclaimable > 0 { effects.freed.append(removeShard(key)) }
        let shard = ShardRecord(
            state: .receiving, specs: specs, tensorOffsets: layout.offsets, segmentSizeBytes: layout.segmentSizeBytes,
            topology: topology, checksums: nil, gradientNorm: nil, metadata: [], writer: session)
        jobs[key.job]!.steps[key.step, default: [:]][key.rank] = shard
        heldBytes += shard.segmentSizeBytes
        return (shard, effects)
    }

    /// The writer says the bytes are in: the shard goes to sealing.
    public mutating func commit(
        session: SessionID, key: ShardKey, clientChecksums: [UInt32]?, gradientNorm: Double?, metadata: [UInt8]
    ) throws(StoreError) -> ShardRecord {
        guard var shard = jobs[key.job]?.steps[key.step]?[key.rank] else {
            throw StoreError(.unknownStep, "commit of \(key) without a begin-save")
        }
        guard shard.writer == session, shard.state == .receiving else {
            throw StoreError(.invalidRequest, "\(key) is \(shard.state), not being written by this session")
        }
        if let clientChecksums, clientChecksums.count != shard.specs.count {
            throw StoreError(.invalidRequest, "\(clientChecksums.count) checksums for \(shard.specs.count) tensors")
        }
        shard.state = .sealing
        shard.writer = nil
        shard.gradientNorm = gradientNorm
        shard.metadata = metadata
        jobs[key.job]!.steps[key.step]![key.rank] = shard
        return shard
    }

    /// The writer gave up on a save.
    public mutating func abort(session: SessionID, key: ShardKey) throws(StoreError) -> Effects {
        guard let shard = jobs[key.job]?.steps[key.step]?[key.rank], shard.writer == session else {
            throw StoreError(.unknownStep, "no save of \(key) in progress on this session")
        }
        return Effects(freed: [removeShard(key)])
    }

    /// Checksums computed: the shard is local-complete. Commits the step when
    /// every rank's shard is, then applies retention.
    public mutating func sealed(key: ShardKey, checksums: [UInt32]) -> Effects {
        guard var shard = jobs[key.job]?.steps[key.step]?[key.rank], shard.state == .sealing else { return Effects() }
        precondition(checksums.count == shard.specs.count)
        shard.state = .localComplete
        shard.checksums = checksums
        jobs[key.job]!.steps[key.step]![key.rank] = shard
        guard let record = jobs[key.job], let shards = record.steps[key.step], shards.count == Int(record.localWorld),
            shards.values.allSatisfy({ $0.state == .localComplete || $0.state == .protected })
        else { return Effects() }
        if commitsLocally { return markCommitted(job: key.job, step: key.step, world: record.world) }
        var effects = Effects()
        effects.localComplete.append((key.job, key.step))
        return effects
    }

    /// Cluster mode: this node's share of an uncommitted step conflicts with
    /// what the cluster holds; its shards are dropped and the step can no
    /// longer commit from them.
    public mutating func dropUncommittedStep(job: JobID, step: Step) -> Effects {
        guard !isCommitted(job: job, step: step), let shards = jobs[job]?.steps[step] else { return Effects() }
        var effects = Effects()
        for rank in shards.keys.sorted() { effects.freed.append(removeShard(ShardKey(job: job, step: step, rank: rank))) }
        interruptedSteps[job, default: []].insert(step)
        return effects
    }

    /// The shards of a node's share of a step, in rank order (cluster mode).
    public func localShards(job: JobID, step: Step) -> [(rank: Rank, shard: ShardRecord)] {
        (jobs[job]?.steps[step] ?? [:]).sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    /// Sealing found the bytes did not match the client's checksums.
    public mutating func sealFailed(key: ShardKey) {
        guard jobs[key.job]?.steps[key.step]?[key.rank] != nil else { return }
        jobs[key.job]!.steps[key.step]![key.rank]!.state = .corrupted
    }

    /// The step is committed (single node: all shards sealed; cluster: every
    /// node protected). Applies retention. Idempotent.
    public mutating func markCommitted(job: JobID, step: Step, world: UInt32) -> Effects {
        if jobs[job] == nil { jobs[job] = JobRecord(world: world, localWorld: 0) }
        guard !jobs[job]!.committedSteps.contains(step) else { return Effects() }
        if let latest = jobs[job]!.latestCommitted, step < latest { return Effects() }  // superseded already
        var effects = Effects()
        jobs[job]!.committedSteps.append(step)
        jobs[job]!.committedSteps.sort()
        if !commitsLocally {
            for rank in (jobs[job]!.steps[step] ?? [:]).keys { jobs[job]!.steps[step]![rank]!.state = .protected }
        }
        effects.committed.append((job, step, jobs[job]!.world))
        applyRetention(job: job, into: &effects)
        return effects
    }

    // MARK: Parity

    /// Reserves a parity fragment's memory (within the budget, like a save).
    public mutating func reserveParity(_ key: ParityKey, row: Int, fragmentSizeBytes: UInt64, world: UInt32) throws(StoreError) -> ParityRecord {
        if let existing = jobs[key.job]?.parity[key.step]?[key.stripe] { return existing }
        if let latest = jobs[key.job]?.latestCommitted, key.step <= latest, !(jobs[key.job]!.committedSteps.contains(key.step)) {
            throw StoreError(.invalidRequest, "\(key) is older than committed step \(latest)")
        }
        guard let size = SegmentLayout.fragmentSegmentBytes(fragmentSizeBytes) else {
            throw StoreError(.invalidRequest, "parity for \(key): a fragment of \(fragmentSizeBytes) bytes is over the segment limit")
        }
        guard size <= freeBytes else {
            throw StoreError(.overBudget, "parity for \(key) needs \(size) bytes; \(freeBytes) of \(budgetBytes) budget bytes are free")
        }
        if jobs[key.job] == nil { jobs[key.job] = JobRecord(world: world, localWorld: 0) }
        let record = ParityRecord(row: row, fragmentSizeBytes: fragmentSizeBytes, segmentSizeBytes: size)
        jobs[key.job]!.parity[key.step, default: [:]][key.stripe] = record
        heldBytes += size
        return record
    }

    public func parity(_ key: ParityKey) -> ParityRecord? { jobs[key.job]?.parity[key.step]?[key.stripe] }

    public mutating func updateParity(_ key: ParityKey, _ update: (inout ParityRecord) -> Void) {
        guard jobs[key.job]?.parity[key.step]?[key.stripe] != nil else { return }
        update(&jobs[key.job]!.parity[key.step]![key.stripe]!)
    }

    public mutating func releaseParity(_ key: ParityKey) -> Effects {
        guard let record = jobs[key.job]?.parity[key.step]?.removeValue(forKey: key.stripe) else { return Effects() }
        if jobs[key.job]!.parity[key.step]!.isEmpty { jobs[key.job]!.parity[key.step] = nil }
        heldBytes -= record.segmentSizeBytes
        return Effects(freedParity: [key])
    }

    /// Keeps the newest `snapshotsKeptPerJob` committed steps; frees older
    /// committed steps and any uncommitted step older than the newest commit
    /// (it can no longer become the newest).
    private mutating func applyRetention(job: JobID, into effects: inout Effects) {
        guard let record = jobs[job], let newest = record.latestCommitted else { return }
        if let interrupted = interruptedSteps[job] { interruptedSteps[job] = interrupted.filter { $0 > newest } }
        let kept = Set(record.committedSteps.suffix(snapshotsKeptPerJob))
        for step in record.parity.keys.sorted() where !kept.contains(step) && step < newest {
            for stripe in record.parity[step]!.keys.sorted() {
                effects.merge(releaseParity(ParityKey(job: job, step: step, stripe: stripe)))
            }
        }
        for step in Set(record.steps.keys).union(record.committedSteps).sorted() where !kept.contains(step) && step < newest {
            if record.committedSteps.contains(step) { effects.uncommitted.append((job, step)) }
            jobs[job]!.committedSteps.removeAll { $0 == step }
            for rank in (record.steps[step] ?? [:]).keys.sorted() {
                let key = ShardKey(job: job, step: step, rank: rank)
                if restorePins[key, default: 0] > 0 {
                    doomed.insert(key)
                } else {
                    effects.freed.append(removeShard(key))
                }
            }
        }
    }

    // MARK: Restoring

    public func latestCommitted(job: JobID) -> Step? { jobs[job]?.latestCommitted }

    public func isCommitted(job: JobID, step: Step) -> Bool { jobs[job]?.committedSteps.contains(step) ?? false }

    /// The shard a rank restores: a committed step only (the latest by default).
    public func restorable(job: JobID, rank: Rank, step: Step?) throws(StoreError) -> (step: Step, shard: ShardRecord) {
        guard let record = jobs[job] else { throw StoreError(.unknownStep, "no snapshots of job \(job)") }
        guard let chosen = step ?? record.latestCommitted else {
            throw StoreError(.notCommitted, "job \(job) has no committed step yet")
        }
        guard record.committedSteps.contains(chosen), !doomed.contains(ShardKey(job: job, step: chosen, rank: rank)) else {
            throw StoreError(.notCommitted, "step \(chosen) of job \(job) is not committed (committed: \(record.committedSteps))")
        }
        guard let shard = record.steps[chosen]?[rank] else {
            throw StoreError(.unknownStep, "step \(chosen) of job \(job) has no shard for rank \(rank)")
        }
        return (chosen, shard)
    }

    public mutating func pin(_ key: ShardKey) { restorePins[key, default: 0] += 1 }

    public mutating func unpin(_ key: ShardKey) -> Effects {
        guard let count = restorePins[key] else { return Effects() }
        if count > 1 {
            restorePins[key] = count - 1
            return Effects()
        }
        restorePins[key] = nil
        guard doomed.remove(key) != nil else { return Effects() }
        return Effects(freed: [removeShard(key)])
    }

    // MARK: Restart

    /// Re-adopts a committed step found in the arena after a restart, or
    /// rebuilt from the survivors' fragments.
    public mutating func adoptCommitted(
        job: JobID, step: Step, world: UInt32, shards: [Rank: ShardRecord], parity: [Int: ParityRecord] = [:], reservation: ReservationID? = nil
    ) {
        if let reservation { reservations[reservation] = nil }  // its bytes are held from here on
        if jobs[job] == nil { jobs[job] = JobRecord(world: world, localWorld: commitsLocally ? world : UInt32(shards.count)) }
        if jobs[job]!.localWorld == 0 && !shards.isEmpty { jobs[job]!.localWorld = UInt32(shards.count) }
        for (rank, shard) in shards {
            jobs[job]!.steps[step, default: [:]][rank] = shard
            heldBytes += shard.segmentSizeBytes
        }
        for (stripe, record) in parity {
            jobs[job]!.parity[step, default: [:]][stripe] = record
            heldBytes += record.segmentSizeBytes
        }
        if !jobs[job]!.committedSteps.contains(step) {
            jobs[job]!.committedSteps.append(step)
            jobs[job]!.committedSteps.sort()
        }
    }

    // MARK: Internals

    private mutating func removeShard(_ key: ShardKey) -> ShardKey {
        guard let shard = jobs[key.job]?.steps[key.step]?.removeValue(forKey: key.rank) else { return key }
        if jobs[key.job]!.steps[key.step]!.isEmpty { jobs[key.job]!.steps[key.step] = nil }
        precondition(heldBytes >= shard.segmentSizeBytes, "held bytes underflow")
        heldBytes -= shard.segmentSizeBytes
        return key
    }

    /// For tests and debug builds: recomputes what the store tracks incrementally.
    public func checkInvariants() -> [String] {
        var problems: [String] = []
        var total: UInt64 = 0
        for (job, record) in jobs {
            for (step, shards) in record.steps {
                for (_, shard) in shards { total += shard.segmentSizeBytes }
                if record.committedSteps.contains(step), shards.count != Int(record.localWorld) {
                    problems.append("\(job) step \(step) committed with \(shards.count) of \(record.localWorld) local shards")
                }
            }
            for (_, stripes) in record.parity { for (_, parity) in stripes { total += parity.segmentSizeBytes } }
            if commitsLocally {
                for step in record.committedSteps where record.steps[step] == nil {
                    problems.append("\(job) committed step \(step) has no shards")
                }
            }
        }
        if total != heldBytes { problems.append("heldBytes \(heldBytes) but shards sum to \(total)") }
        return problems
    }
}
