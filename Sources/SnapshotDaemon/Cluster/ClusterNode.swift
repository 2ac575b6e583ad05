import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// This daemon's part in the cluster, as an executor of pure machines:
/// ``ClusterMonitor`` decides liveness and coordination, ``ProtectionMachine``
/// decides protection, commit and what needs a rebuild, ``RebuildMachine``
/// decides which missing step is rebuilt when and what became of each. This class holds no
/// mutable state of its own (the machines live in ``NodeState``, under the
/// server's one lock); it feeds them events from the network, the clock and
/// the store, and carries out the actions they return on bounded pools.
///
/// Its rooms, one file each: this one (wiring: start, stop, running the
/// machine's actions, what trainers may do here), ``Membership.swift``
/// (heartbeats, coordination), ``ClusterView.swift`` (learning and sharing the
/// cluster's reports), ``ProtectionSender.swift`` (streaming this node's share
/// to its parity holders), ``ParityHolder.swift`` (folding and sealing parity),
/// ``FragmentSource.swift`` (serving fragments for rebuilds),
/// and, in `Rebuild/`, ``ClusterRebuild.swift`` and ``RepairPipeline.swift``
/// (executing the rebuild machine: fetching, decoding, adopting a step).
final class ClusterNode: Sendable {
    let state: Locked<NodeState>
    let storeEffects: StoreEffects
    let cluster: ClusterConfiguration
    let selfID: NodeID
    let group: ClusterConfiguration.Group
    let position: Int
    let layout: StripeLayout
    let code: ReedSolomon
    let mesh: PeerMesh
    let incarnation = UInt64.random(in: 1...UInt64.max)
    let logger: Logger
    let counters: Counters
    let metrics: MetricsRegistry
    /// One owner per parity fragment: two data fragments of one new stripe
    /// arriving at once create its buffer once, and fold into it one at a
    /// time; other stripes go on in parallel. Creating the buffer (a file
    /// reserved and zeroed) and folding (ISA-L, then a CRC) run outside the
    /// state lock. Taken before the state lock, never while holding it.
    let parityOwners = KeyedExclusion<ParityKey>()
    /// Reports, state pulls and rebuild orders: small, latency-bound messages.
    let controlPool = WorkerPool(name: "snapshotd.control", threads: Limits.controlPoolThreads)
    /// Fragment streams to parity holders: one per step in flight, bounded.
    let dataPool = WorkerPool(name: "snapshotd.protect", threads: Limits.dataPoolThreads)

    static func initialState(selfID: NodeID, cluster: ClusterConfiguration, keptStepsPerJob: Int) throws -> ClusterState {
        ClusterState(
            monitor: ClusterMonitor(selfID: selfID, configuration: cluster, nowMilliseconds: monotonicMilliseconds()),
            protection: try ProtectionMachine(selfID: selfID, configuration: cluster, keptStepsPerJob: keptStepsPerJob))
    }

    init(state: Locked<NodeState>, storeEffects: StoreEffects, cluster: ClusterConfiguration, selfID: NodeID, secret: [UInt8], counters: Counters, metrics: MetricsRegistry, logger: Logger) throws {
        guard let group = cluster.group(of: selfID), let position = group.position(of: selfID) else {
            throw ConfigurationError("node \(selfID) is not in the cluster file")
        }
        self.state = state
        self.storeEffects = storeEffects
        self.cluster = cluster
        self.selfID = selfID
        self.group = group
        self.position = position
        layout = group.layout
        code = try ReedSolomon(dataFragmentCount: layout.dataFragmentCount, parityFragmentCount: layout.parityCount)
        mesh = PeerMesh(selfID: selfID, cluster: cluster, secret: secret, logger: logger)
        self.logger = logger
        self.counters = counters
        self.metrics = metrics
    }

    var heartbeatTimeoutMilliseconds: Int64 { max(Limits.minimumHeartbeatTimeoutMilliseconds, cluster.failureTimeoutMilliseconds / 2) }
    var arena: Arena { storeEffects.arena }
    var isStopping: Bool { state.withLock { $0.stopping } }

    // MARK: Lifecycle

    func start() {
        Thread.detachNewThread { [self] in  // the node's one long-lived control thread
            discover()
            heartbeatLoop()
        }
    }

    /// Call after the server's state says it is stopping.
    func stop() {
        mesh.closeAll()
        controlPool.stop()
        dataPool.stop()
    }

    // MARK: What trainers may do here (inside state.withLock)

    /// Why a trainer may not start saving `step` here, if it may not.
    func refusalOfSave(job: JobID, step: Step, state: NodeState) -> StoreError? {
        // While joining, saves are taken; their report waits for discovery (``shareSealed``).
        state.cluster?.protection.refusalOfSave(job: job, step: step)
    }

