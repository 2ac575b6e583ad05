import Logging
import SnapshotProtocol
import SnapshotCore

/// Carries out what the store decided, on the arena: commit markers written or
/// removed, freed shard and parity segments returned to the pool. Called inside
/// `state.withLock`, so the files and the bookkeeping change together.
struct StoreEffects: Sendable {
    let arena: Arena
    let logger: Logger

    /// Applies `effects` to `state`; returns the steps whose local share just
    /// became complete (cluster mode: the caller starts their protection).
    @discardableResult
    func apply(_ effects: SnapshotStore.Effects, to state: inout NodeState) -> [(job: JobID, step: Step)] {
        for (job, step, world) in effects.committed {
            do {
                let record = state.store.jobs[job]
                try arena.writeCommitMarker(
                    job: job, step: step, world: world, ranks: Array((record?.steps[step] ?? [:]).keys),
                    parity: record?.parity[step] ?? [:])
            } catch {
                logger.error("cannot write commit marker; step will not survive a daemon restart", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
            }
            logger.info("step committed", metadata: ["job": "\(job)", "step": "\(step)", "ranks": "\(world)"])
        }
        for (job, step) in effects.uncommitted { arena.removeCommitMarker(job: job, step: step) }
        let poolLimit = state.store.budgetBytes > state.store.heldBytes ? state.store.budgetBytes - state.store.heldBytes : 0
        for key in effects.freed {
            guard let segment = state.segments.removeValue(forKey: key) else { continue }
            arena.release(key, segment: segment, poolLimitBytes: poolLimit)
            logger.debug("shard freed", metadata: ["shard": "\(key)"])
        }
        for key in effects.freedParity {
            guard let segment = state.paritySegments.removeValue(forKey: key) else { continue }
            arena.releaseParity(key, segment: segment, poolLimitBytes: poolLimit)
        }
        return effects.localComplete
    }
}
