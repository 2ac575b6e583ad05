import Foundation
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// What a session can ask of its node, as transactions on the node's one
/// state: each takes the lock once, decides through the store (and in a
/// cluster the protection machine), and returns what the session needs for
/// its I/O. Sessions (``Session``) only speak the protocol around these.
extension SnapshotServer {
    // MARK: Trainers

    func attachTrainer(session: SessionID, job: JobID, rank: Rank, world: UInt32, localWorld: UInt32) throws {
        if cluster != nil, localWorld == 0, world > 1 {
            throw StoreError(.invalidRequest, "in a cluster, trainers must say how many ranks use this node (localWorld)")
        }
        // A rank has one live session. When the store names another holder,
        // that holder may be a trainer that died an instant ago (its thread
        // sits in waitCommitted and has not looked at its socket yet): a
        // holder whose peer is gone hands the rank over at once; a live one
        // keeps it and this session is refused.
        let holder = try state.withLock { (state: inout NodeState) throws -> (id: SessionID, stream: any ByteStream)? in
            do {
                try state.store.attach(session: session, job: job, rank: rank, world: world, localWorld: localWorld)
                return nil
            } catch let error as StoreError where error.code == .duplicateRank {
                guard let id = state.store.jobs[job]?.sessions[rank], let open = state.sessions[id] else { throw error }
                return (id, open.stream)
            }
        }
        guard let holder else { return }
        // The check runs without the lock: it is a system call.
        guard holder.stream.peerHasClosed() else {
            throw StoreError(.duplicateRank, "rank \(rank) of job \(job) is already connected (session \(holder.id), still live)")
        }
        try state.withLock { state in
            // Only the holder that was checked is ended; another change meanwhile is decided afresh.
            if state.store.jobs[job]?.sessions[rank] == holder.id {
                apply(state.store.detach(session: holder.id), to: &state)
            }
            try state.store.attach(session: session, job: job, rank: rank, world: world, localWorld: localWorld)
        }
        holder.stream.shutdownBoth()  // its thread ends at its next look at the socket
        logger.info(
            "rank handed over: its previous session's client is gone",
            metadata: ["job": "\(job)", "rank": "\(rank)", "previousSession": "\(holder.id)", "session": "\(session)"])
    }

    /// Reserves the shard's memory and maps its segment (refused up front,
    /// touching nothing held, when over budget or not allowed here).
    ///
    /// Three steps, so the file work runs without the state lock (reserving
    /// a multi-GiB segment zeroes its pages, and heartbeats, protection and
    /// other sessions must not wait on it): the store reserves the bytes and
    /// hands the key to this session; the segment is created; it is
    /// installed if the reservation still stands (a cluster may have dropped
    /// the step meanwhile), else it is freed again.
    func beginSave(session: SessionID, key: ShardKey, specs: [TensorSpec], topology: Topology) throws -> (ShardRecord, MappedSegment) {
        let (record, freeBytes) = try state.withLock { state throws -> (ShardRecord, UInt64) in
            if state.draining {
                throw StoreError(.unavailable, "node \(configuration.nodeID) is draining: it takes no new saves (restores still work); cancel with snapshotctl drain --cancel")
            }
            if let refusal = cluster?.refusalOfSave(job: key.job, step: key.step, state: state) { throw refusal }
            let (record, effects) = try state.store.beginSave(session: session, key: key, specs: specs, topology: topology)
            state.sealTickets[key] = nil  // a seal of the shard this save replaces, still running, no longer applies
            apply(effects, to: &state)
            return (record, state.store.freeBytes)
        }
        var reservation = Reservation()
        reservation.took { [self] in
            state.withLock { state in
                if let effects = try? state.store.abort(session: session, key: key) { apply(effects, to: &state) }
            }
        }
        // The pool is memory too: keep held + pooled within the budget.
        arena.trimPool(toBytes: freeBytes)
        let segment: MappedSegment
        do {
            segment = try arena.createSegment(key, sizeBytes: record.segmentSizeBytes)
        } catch {
            throw StoreError(.overBudget, "cannot allocate \(record.segmentSizeBytes) bytes in the arena: \(error)")
        }
        reservation.took { [arena] in arena.release(key, segment: segment, poolLimitBytes: 0) }
        let installed = state.withLock { state -> Bool in
            guard let shard = state.store.jobs[key.job]?.steps[key.step]?[key.rank], shard.writer == session,
                shard.state == .receiving, state.segments[key] == nil
            else { return false }
            state.segments[key] = segment
            return true
        }
        guard installed else {
            throw StoreError(.unknownStep, "the save of \(key) was dropped while its memory was allocated (the step was superseded or interrupted); save a newer step")
        }
        reservation.installed()
        return (record, segment)
    }

