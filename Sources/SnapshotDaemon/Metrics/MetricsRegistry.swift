import Foundation
import SnapshotProtocol
import Synchronization
import SnapshotCore

/// The daemon's latency histograms and the timers that feed them, owned by
/// ``SnapshotServer`` next to ``Counters``. Like the counters it is apart
/// from ``NodeState``: recording an observation never waits on the state lock.
/// Gauges are not kept here: a scrape reads them from the state as it is
/// (``NodeGauges``), so they can never drift from what the node holds.
///
/// The three save phases do not overlap, so together they are a save's whole
/// life on a node: staging (the trainer's bytes arriving), commit (the daemon
/// sealing them), protection (the cluster holding them).
final class MetricsRegistry: Sendable {
    /// A save's phases and its protection: from a small shard over shared
    /// memory (well under a millisecond) to tens of GiB over TCP (minutes).
    static let saveBoundsSeconds: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
    /// A flush writes a whole step to the durable tier at bounded bandwidth:
    /// seconds to an hour.
    static let flushBoundsSeconds: [Double] = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]

    /// beginSave received to commitSave received, per shard: the daemon
    /// allocating the segment and the trainer writing (shared memory) or
    /// streaming (TCP) every tensor. The commitSave is the boundary the
    /// daemon sees on both transports: over shared memory it never sees the
    /// last tensor arrive, the trainer writes straight into the arena.
    let saveStaging = Histogram(upperBoundsSeconds: saveBoundsSeconds)
    /// commitSave received to the shard sealed, per shard: CRCs computed (and
    /// checked against the client's), manifest written, shard local-complete.
    /// Not to the saveAccepted reply, which goes out as soon as sealing is
    /// queued and would time only a lock.
    let saveCommit = Histogram(upperBoundsSeconds: saveBoundsSeconds)
    /// Cluster mode, per step: this node's share of the step local-complete
    /// to the step committed (protected on every node of the cluster).
    let protection = Histogram(upperBoundsSeconds: saveBoundsSeconds)
    /// One flush of a step to the durable tier (``recordFlush(seconds:)``).
    let flush = Histogram(upperBoundsSeconds: flushBoundsSeconds)

    /// When each step's share became local-complete here, until it commits.
    private let protectionStarts = Mutex<[ProtectionMachine.StepID: ContinuousClock.Instant]>([:])

    func recordSaveStaging(seconds: Double) { saveStaging.observe(seconds: seconds) }
    func recordSaveCommit(seconds: Double) { saveCommit.observe(seconds: seconds) }
    /// For the durable tier: one flush took this long (and ended now).
    func recordFlush(seconds: Double) {
        flush.observe(seconds: seconds)
        lastFlushWallSeconds.withLock { $0 = Date().timeIntervalSince1970 }
    }

    /// When the last flush ended (Unix time): what an alert on a stuck durable tier watches.
    private let lastFlushWallSeconds = Mutex<Double?>(nil)

    /// This node's share of the step is local-complete: its protection is
    /// timed from now. Steps that never commit (dropped, superseded) are
    /// forgotten when a newer step of their job commits, and at most
    /// ``Limits/metricsProtectionTimers`` are kept (the oldest goes).
    func protectionStarted(job: JobID, step: Step) {
        let id = ProtectionMachine.StepID(job: job, step: step)
        protectionStarts.withLock { starts in
            guard starts[id] == nil else { return }  // reported again (after discovery): the first time counts
            if starts.count >= Limits.metricsProtectionTimers, let oldest = starts.min(by: { $0.value < $1.value }) {
                starts[oldest.key] = nil
            }
            starts[id] = .now
        }
    }

    /// The step committed: one protection observation if its start was timed
    /// here (a step committed without this node's share, or adopted by a
    /// rebuild, was never protected from here and is not observed).
    func protectionFinished(job: JobID, step: Step) {
        let start = protectionStarts.withLock { starts -> ContinuousClock.Instant? in
            let start = starts[.init(job: job, step: step)]
            // Older steps of the job can no longer commit (the store refuses a commit below the newest).
            starts = starts.filter { $0.key.job != job || $0.key.step > step }
            return start
        }
        if let start { protection.observe(since: start) }
    }

    /// Steps whose protection is being timed (for tests of the bound).
    var pendingProtectionTimers: Int { protectionStarts.withLock { $0.count } }

    // MARK: Exposition

    /// The training job's label: `training_job`, not `job`, which Prometheus
    /// attaches to every target itself (the scrape job); ours would be
    /// renamed `exported_job` on ingestion.
    static let jobLabel = "training_job"

    /// Every family a scrape returns, from the state's gauges, the counters
    /// and the histograms. Labels are only job, kind, state, node and version:
    /// never a step or tensor name, whose values grow without bound.
    func families(gauges: NodeGauges, counters: [(name: Counters.Name, value: UInt64)], version: String) -> [MetricFamily] {
        var families: [MetricFamily] = [
            .gauge("snapshotd_build_info", "Always 1; the daemon's version is in the label.", [MetricSample([MetricLabel("version", version)], .unsigned(1))]),
            .gauge("snapshotd_memory_budget_bytes", "The memory budget (memory_budget): shards and parity held never exceed it.", [MetricSample(.unsigned(gauges.budgetBytes))]),
            .gauge("snapshotd_held_bytes", "Arena bytes held, by job and kind (shard: trainers' snapshots; parity: fragments protecting other nodes' data).", gauges.jobs.flatMap { job in
                [
                    MetricSample([MetricLabel(Self.jobLabel, job.job.rawValue), MetricLabel("kind", "shard")], .unsigned(job.shardBytes)),
                    MetricSample([MetricLabel(Self.jobLabel, job.job.rawValue), MetricLabel("kind", "parity")], .unsigned(job.parityBytes)),
                ]
            }),
            .gauge("snapshotd_snapshots", "Steps held, by job and state (in_progress: not yet committed; committed: restorable, kept by retention).", gauges.jobs.flatMap { job in
                [
                    MetricSample([MetricLabel(Self.jobLabel, job.job.rawValue), MetricLabel("state", "in_progress")], .unsigned(UInt64(job.inProgressSteps))),
                    MetricSample([MetricLabel(Self.jobLabel, job.job.rawValue), MetricLabel("state", "committed")], .unsigned(UInt64(job.committedSteps))),
                ]
            }),
            .gauge("snapshotd_protection_lag_steps", "Newest step whose share is local-complete on this node minus the newest committed step (0 when none is waiting or none has committed yet).", gauges.jobs.map { job in
                MetricSample([MetricLabel(Self.jobLabel, job.job.rawValue)], .unsigned(job.protectionLagSteps))
            }),
        ]
        if let peers = gauges.peers {
            families.append(.gauge("snapshotd_peer_up", "Cluster mode: 1 while this node hears the peer's heartbeats, 0 once it declared it dead.", peers.map { peer in
                MetricSample([MetricLabel("node", "\(peer.node)")], .unsigned(peer.alive ? 1 : 0))
            }))
        }
        for (name, value) in counters {
            families.append(.counter("snapshotd_\(name.rawValue)_total", name.help, [MetricSample(.unsigned(value))]))
        }
        // Only once a flush happened: absent means "never", which an alert tells apart from "long ago".
        if let last = lastFlushWallSeconds.withLock({ $0 }) {
            families.append(.gauge("snapshotd_last_flush_timestamp_seconds", "Unix time the last flush to the durable tier ended.", [MetricSample(.double(last))]))
        }
        families += [
            .histogram("snapshotd_save_staging_duration_seconds", "Per shard: beginSave received to commitSave received (segment allocated, every tensor written or streamed).", [saveStaging.sample()]),
            .histogram("snapshotd_save_commit_duration_seconds", "Per shard: commitSave received to the shard sealed (CRCs computed and checked, manifest written).", [saveCommit.sample()]),
            .histogram("snapshotd_protection_duration_seconds", "Cluster mode, per step: this node's share local-complete to the step committed across the cluster.", [protection.sample()]),
            .histogram("snapshotd_flush_duration_seconds", "Per step: one flush to the durable tier.", [flush.sample()]),
        ]
        return families
    }
}
