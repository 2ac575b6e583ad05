import SnapshotProtocol
import SnapshotCore

/// What a scrape reads from the node's state: taken in one pass under the
/// state lock (bookkeeping only, no I/O), rendered after it is released.
struct NodeGauges: Sendable, Equatable {
    struct Job: Sendable, Equatable {
        let job: JobID
        /// Segment bytes of the trainers' shards held (any state).
        var shardBytes: UInt64 = 0
        /// Segment bytes of parity fragments held for other nodes' data.
        var parityBytes: UInt64 = 0
        /// Steps with shards here that are not committed (receiving, sealing, local-complete, corrupted).
        var inProgressSteps = 0
        var committedSteps = 0
        var protectionLagSteps: UInt64 = 0
    }

    struct Peer: Sendable, Equatable {
        let node: NodeID
        let alive: Bool
    }

    let budgetBytes: UInt64
    /// By job name.
    let jobs: [Job]
    /// Cluster mode: every other node of the cluster file; nil on a single node.
    let peers: [Peer]?

    init(budgetBytes: UInt64, jobs: [Job], peers: [Peer]?) {
        self.budgetBytes = budgetBytes
        self.jobs = jobs
        self.peers = peers
    }

    init(state: NodeState) {
        let store = state.store
        budgetBytes = store.budgetBytes
        jobs = store.jobs.sorted { $0.key < $1.key }.map { name, record in Self.job(name, record) }
        peers = state.cluster.map { cluster in
            cluster.monitor.states.keys.sorted().filter { $0 != cluster.monitor.selfID }.map { Peer(node: $0, alive: cluster.monitor.states[$0] == .alive) }
        }
    }

    static func job(_ name: JobID, _ record: SnapshotStore.JobRecord) -> Job {
        var job = Job(job: name)
        var newestLocallyComplete: Step?
        for (step, shards) in record.steps {
            job.shardBytes += shards.values.reduce(0) { $0 + $1.segmentSizeBytes }
            if !record.committedSteps.contains(step) { job.inProgressSteps += 1 }
            // The node's whole share: every local rank's shard sealed.
            let complete = !shards.isEmpty && shards.count == Int(record.localWorld)
                && shards.values.allSatisfy { $0.state == .localComplete || $0.state == .protected }
            if complete { newestLocallyComplete = max(newestLocallyComplete ?? step, step) }
        }
        job.parityBytes = record.parity.values.reduce(0) { total, stripes in stripes.values.reduce(total) { $0 + $1.segmentSizeBytes } }
        job.committedSteps = record.committedSteps.count
        if let newest = newestLocallyComplete, let committed = record.latestCommitted, newest > committed {
            job.protectionLagSteps = newest - committed
        }
        return job
    }
}