    /// The step a restore of `job` without a step number gets: the newest the
    /// cluster committed, so every rank of the job restores the same one.
    func latestCommitted(job: JobID, state: NodeState) throws(StoreError) -> Step? {
        guard let cluster = state.cluster else { return state.store.latestCommitted(job: job) }
        if !cluster.discovered { throw StoreError(.unavailable, "node \(selfID) is joining the cluster; retry shortly") }
        let local = state.store.latestCommitted(job: job)
        guard let newest = cluster.protection.newestCommitted(job: job), local.map({ newest > $0 }) ?? true else { return local }
        if cluster.protection.lostReason(job: job, step: newest) != nil { return newest }  // a restore then says why
        if cluster.protection.missingSteps(store: state.store).contains(.init(job: job, step: newest)) {
            throw StoreError(.unavailable, "node \(selfID) is being rebuilt from its peers (step \(newest) of \(job)); retry shortly")
        }
        return local
    }

    /// Refuses a restore of `step` that this node cannot serve, saying why.
    func checkRestorable(job: JobID, step: Step, state: NodeState) throws(StoreError) {
        guard let cluster = state.cluster else { return }
        if !cluster.discovered { throw StoreError(.unavailable, "node \(selfID) is joining the cluster; retry shortly") }
        if let reason = cluster.protection.lostReason(job: job, step: step) {
            let restorable = cluster.protection.recovery(lostNodes: []).first { $0.job == job }?.newestRestorable
            throw StoreError(.unrecoverable, "step \(step) of \(job) could not be rebuilt on node \(selfID) (\(reason)); "
                + (restorable.map { "newest fully restorable step is \($0)" } ?? "no step is fully restorable from memory"))
        }
        if cluster.protection.missingSteps(store: state.store).contains(.init(job: job, step: step)) {
            throw StoreError(.unavailable, "node \(selfID) is being rebuilt from its peers (step \(step) of \(job)); retry shortly")
        }
    }

    // MARK: Carrying out the protection machine's actions

    /// Runs `actions` (call without the lock): network work on the pools,
    /// store changes under the lock, whose own follow-up actions run next.
    func execute(_ actions: [ProtectionMachine.Action]) {
        var pending = actions[...]
        while let action = pending.popFirst() {
            switch action {
            case .broadcast(let message):
                controlPool.submit { [self] in send(message, to: mesh.peers) }
            case .send(let message, let peers):
                controlPool.submit { [self] in send(message, to: peers) }
            case .pullState(let peers):
                controlPool.submit { [self] in pullState(from: peers) }
            case .holdParity(let job, let step, let size):
                pending += holdParity(job: job, step: step, fragmentSizeBytes: size)
            case .sendFragments(let job, let step, let size):
                dataPool.submit { [self] in protect(job: job, step: step, fragmentSizeBytes: size) }
            case .commit(let job, let step, let world):
                withClusterState { cluster, state in commit(job: job, step: step, world: world, cluster: &cluster, state: &state) }
                state.broadcast()
            case .discardShare(let job, let step, let reason):
                logger.error("dropping this node's share of a step", metadata: ["job": "\(job)", "step": "\(step)", "reason": "\(reason)"])
                state.withLock { state in _ = storeEffects.apply(state.store.dropUncommittedStep(job: job, step: step), to: &state) }
                state.broadcast()
            case .log(let level, let message, let job, let step):
                let metadata: Logger.Metadata = ["job": "\(job)", "step": "\(step)"]
                switch level {
                case .info: logger.info("\(message)", metadata: metadata)
                case .warning: logger.warning("\(message)", metadata: metadata)
                case .error: logger.error("\(message)", metadata: metadata)
                }
            }
        }
    }

    /// A transaction on this node's state: its cluster part and the rest,
    /// under the state lock.
    func withClusterState<Result>(_ body: (inout ClusterState, inout NodeState) throws -> Result) rethrows -> Result {
        try state.withLock { try $0.withClusterPart(body) }
    }

    /// Runs `body` on the node's state and its cluster part, then the
    /// machine's actions it returns (outside the lock).
    func decide(_ body: (inout ClusterState, SnapshotStore) -> [ProtectionMachine.Action]) {
        execute(withClusterState { cluster, state in body(&cluster, state.store) })
    }

    /// The machine found the step held and committed cluster-wide.
    private func commit(job: JobID, step: Step, world: UInt32, cluster: inout ClusterState, state: inout NodeState) {
        storeEffects.apply(state.store.markCommitted(job: job, step: step, world: world), to: &state)
        metrics.protectionFinished(job: job, step: step)
        if let oldest = state.store.jobs[job]?.committedSteps.first { cluster.protection.forget(job: job, olderThan: oldest) }
        cluster.refreshRebuildNeed(store: state.store)
    }
}
