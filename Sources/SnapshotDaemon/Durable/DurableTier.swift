import Foundation
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// When the durable tier flushes (pure: the flusher feeds it what is
/// committed and the clock). A step is due when it is a multiple of
/// `everySteps`, or when `intervalMilliseconds` have passed since the last
/// flush; only the newest due step is flushed, so a flusher that falls
/// behind skips steps instead of queueing them.
struct FlushPolicy: Sendable {
    let everySteps: Int
    let intervalMilliseconds: Int64

    struct Progress: Sendable, Equatable {
        /// The newest step flushed or tried (a failed flush is not retried: the next due step is).
        var lastStep: Step?
        var lastFlushMilliseconds: Int64
    }

    init(everySteps: Int, intervalMilliseconds: Int64) {
        precondition(everySteps >= 0 && intervalMilliseconds >= 0)
        self.everySteps = everySteps
        self.intervalMilliseconds = intervalMilliseconds
    }

    func stepToFlush(committed: [Step], progress: Progress, nowMilliseconds: Int64) -> Step? {
        let newer = committed.filter { progress.lastStep == nil || $0 > progress.lastStep! }
        let byCount = everySteps > 0 ? newer.filter { $0 % Step(everySteps) == 0 }.max() : nil
        let byTime = intervalMilliseconds > 0 && nowMilliseconds - progress.lastFlushMilliseconds >= intervalMilliseconds ? newer.max() : nil
        return [byCount, byTime].compactMap { $0 }.max()
    }
}

/// The durable tier (docs/operations.md, "The durable tier"): a background thread
/// writes this node's ranks of due committed steps to `flush_directory` in
/// the export format, at most `flush_bandwidth`; a restore that memory
/// cannot serve is served from there; `snapshotctl export` writes a whole
/// step with the same code.
extension SnapshotServer {
    /// One rank to write: its shard and the bytes it lives in.
    struct RankToWrite {
        let key: ShardKey
        let shard: ShardRecord
        let bytes: MappedSegment
    }

    /// This node's sealed shards of a step, pinned (the store keeps a pinned
    /// shard's bytes until it is unpinned; callers unpin every one).
    static func pinLocalRanks(job: JobID, step: Step, state: inout NodeState) -> [RankToWrite] {
        state.store.localShards(job: job, step: step).compactMap { rank, shard -> RankToWrite? in
            let key = ShardKey(job: job, step: step, rank: rank)
            guard shard.checksums != nil, let segment = state.segments[key] else { return nil }
            state.store.pin(key)
            return RankToWrite(key: key, shard: shard, bytes: segment)
        }
    }

    func startFlusher() {
        guard let root = configuration.flushDirectory else { return }
        let policy = FlushPolicy(everySteps: configuration.flushEverySteps, intervalMilliseconds: configuration.flushIntervalMilliseconds)
        Thread.detachNewThread { [self] in
            var progress: [JobID: FlushPolicy.Progress] = [:]
            let started = monotonicMilliseconds()
            while sleepUnlessStopping(milliseconds: Limits.flushPollMilliseconds) {
                let now = monotonicMilliseconds()
                let due: [(JobID, Step, UInt32)] = state.withLock { state in
                    state.store.jobs.sorted { $0.key < $1.key }.compactMap { job, record in
                        let current = progress[job] ?? .init(lastStep: nil, lastFlushMilliseconds: started)
                        guard let step = policy.stepToFlush(committed: Array(record.committedSteps), progress: current, nowMilliseconds: now) else { return nil }
                        return (job, step, record.world)
                    }
                }
                for (job, step, world) in due {
                    progress[job] = .init(lastStep: step, lastFlushMilliseconds: now)
                    // Pinned just before its own flush: another job's retired steps are not held meanwhile.
                    let ranks = state.withLock { state in
                        state.store.isCommitted(job: job, step: step) ? Self.pinLocalRanks(job: job, step: step, state: &state) : []
                    }
                    flush(job: job, step: step, world: world, ranks: ranks, root: root)
                }
            }
        }
    }