    /// Where `lengthBytes` of tensor `tensorIndex` at `offsetBytes` go, if
    /// they belong to a save this session has in progress.
    func putDestination(session: SessionID, key: ShardKey, tensorIndex: Int, offsetBytes: UInt64, lengthBytes: UInt64) -> (MappedSegment, Int)? {
        state.withLock { state in
            guard let shard = state.store.jobs[key.job]?.steps[key.step]?[key.rank], shard.writer == session,
                shard.state == .receiving, let segment = state.segments[key], tensorIndex < shard.specs.count,
                offsetBytes <= shard.specs[tensorIndex].byteLength, lengthBytes <= shard.specs[tensorIndex].byteLength - offsetBytes
            else { return nil }
            return (segment, Int(shard.tensorOffsets[tensorIndex] + offsetBytes))
        }
    }

    /// The bytes are in: the shard is sealed off the caller's thread.
    /// `received`: when the commitSave arrived (the commit latency starts there).
    func commitSave(session: SessionID, key: ShardKey, checksums: [UInt32]?, gradientNorm: Double?, metadata: [UInt8], received: ContinuousClock.Instant = .now) throws {
        let ticket = try state.withLock { state throws -> UInt64 in
            _ = try state.store.commit(session: session, key: key, clientChecksums: checksums, gradientNorm: gradientNorm, metadata: metadata)
            let ticket = state.nextSealTicket
            state.nextSealTicket += 1
            state.sealTickets[key] = ticket
            return ticket
        }
        seal(key, ticket: ticket, clientChecksums: checksums, commitReceived: received)
    }

    func abortSave(session: SessionID, key: ShardKey) throws {
        try state.withLock { state in apply(try state.store.abort(session: session, key: key), to: &state) }
    }

    /// The job's newest committed step. In a cluster that is the cluster's
    /// (every rank restores the same step), which a node that is joining or
    /// rebuilding cannot answer for yet.
    func latestCommitted(job: JobID) throws -> Step? {
        try state.withLock { state in try latestCommitted(job: job, state: state) }
    }

    private func latestCommitted(job: JobID, state: NodeState) throws -> Step? {
        if let cluster { return try cluster.latestCommitted(job: job, state: state) }
        return state.store.latestCommitted(job: job)
    }

    /// Waits until step `step` of `job` is committed (its newest committed
    /// step then) or `sliceEnd`; nil when the slice ended first. Past
    /// `deadline` that is a timeout; a corrupted shard or a stopping daemon
    /// end the wait with their own errors.
    func waitForCommit(job: JobID, step: Step, world: UInt32, sliceEnd: Date, deadline: Date, timeoutMilliseconds: UInt32) throws -> Step? {
        try state.withLock(waitingUntil: sliceEnd) { state throws -> Step?? in
            if let latest = state.store.latestCommitted(job: job), latest >= step { return .some(latest) }
            let shards = state.store.jobs[job]?.steps[step] ?? [:]
            if let bad = shards.first(where: { $0.value.state == .corrupted }) {
                throw StoreError(.checksumMismatch, "step \(step) cannot commit: rank \(bad.key)'s shard failed its checksum check")
            }
            if state.stopping { throw StoreError(.shuttingDown, "snapshotd is stopping") }
            guard Date() >= sliceEnd else { return nil }
            if Date() < deadline { return .some(nil) }
            let complete = shards.values.filter { $0.state == .localComplete || $0.state == .protected }.count
            throw StoreError(.timeout, "step \(step) not committed within \(timeoutMilliseconds) ms (\(complete) of \(world) shards complete)")
        } ?? nil
    }

    // MARK: Restores

