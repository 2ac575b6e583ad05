import Foundation
import SnapshotIO
import SnapshotProtocol

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

/// The durable tier (README, "The durable tier"): a background thread
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

    func startFlusher() {
        guard let root = configuration.flushDirectory else { return }
        let policy = FlushPolicy(everySteps: configuration.flushEverySteps, intervalMilliseconds: configuration.flushIntervalMilliseconds)
        Thread.detachNewThread { [self] in
            var progress: [JobID: FlushPolicy.Progress] = [:]
            let started = monotonicMilliseconds()
            while sleepUnlessStopping(milliseconds: Limits.flushPollMilliseconds) {
                let now = monotonicMilliseconds()
                // Pinned under the lock: the store keeps a pinned shard until it is unpinned.
                let due: [(JobID, Step, UInt32, [RankToWrite])] = state.withLock { state in
                    state.store.jobs.sorted { $0.key < $1.key }.compactMap { job, record in
                        let current = progress[job] ?? .init(lastStep: nil, lastFlushMilliseconds: started)
                        guard let step = policy.stepToFlush(committed: Array(record.committedSteps), progress: current, nowMilliseconds: now) else { return nil }
                        let ranks = state.store.localShards(job: job, step: step).compactMap { rank, shard -> RankToWrite? in
                            let key = ShardKey(job: job, step: step, rank: rank)
                            guard shard.checksums != nil, let segment = state.segments[key] else { return nil }
                            state.store.pin(key)
                            return RankToWrite(key: key, shard: shard, bytes: segment)
                        }
                        return (job, step, record.world, ranks)
                    }
                }
                for (job, step, world, ranks) in due {
                    progress[job] = .init(lastStep: step, lastFlushMilliseconds: now)
                    flush(job: job, step: step, world: world, ranks: ranks, root: root)
                }
            }
        }
    }

    private func flush(job: JobID, step: Step, world: UInt32, ranks: [RankToWrite], root: String) {
        defer { for rank in ranks { unpin(rank.key) } }
        guard !ranks.isEmpty else { return }
        let started = monotonicMilliseconds()
        var pacer: BandwidthPacer? = BandwidthPacer(bytesPerSecond: Int(clamping: configuration.flushBytesPerSecond))
        do {
            let bytes = try write(ranks, job: job, step: step, world: world, root: root, pacer: &pacer)
            DurableFiles.prune(root: root, job: job, ranks: ranks.map(\.key.rank), kept: configuration.flushKeptSteps)
            let seconds = Double(monotonicMilliseconds() - started) / 1000
            metrics.recordFlush(seconds: seconds)
            counters.increment(.stepsFlushed)
            counters.increment(.bytesFlushed, by: bytes)
            logger.info("step flushed to the durable tier", metadata: [
                "job": "\(job)", "step": "\(step)", "ranks": "\(ranks.map(\.key.rank))", "bytes": "\(bytes)", "seconds": "\(seconds)",
                "directory": "\(ExportLayout.stepDirectory(root: root, job: job, step: step))",
            ])
        } catch {
            counters.increment(.flushFailures)
            logger.error("flush to the durable tier failed; the next due step is tried", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
        }
    }

    /// Writes `ranks` and the step's manifest; returns the tensor bytes written.
    func write(_ ranks: [RankToWrite], job: JobID, step: Step, world: UInt32, root: String, pacer: inout BandwidthPacer?) throws -> UInt64 {
        let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
        var bytes: UInt64 = 0
        for rank in ranks {
            guard !state.withLock({ $0.stopping }) else { throw StoreError(.shuttingDown, "the daemon is stopping") }
            bytes += try DurableFiles.writeRank(stepDirectory: directory, key: rank.key, world: world, shard: rank.shard, bytes: rank.bytes.base!, pacer: &pacer)
        }
        try DurableFiles.writeStepManifest(stepDirectory: directory, job: job, step: step, world: world)
        return bytes
    }

    /// A restore that memory cannot serve, from the durable tier: the newest
    /// flushed copy of the rank (at `step` if given). Nil when there is none.
    func durableRestore(job: JobID, rank: Rank, step: Step?) throws -> DurableFiles.DurableShard? {
        guard let root = configuration.flushDirectory, let found = DurableFiles.newestRank(root: root, job: job, rank: rank, step: step) else { return nil }
        do {
            return try DurableFiles.readRank(root: root, job: job, step: found, rank: rank)
        } catch {
            counters.increment(.durableReadFailures)
            logger.error("a durable copy cannot be served", metadata: ["job": "\(job)", "step": "\(found)", "rank": "\(rank)", "error": "\(error)"])
            throw error
        }
    }

    /// Whether the cluster's view counts `rank` of `job`'s newest committed
    /// step lost beyond tolerance (a rebuild keeps retrying it, but it cannot succeed).
    func isLostBeyondTolerance(job: JobID, rank: Rank) -> Bool {
        cluster?.recoverPicture().jobs.first { $0.job == job }?.lostRanks.contains(rank) ?? false
    }

    /// Steps of `job` complete in the durable tier as this node sees it, oldest first.
    func flushedSteps(job: JobID) -> [Step] {
        guard let root = configuration.flushDirectory else { return [] }
        return DurableFiles.completeSteps(root: root, job: job).reversed()
    }

    // MARK: Export

    /// `snapshotctl export`: writes every rank of a committed step to
    /// `request.directory`, unpaced (an operator asked and waits); ranks
    /// other nodes hold are fetched from them, every tensor CRC-checked.
    func export(_ request: ExportRequest) throws -> ExportReply {
        guard request.directory.hasPrefix("/") else { throw StoreError(.invalidRequest, "export directory '\(request.directory)' must be an absolute path") }
        let (step, world, local) = try state.withLock { state throws -> (Step, UInt32, [RankToWrite]) in
            // Committed steps as this node knows them: its store, and in a cluster the ledger (a node may hold none of a job's ranks).
            var worlds: [Step: UInt32] = [:]
            if let record = state.store.jobs[request.job] { for step in record.committedSteps { worlds[step] = record.world } }
            for (id, entry) in state.cluster?.protection.ledger.steps ?? [:] where id.job == request.job && entry.committed { worlds[id.step] = entry.world }
            guard !worlds.isEmpty else { throw StoreError(.unknownStep, "no committed step of job \(request.job) is known here") }
            guard let step = request.step ?? worlds.keys.max(), let world = worlds[step] else {
                throw StoreError(.unknownStep, "step \(request.step!) of \(request.job) is not a committed step held (committed: \(worlds.keys.sorted()))")
            }
            let ranks = state.store.localShards(job: request.job, step: step).compactMap { rank, shard -> RankToWrite? in
                let key = ShardKey(job: request.job, step: step, rank: rank)
                guard shard.checksums != nil, let segment = state.segments[key] else { return nil }
                state.store.pin(key)
                return RankToWrite(key: key, shard: shard, bytes: segment)
            }
            return (step, world, ranks)
        }
        defer { for rank in local { unpin(rank.key) } }
        for rank in local {
            let bad = corruptedTensors(rank.shard, in: rank.bytes)
            guard bad.isEmpty else { throw StoreError(.checksumMismatch, "\(rank.key) has tensor(s) \(bad) that fail their sealed CRCs; not exported") }
        }
        let held = Set(local.map(\.key.rank))
        let remote = try cluster?.fetchShards(job: request.job, step: step, except: held) ?? []
        let ranks = (local + remote).sorted { $0.key.rank < $1.key.rank }
        guard ranks.count == Int(world) else {
            let missing = Set(0..<world).subtracting(ranks.map(\.key.rank)).sorted()
            throw StoreError(.unavailable, "step \(step) of \(request.job): ranks \(missing.prefix(16)) are not held by any node that answered")
        }
        var unpaced: BandwidthPacer? = nil
        let bytes = try write(ranks, job: request.job, step: step, world: world, root: request.directory, pacer: &unpaced)
        let directory = ExportLayout.stepDirectory(root: request.directory, job: request.job, step: step)
        logger.notice("step exported", metadata: ["job": "\(request.job)", "step": "\(step)", "ranks": "\(world)", "bytes": "\(bytes)", "directory": "\(directory)"])
        return ExportReply(job: request.job, step: step, directory: directory, ranks: world, bytes: bytes)
    }
}

extension ClusterNode {
    /// Every rank of a committed step but `except`, fetched whole from the
    /// nodes that hold them (as the cluster's reports say), CRC-checked.
    func fetchShards(job: JobID, step: Step, except: Set<Rank>) throws -> [SnapshotServer.RankToWrite] {
        let entry = try state.withLock { state throws -> ClusterLedger.StepEntry in
            guard let entry = state.cluster!.protection.ledger.entry(job: job, step: step), entry.committed else {
                throw StoreError(.unknownStep, "the cluster holds no committed step \(step) of \(job)")
            }
            return entry
        }
        return try reportedShards(entry).filter { !except.contains($0.key) }.sorted { $0.key < $1.key }.map { rank, reported in
            let segment = try fetchShard(job: job, step: step, rank: rank, reported: reported)
            return SnapshotServer.RankToWrite(key: ShardKey(job: job, step: step, rank: rank), shard: reported.manifest.shard, bytes: segment)
        }
    }
}