    private func flush(job: JobID, step: Step, world: UInt32, ranks: [RankToWrite], root: String) {
        defer { for rank in ranks { unpin(rank.key) } }
        guard !ranks.isEmpty else { return }
        // An approximate shard (CheckFree) is no fallback: its estimate would come back as if exact.
        if let approximate = ranks.first(where: { $0.shard.reconstruction != nil }) {
            logger.notice("step not flushed: it holds a shard CheckFree rebuilt approximately", metadata: ["job": "\(job)", "step": "\(step)", "rank": "\(approximate.key.rank)"])
            return
        }
        let started = monotonicMilliseconds()
        var pacer: BandwidthPacer? = BandwidthPacer(bytesPerSecond: Int(clamping: configuration.flushBytesPerSecond))
        let keys = ranks.map(\.key)
        // A step the store retires meanwhile is abandoned, so its memory is freed
        // at once: a paced flush never holds more than the kept steps.
        let isCancelled = { [self] in state.withLock { state in state.stopping || keys.contains { state.store.doomed.contains($0) } } }
        let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
        do {
            var bytes: UInt64 = 0
            for rank in ranks {
                bytes += try DurableFiles.writeRank(
                    stepDirectory: directory, key: rank.key, world: world, shard: rank.shard, bytes: rank.bytes.base!, pacer: &pacer, isCancelled: isCancelled)
            }
            try DurableFiles.writeStepManifest(stepDirectory: directory, job: job, step: step, world: world)
            DurableFiles.prune(root: root, job: job, ranks: ranks.map(\.key.rank), kept: configuration.flushKeptSteps)
            let seconds = Double(monotonicMilliseconds() - started) / 1000
            metrics.recordFlush(seconds: seconds)
            counters.increment(.stepsFlushed)
            counters.increment(.flushedBytes, by: bytes)
            logger.info("step flushed to the durable tier", metadata: [
                "job": "\(job)", "step": "\(step)", "ranks": "\(ranks.map(\.key.rank))", "bytes": "\(bytes)", "seconds": "\(seconds)", "directory": "\(directory)",
            ])
        } catch {
            // What this node wrote of the step goes: a part of a step is no fallback and would never be pruned.
            for rank in ranks {
                unlink("\(directory)/\(ExportLayout.rankManifestFile(rank: rank.key.rank))")
                unlink("\(directory)/\(ExportLayout.tensorFile(rank: rank.key.rank))")
            }
            if isCancelled() {
                counters.increment(.flushesAbandoned)
                logger.notice("flush abandoned: the step was retired from memory before it was written (flush_bandwidth too low for the step cadence?)", metadata: [
                    "job": "\(job)", "step": "\(step)",
                ])
            } else {
                counters.increment(.flushFailures)
                logger.error("flush to the durable tier failed; the next due step is tried", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
            }
        }
    }

    /// A restore that memory cannot serve, from the durable tier: `step` if
    /// asked and complete there, else the newest complete step, unless
    /// memory still holds a step as new (`memoryNewest`, which the caller's
    /// error names). Nil when the durable tier has nothing to offer.
    func durableRestore(job: JobID, rank: Rank, step: Step?, world: UInt32, memoryNewest: Step?) throws -> DurableFiles.DurableShard? {
        guard let root = configuration.flushDirectory, let chosen = DurableFiles.stepToRestore(root: root, job: job, wanted: step) else { return nil }
        if step == nil, let memoryNewest, memoryNewest >= chosen { return nil }
        do {
            return try DurableFiles.readRank(root: root, job: job, step: chosen, rank: rank, world: world)
        } catch {
            counters.increment(.durableReadFailures)
            logger.error("a durable copy cannot be served", metadata: ["job": "\(job)", "step": "\(chosen)", "rank": "\(rank)", "error": "\(error)"])
            throw error
        }
    }

    /// Whether the cluster's view counts `rank` of `job` lost beyond
    /// tolerance at `step` (nil: the newest committed; a rebuild keeps
    /// retrying it, but it cannot succeed), and the newest step memory can
    /// still restore.
    func memoryLoss(job: JobID, rank: Rank, step: Step?) -> (lost: Bool, newestRestorable: Step?) {
        guard let recovery = cluster?.recoverPicture().jobs.first(where: { $0.job == job }) else { return (false, nil) }
        let atNewest = step == nil || step == recovery.latestCommitted
        return (atNewest && recovery.lostRanks.contains(rank), recovery.newestRestorable)
    }

    /// The step a restore of "the newest step" goes to when the cluster lost
    /// part of `job`'s newest committed step: the same for every rank on
    /// every node, the newer of what memory can still restore whole and what
    /// the durable tier holds whole. Nil when nothing is lost (or nothing is left).
    func jobWideRestoreTarget(job: JobID) -> Step? {
        guard let recovery = cluster?.recoverPicture().jobs.first(where: { $0.job == job }), !recovery.lostRanks.isEmpty else { return nil }
        let durable = configuration.flushDirectory.flatMap { DurableFiles.stepToRestore(root: $0, job: job, wanted: nil) }
        return [recovery.newestRestorable, durable].compactMap { $0 }.max()
    }

    /// Steps of `job` complete in the durable tier as this node sees it, oldest first.
    func flushedSteps(job: JobID) -> [Step] {
        guard let root = configuration.flushDirectory else { return [] }
        return DurableFiles.completeSteps(root: root, job: job).reversed()
    }

    // MARK: Export

    /// `snapshotctl export`: writes every rank of a committed step to
    /// `request.directory`, unpaced (an operator asked and waits), one rank
    /// at a time: this node's from its memory, the others fetched from the
    /// nodes that hold them, every tensor CRC-checked.
    func export(_ request: ExportRequest) throws -> ExportReply {
        guard request.directory.hasPrefix("/") else { throw StoreError(.invalidRequest, "export directory '\(request.directory)' must be an absolute path") }
        // Symbolic links resolved: no way into the arena or the durable tier through one.
        let root = Self.resolvedPath(request.directory)
        for (own, what) in [(arena.root, "the arena"), (configuration.flushDirectory, "the durable tier")] {
            guard let own else { continue }
            let ownPath = Self.resolvedPath(own)
            func inside(_ path: String, _ directory: String) -> Bool { path == directory || path.hasPrefix(directory == "/" ? "/" : directory + "/") }
            if inside(root, ownPath) || inside(ownPath, root) {
                throw StoreError(.invalidRequest, "export directory \(root) overlaps \(what) (\(ownPath)); choose another")
            }
        }
        let (step, world, local) = try state.withLock { state throws -> (Step, UInt32, [RankToWrite]) in
            // Committed steps as this node knows them: its store, and in a cluster the ledger (a node may hold none of a job's ranks).
            var worlds: [Step: UInt32] = [:]
            if let record = state.store.jobs[request.job] { for step in record.committedSteps { worlds[step] = record.world } }
            for (id, entry) in state.cluster?.protection.ledger.steps ?? [:] where id.job == request.job && entry.committed { worlds[id.step] = entry.world }
            guard !worlds.isEmpty else { throw StoreError(.unknownStep, "no committed step of job \(request.job) is known here") }
            guard let step = request.step ?? worlds.keys.max(), let world = worlds[step] else {
                throw StoreError(.unknownStep, "step \(request.step!) of \(request.job) is not a committed step held (committed: \(worlds.keys.sorted()))")
            }
            return (step, world, Self.pinLocalRanks(job: request.job, step: step, state: &state))
        }
        defer { for rank in local { unpin(rank.key) } }
        let directory = ExportLayout.stepDirectory(root: root, job: request.job, step: step)
        let held = Dictionary(uniqueKeysWithValues: local.map { ($0.key.rank, $0) })
        let remote = try held.count == Int(world) ? [:] : cluster?.reportedRanks(job: request.job, step: step) ?? [:]
        var unpaced: BandwidthPacer? = nil
        var bytes: UInt64 = 0
        for rank in 0..<world {
            let shard: RankToWrite
            if let mine = held[rank] {
                let bad = corruptedTensors(mine.shard, in: mine.bytes)
                guard bad.isEmpty else { throw StoreError(.checksumMismatch, "\(mine.key) has tensor(s) \(bad) that fail their sealed CRCs; not exported") }
                shard = mine
            } else {
                guard let cluster, let reported = remote[rank] else {
                    throw StoreError(.unavailable, "rank \(rank) of step \(step) of \(request.job) is held by no node this one knows of")
                }
                shard = try cluster.fetchForExport(job: request.job, step: step, rank: rank, reported: reported)
            }
            bytes += try DurableFiles.writeRank(stepDirectory: directory, key: shard.key, world: world, shard: shard.shard, bytes: shard.bytes.base!, pacer: &unpaced)
        }
        try DurableFiles.writeStepManifest(stepDirectory: directory, job: request.job, step: step, world: world)
        logger.notice("step exported", metadata: ["job": "\(request.job)", "step": "\(step)", "ranks": "\(world)", "bytes": "\(bytes)", "directory": "\(directory)"])
        return ExportReply(job: request.job, step: step, directory: directory, ranks: world, bytes: bytes)
    }
}

extension SnapshotServer {
    /// `path` with every symbolic link of its deepest existing ancestor resolved (the rest appended).
    static func resolvedPath(_ path: String) -> String {
        var existing = (path as NSString).standardizingPath
        var rest: [String] = []
        while !FileManager.default.fileExists(atPath: existing), existing != "/" {
            rest.insert((existing as NSString).lastPathComponent, at: 0)
            existing = (existing as NSString).deletingLastPathComponent
        }
        guard let resolved = realpath(existing, nil) else { return (path as NSString).standardizingPath }
        defer { free(resolved) }
        return ([String(cString: resolved)] + rest).joined(separator: "/").replacingOccurrences(of: "//", with: "/")
    }
}

extension ClusterNode {
    /// The cluster's reports of a committed step, by rank.
    func reportedRanks(job: JobID, step: Step) throws -> [Rank: ReportedShard] {
        let entry = try withClusterState { cluster, _ throws -> ClusterLedger.StepEntry in
            guard let entry = cluster.protection.ledger.entry(job: job, step: step), entry.committed else {
                throw StoreError(.unknownStep, "the cluster holds no committed step \(step) of \(job)")
            }
            return entry
        }
        return try reportedShards(entry)
    }

    /// One rank fetched whole from the node holding it, CRC-checked. A
    /// peer's failure is an error reply to the operator, not the end of
    /// the operator's session.
    func fetchForExport(job: JobID, step: Step, rank: Rank, reported: ReportedShard) throws -> SnapshotServer.RankToWrite {
        if withClusterState({ cluster, _ in cluster.monitor.deadNodes.contains(reported.node) }) {
            throw StoreError(.unavailable, "rank \(rank) of step \(step) is held by node \(reported.node), which is dead: rebuild it first")
        }
        do {
            let segment = try fetchShard(job: job, step: step, rank: rank, reported: reported)
            return SnapshotServer.RankToWrite(key: ShardKey(job: job, step: step, rank: rank), shard: reported.manifest.shard, bytes: segment)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.unavailable, "rank \(rank) of step \(step) from node \(reported.node): \(error)")
        }
    }
}