    /// The shard a rank restores (a committed step, the newest by default),
    /// pinned so retention cannot free it while the client maps it, and its
    /// checksums verified before anything is served.
    func pinForRestore(job: JobID, rank: Rank, step: Step?) throws -> (step: Step, shard: ShardRecord, segment: MappedSegment) {
        let (chosen, shard, segment) = try state.withLock { state throws -> (Step, ShardRecord, MappedSegment) in
            let wanted = try step ?? latestCommitted(job: job, state: state)
            if let cluster, let wanted { try cluster.checkRestorable(job: job, step: wanted, state: state) }
            let (chosen, shard) = try state.store.restorable(job: job, rank: rank, step: wanted)
            let key = ShardKey(job: job, step: chosen, rank: rank)
            guard let segment = state.segments[key] else { throw StoreError(.internalError, "\(key) has no segment") }
            state.store.pin(key)
            return (chosen, shard, segment)
        }
        let corrupted = corruptedTensors(shard, in: segment)
        guard corrupted.isEmpty else {
            counters.increment(.crcFailures)
            unpin(ShardKey(job: job, step: chosen, rank: rank))
            logger.error("refusing to serve a corrupted shard", metadata: ["job": "\(job)", "step": "\(chosen)", "rank": "\(rank)", "tensors": "\(corrupted)"])
            throw StoreError(.checksumMismatch, "step \(chosen) rank \(rank): tensor(s) \(corrupted.map { "'\($0)'" }.joined(separator: ", ")) failed the checksum check and are not served")
        }
        return (chosen, shard, segment)
    }

    func unpin(_ key: ShardKey) {
        state.withLock { state in apply(state.store.unpin(key), to: &state) }
    }

    // MARK: Operators

    /// `filter`: one job only (a trainer sees only its own). `readingDisk`:
    /// fill in flushed steps and step ages (file system calls, outside the lock).
    func status(job filter: JobID?, readingDisk: Bool = true) -> StatusReply {
        var reply = state.withLock { state in
            let store = state.store
            let jobs = store.jobs.keys.sorted().filter { filter == nil || $0 == filter }.map { name -> JobStatus in
                let record = store.jobs[name]!
                let steps = record.steps.keys.sorted().map { step -> StepStatus in
                    let shards = record.steps[step]!
                    let committed = record.committedSteps.contains(step)
                    return StepStatus(
                        step: step, committed: committed,
                        completeRanks: UInt32(shards.values.filter { $0.state == .localComplete || $0.state == .protected }.count),
                        bytes: shards.values.reduce(0) { $0 + $1.segmentSizeBytes }, phase: committed ? .committed : Self.phase(of: shards.values.map(\.state)))
                }
                return JobStatus(job: name, world: record.world, localRanks: UInt32(record.sessions.count), steps: steps)
            }
            return StatusReply(nodeID: configuration.nodeID, daemonVersion: Self.version, budgetBytes: store.budgetBytes, usedBytes: store.heldBytes + store.reservedBytes, jobs: jobs, counters: counters.snapshot)
        }
        // Outside the lock: this reads the flush directory and the arena's file times.
        guard readingDisk else { return reply }
        let now = Date().timeIntervalSince1970
        for index in reply.jobs.indices {
            let job = reply.jobs[index].job
            reply.jobs[index].flushedSteps = flushedSteps(job: job)
            for (position, step) in reply.jobs[index].steps.enumerated() {
                let path = step.committed ? arena.markerPath(job, step.step) : arena.stepDirectory(job, step.step)
                guard let changed = (try? FileManager.default.attributesOfItem(atPath: path))?[.modificationDate] as? Date else { continue }
                reply.jobs[index].steps[position].ageSeconds = UInt64(max(0, now - changed.timeIntervalSince1970))
            }
        }
        return reply
    }

    /// A step's phase on this node: that of its least advanced shard.
    static func phase(of shards: [ShardState]) -> StepStatus.Phase {
        if shards.contains(.corrupted) { return .failed }
        if shards.contains(.receiving) { return .receiving }
        if shards.contains(.sealing) { return .sealing }
        return shards.allSatisfy { $0 == .protected } ? .protected : .localComplete
    }

    /// A node answers for the whole cluster from its own view; on a single
    /// node, from its store.
    func recoverReport() -> RecoverReply {
        var report = recoverPicture()
        for index in report.jobs.indices {
            guard let flushed = flushedSteps(job: report.jobs[index].job).last else { continue }
            report.jobs[index].newestFlushed = flushed
            if !report.jobs[index].lostRanks.isEmpty {
                report.jobs[index].summary += "; the durable tier holds step \(flushed) whole: restores fall back to it"
            }
        }
        return report
    }

    private func recoverPicture() -> RecoverReply {
        if let cluster { return cluster.recoverReport() }
        let jobs = state.withLock { state in
            state.store.jobs.keys.sorted().map { job in
                let latest = state.store.latestCommitted(job: job)
                return JobRecovery(job: job, latestCommitted: latest, newestRestorable: latest, lostRanks: [], summary: latest == nil ? "no committed step" : "single node: all ranks intact")
            }
        }
        return RecoverReply(coordinator: configuration.nodeID, deadNodes: [], rebuildingNodes: [], jobs: jobs)
    }
}
