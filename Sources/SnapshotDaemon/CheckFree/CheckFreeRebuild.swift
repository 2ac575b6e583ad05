import CheckFree
import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// CheckFree on a cluster (docs/architecture.md, "CheckFree"):
/// when a group loses more nodes than it tolerates and with them every copy
/// of a pipeline stage, the stage is rebuilt approximately from its intact
/// neighbours. An operator asks for it (`snapshotctl recover --checkfree`);
/// the node asked plans from its view of the cluster and orders each node that
/// hosts lost ranks (the replacements) to rebuild its own share; they fetch
/// the neighbours' shards, average or copy, and serve the result flagged
/// approximate. It never runs where erasure coding can still recover exactly:
/// only ranks of groups beyond tolerance are planned, and a node rebuilds
/// only a step it does not hold once its exact rebuild has stopped.
extension ClusterNode {
    /// One rank's shard of a step as the cluster's reports describe it.
    struct ReportedShard {
        let node: NodeID
        let manifest: ManifestFile
    }

    /// The cluster's reports of a committed step, decoded (outside the state lock: at LLM scale they are large).
    func reportedShards(_ entry: ClusterLedger.StepEntry) throws -> [Rank: ReportedShard] {
        var shards: [Rank: ReportedShard] = [:]
        for (node, ready) in entry.ready {
            for bytes in ready.manifests {
                let manifest = try ManifestFile(decoding: bytes)
                shards[manifest.key.rank] = ReportedShard(node: node, manifest: manifest)
            }
        }
        return shards
    }

    /// The rebuild of `job` this node would order: at `step` if given, else at
    /// the newest committed step whose lost ranks CheckFree can rebuild. A
    /// refusal names the reason for the newest step with lost ranks.
    func checkFreePlan(job: JobID, step requested: Step? = nil) throws -> (CheckFreePlan, [Rank: ReportedShard]) {
        let candidates: [(Step, ClusterLedger.StepEntry, [Rank])] = withClusterState { cluster, state in
            let ledger = cluster.protection.ledger
            var lostNodes = cluster.lostNodes
            if !cluster.discovered || cluster.rebuild.isRunning || cluster.protection.missingSteps(store: state.store).contains(where: { $0.job == job }) {
                lostNodes.insert(selfID)
            }
            return ledger.steps.filter { $0.key.job == job && $0.value.committed && (requested == nil || $0.key.step == requested) }
                .sorted { $0.key.step > $1.key.step }
                .map { ($0.key.step, $0.value, cluster.protection.lostRanks(job: job, step: $0.key.step, lostNodes: lostNodes)) }
        }
        guard let newest = candidates.first else {
            throw StoreError(.unknownStep, requested.map { "step \($0) of \(job) is not a committed step this node knows" } ?? "\(job) has no committed step")
        }
        guard !newest.2.isEmpty else { throw StoreError(.invalidRequest, "\(CheckFreeRefusal.nothingLost) (newest committed step of \(job) is \(newest.0))") }
        var firstRefusal: CheckFreeRefusal? = nil
        for (step, entry, lost) in candidates where !lost.isEmpty {
            let reported = try reportedShards(entry)
            let shards = reported.sorted { $0.key < $1.key }.map { rank, shard in
                StageShard(rank: rank, node: shard.node, topology: shard.manifest.shard.topology, specs: shard.manifest.shard.specs, gradientNorm: shard.manifest.shard.gradientNorm)
            }
            do {
                return (try CheckFreePlanner.plan(step: step, shards: shards, lost: Set(lost)), reported)
            } catch {
                firstRefusal = firstRefusal ?? error
            }
        }
        throw StoreError(.unrecoverable, "CheckFree refuses step \(newest.0) of \(job): \(firstRefusal.map { "\($0)" } ?? "no plan")")
    }

    /// One line for the recovery report: what CheckFree could rebuild, or why not.
    func checkFreeSummary(job: JobID) -> String {
        do {
            let (plan, _) = try checkFreePlan(job: job)
            let stages = Dictionary(grouping: plan.ranks) { $0.target.stage }.sorted { $0.key < $1.key }.map { stage, ranks in
                let r = ranks[0].reconstruction
                let how = r.method == .averagedNeighbours
                    ? "average of stages \(r.sourceStages[0]) and \(r.sourceStages[1]) (weights \(String(format: "%.4f", r.weights[0])), \(String(format: "%.4f", r.weights[1])))"
                    : "copy of stage \(r.sourceStages[0])"
                return "stage \(stage) (ranks \(ranks.map { String($0.target.rank) }.joined(separator: ","))) as the \(how)"
            }
            return "CheckFree can rebuild step \(plan.step) approximately: " + stages.joined(separator: "; ") + "; run snapshotctl recover --checkfree --job \(job)"
        } catch let error as StoreError where error.code == .invalidRequest {
            return ""
        } catch {
            return "\(error)"
        }
    }

    // MARK: The node an operator asked

    /// Plans, then has every node hosting lost ranks compute its share and,
    /// once all have, install it: all or nothing, so a stage is never half
    /// approximate and half lost. Replies with what was rebuilt.
    func handleCheckFreeRequest(_ request: CheckFreeRequest) throws -> Message {
        let (plan, _) = try checkFreePlan(job: request.job)
        let targets = Set(plan.ranks.map(\.target.node)).sorted()
        let dead = withClusterState { cluster, _ in Set(cluster.monitor.deadNodes) }
        if let down = targets.first(where: dead.contains) {
            throw StoreError(.unavailable, "node \(down), which hosts ranks \(plan.ranks.filter { $0.target.node == down }.map(\.target.rank)) of the lost stages, is down: start its replacement (same id, empty arena) first")
        }
        logger.notice("CheckFree rebuild ordered", metadata: [
            "job": "\(request.job)", "step": "\(plan.step)", "ranks": "\(plan.ranks.map(\.target.rank))", "nodes": "\(targets)",
        ])
        // One token per rebuild: a node's late answer to an abandoned one is recognised and dropped.
        let token = UInt64.random(in: 1...UInt64.max)
        func order(_ phase: CheckFreeRequest.Phase, _ node: NodeID) throws -> CheckFreeReply {
            let order = CheckFreeRequest(job: request.job, phase: phase, step: plan.step, token: token)
            let reply: Message
            do {
                reply = node == selfID ? try handleCheckFreeOrder(order) : try mesh.request(node, .data, .checkFree(order), timeoutMilliseconds: heartbeatTimeoutMilliseconds)
            } catch let error as PeerError {
                throw StoreError(error.code ?? .unavailable, "node \(node): \(error.message)")
            }
            guard case .checkFreeReply(let done) = reply else { throw StoreError(.internalError, "node \(node) answered a CheckFree order with \(reply.type)") }
            return done
        }
        do {
            for node in targets { _ = try order(.prepare, node) }
        } catch {
            // Every target, also one that failed or did not answer in time: a
            // prepare still running drops its share when it finishes.
            for node in targets { _ = try? order(.abort, node) }
            logger.error("CheckFree rebuild abandoned: a node could not compute its share; none was installed", metadata: ["job": "\(request.job)", "step": "\(plan.step)", "error": "\(error)"])
            throw error
        }
        var rebuilt: [RankReconstruction] = []
        var installed: [NodeID] = []
        for (index, node) in targets.enumerated() {
            do {
                rebuilt += try order(.commit, node).ranks
                installed.append(node)
            } catch {
                for rest in targets[(index + 1)...] { _ = try? order(.abort, rest) }
                logger.critical("CheckFree rebuild installed only in part", metadata: ["job": "\(request.job)", "step": "\(plan.step)", "installed": "\(installed)", "error": "\(error)"])
                throw StoreError(.internalError, "\(error); nodes \(installed) installed their share of step \(plan.step), nodes \(Array(targets[index...])) did not (their ranks stay lost)")
            }
        }
        let stages = Set(rebuilt.map(\.stage)).sorted()
        let summary = "stage(s) \(stages) of \(request.job) rebuilt approximately at step \(plan.step) (ranks \(rebuilt.map(\.rank))): optimizer state starts fresh; raise those stages' learning rate ×\(Reconstruction.recommendedLearningRateFactor)"
        return .checkFreeReply(CheckFreeReply(job: request.job, step: plan.step, ranks: rebuilt.sorted { $0.rank < $1.rank }, summary: String(summary.prefix(ProtocolLimits.maximumMessageBytes / 4))))
    }

    // MARK: A node hosting lost ranks

    /// One phase of rebuilding this node's lost ranks of `order.step`. What
    /// happens is the node's ``CheckFreeMachine``'s to decide: the order's
    /// thread feeds it the order, carries out what it says (compute, install)
    /// and answers as it says.
    func handleCheckFreeOrder(_ order: CheckFreeRequest) throws -> Message {
        guard let step = order.step else { throw StoreError(.invalidRequest, "a CheckFree order names its step") }
        let id = ProtectionMachine.StepID(job: order.job, step: step)
        let token = order.token
        switch order.phase {
        case .request:
            throw StoreError(.invalidRequest, "an operator's CheckFree request is not an order")
        case .prepare:
            let claimed = try checkFreeEvent { machine, node in
                machine.claim(id, token: token, holdsStep: node.holds(id), exactRebuildRunning: node.exactRebuildRunning, nowMilliseconds: node.nowMilliseconds)
            }
            if case .refused(let refusal)? = claimed.reply { throw refusal.error(node: selfID, step: id) }
            try awaitCheckFreeClaim(CheckFreeClaim(id: id, token: token))
            let prepared: PreparedCheckFree
            do {
                prepared = try computeCheckFreeShare(job: order.job, step: step)
            } catch {
                _ = try? checkFreeEvent { $0.computeFailed(id, token: token, nowMilliseconds: $1.nowMilliseconds) }
                logger.error("CheckFree share could not be computed", metadata: ["job": "\(order.job)", "step": "\(step)", "error": "\(error)"])
                throw error
            }
            let kept: CheckFreeOutcome
            do {
                kept = try checkFreeEvent { $0.computeFinished(id, token: token, share: prepared, nowMilliseconds: $1.nowMilliseconds) }
            } catch {
                releaseCheckFreeShards(prepared.shards)  // no machine took it
                throw error
            }
            return try checkFreeAnswer(kept.reply, id: id, ranks: prepared.ranks)
        case .commit:
            let committed = try checkFreeEvent { $0.commit(id, token: token, nowMilliseconds: $1.nowMilliseconds) }
            guard let share = committed.install else { return try checkFreeAnswer(committed.reply, id: id, ranks: []) }
            let installed: CheckFreeOutcome
            do {
                installed = try install(share, id: id, token: token)
            } catch {
                _ = try? checkFreeEvent { $0.installFailed(id, token: token, nowMilliseconds: $1.nowMilliseconds) }
                logger.error("CheckFree share could not be installed", metadata: ["job": "\(order.job)", "step": "\(step)", "error": "\(error)"])
                throw error
            }
            return try checkFreeAnswer(installed.reply, id: id, ranks: share.ranks)
        case .abort:
            return try checkFreeAnswer(checkFreeEvent { $0.abort(id, token: token, nowMilliseconds: $1.nowMilliseconds) }.reply, id: id, ranks: [])
        }
    }

    /// This node's exact rebuild stopped (its executor reported the run):
    /// CheckFree claims that waited for it are answered now.
    func checkFreeExactRebuildStopped() {
        do {
            try checkFreeEvent { machine, node in
                // Another order may have started the exact rebuild again meanwhile: then the claims wait on.
                node.exactRebuildRunning ? [] : machine.exactRebuildStopped(nowMilliseconds: node.nowMilliseconds, holds: node.holds)
            }
        } catch {
            logger.error("CheckFree claims could not be answered", metadata: ["error": "\(error)"])
        }
    }

    /// The clock: claims past their deadline are refused, shares past their lifetime freed.
    func checkFreeTick() {
        _ = try? checkFreeEvent { $0.tick(nowMilliseconds: $1.nowMilliseconds, exactRebuildRunning: $1.exactRebuildRunning, holds: $1.holds) }
    }

    /// Feeds one event to this node's CheckFree machine under the state lock,
    /// with what the machine asks of the node (the time, whether the exact
    /// rebuild runs, whether it holds a step); files the answers to claims
    /// for the orders that wait on them; frees and logs outside the lock.
    /// Returns what is the caller's: the answer to its order, a share to
    /// install. `alongside` changes the state under the same lock first.
    @discardableResult
    private func checkFreeEvent(
        alongside: (inout ClusterState, inout NodeState) -> Void = { _, _ in },
        _ event: (inout CheckFreeMachine<PreparedCheckFree>, CheckFreeNodeView) -> [CheckFreeState.Action]
    ) throws -> CheckFreeOutcome {
        let actions = withClusterState { cluster, state -> [CheckFreeState.Action] in
            alongside(&cluster, &state)
            let node = CheckFreeNodeView(nowMilliseconds: monotonicMilliseconds(), exactRebuildRunning: cluster.rebuild.isRunning, store: state.store)
            return cluster.checkFree.handle(event, node)
        }
        var outcome = CheckFreeOutcome()
        for action in actions {
            switch action {
            case .answerClaim:
                outcome.answeredClaims = true
            case .reply(_, _, let reply):
                outcome.reply = reply
            case .installShare(_, _, let share):
                outcome.install = share
            case .freeShare(_, _, let share):
                releaseCheckFreeShards(share.shards)
            case .log(let level, let message, let id):
                let metadata: Logger.Metadata = ["job": "\(id.job)", "step": "\(id.step)"]
                switch level {
                case .info: logger.info("\(message)", metadata: metadata)
                case .warning: logger.warning("\(message)", metadata: metadata)
                case .error: logger.error("\(message)", metadata: metadata)
                }
            }
        }
        if outcome.answeredClaims { state.broadcast() }  // filed under the lock; the claims' orders wait on the condition
        return outcome
    }

    /// Waits for the machine's answer to a claim: there at once unless the
    /// exact rebuild runs, else filed when it stops or at the claim's
    /// deadline. The wait sleeps on the state's condition (no polling); at
    /// the deadline this thread ticks the machine itself, so the refusal
    /// comes on time whatever the clock does.
    private func awaitCheckFreeClaim(_ claim: CheckFreeClaim) throws {
        while true {
            let deadline = withClusterState { cluster, _ in cluster.checkFree.machine.deadlineMilliseconds(claim.id, token: claim.token) }
            let seconds = Double(max(0, (deadline ?? 0) - monotonicMilliseconds())) / 1000
            let answer = state.withLock(waitingUntil: Date(timeIntervalSinceNow: seconds)) { state in
                state.withClusterPart { cluster, _ in cluster.checkFree.claimAnswers.removeValue(forKey: claim) }
            }
            switch answer {
            case .granted?:
                return
            case .refused(let refusal)?:
                throw refusal.error(node: selfID, step: claim.id)
            case nil:
                // Neither waiting nor answered: an order repeating this one's token took the answer.
                guard deadline != nil else { throw CheckFreeState.Refusal.inProgress.error(node: selfID, step: claim.id) }
                checkFreeTick()  // the clock may not have ticked at the deadline yet
            }
        }
    }

    /// The order's answer as the machine gave it.
    private func checkFreeAnswer(_ reply: CheckFreeState.Reply?, id: ProtectionMachine.StepID, ranks: [RankReconstruction]) throws -> Message {
        let summary: String
        switch reply {
        case .prepared?: summary = "prepared"
        case .installed?: summary = "installed"
        case .aborted?: return .checkFreeReply(CheckFreeReply(job: id.job, step: id.step, ranks: [], summary: "aborted"))
        case .refused(let refusal)?: throw refusal.error(node: selfID, step: id)
        case nil: throw StoreError(.internalError, "node \(selfID)'s CheckFree machine gave no answer for step \(id.step) of \(id.job)")
        }
        return .checkFreeReply(CheckFreeReply(job: id.job, step: id.step, ranks: ranks, summary: summary))
    }

    /// This node's share of the step's rebuild, planned from its own view of the cluster.
    private func computeCheckFreeShare(job: JobID, step: Step) throws -> PreparedCheckFree {
        let (plan, reported) = try checkFreePlan(job: job, step: step)
        let mine = plan.ranks.filter { $0.target.node == selfID }
        guard !mine.isEmpty else {
            throw StoreError(.unavailable, "node \(selfID)'s view of step \(step) has none of the lost ranks here: the nodes' views disagree; try again when the cluster has settled")
        }
        return try prepare(mine, job: job, step: step, reported: reported)
    }

    /// Gives back the segments (and any manifest written) of a share that will not be installed.
    private func releaseCheckFreeShards(_ shards: [PreparedCheckFree.Shard]) {
        for shard in shards { arena.release(shard.manifest.key, segment: shard.segment, poolLimitBytes: 0) }
    }

    /// Fetches the sources and computes each rank's tensors into a fresh
    /// segment; nothing is served until ``install(_:id:token:)``.
    private func prepare(_ plans: [RankPlan], job: JobID, step: Step, reported: [Rank: ReportedShard]) throws -> PreparedCheckFree {
        let started = monotonicMilliseconds()
        // The neighbours' shards and the rebuilt ones all live in this node's memory for a while.
        let sourceRanks = Set(plans.flatMap(\.reconstruction.sourceRanks))
        let neededBytes = sourceRanks.reduce(UInt64(0)) { $0 + reported[$1]!.manifest.shard.segmentSizeBytes }
            + plans.reduce(UInt64(0)) { $0 + reported[$1.target.rank]!.manifest.shard.segmentSizeBytes }
        let freeBytes = state.withLock { $0.store.budgetBytes - min($0.store.budgetBytes, $0.store.heldBytes) }
        guard neededBytes <= freeBytes else {
            throw StoreError(.overBudget, "node \(selfID): CheckFree needs \(neededBytes) bytes for the neighbours' shards and the rebuilt ones, \(freeBytes) are free in the memory budget")
        }
        var sources: [Rank: MappedSegment] = [:]
        for rank in sourceRanks.sorted() {
            sources[rank] = try fetchShard(job: job, step: step, rank: rank, reported: reported[rank]!)
        }
        var prepared = PreparedCheckFree()
        do {
            for plan in plans {
                let lost = reported[plan.target.rank]!.manifest
                let segment = try arena.createSegment(lost.key, sizeBytes: lost.shard.segmentSizeBytes)
                prepared.shards.append(PreparedCheckFree.Shard(manifest: lost, segment: segment))
                var shard = lost.shard
                shard.checksums = try compute(plan, into: segment, layout: lost.shard, sources: sources, reported: reported)
                shard.gradientNorm = nil  // the rebuilt stage has no gradient of its own yet
                shard.metadata = reported[plan.metadataRank]!.manifest.shard.metadata
                shard.reconstruction = plan.reconstruction
                prepared.shards[prepared.shards.count - 1].manifest = ManifestFile(key: lost.key, world: lost.world, shard: shard)
                prepared.ranks.append(RankReconstruction(rank: plan.target.rank, stage: plan.target.stage, node: selfID, reconstruction: plan.reconstruction))
            }
        } catch {
            releaseCheckFreeShards(prepared.shards)
            throw error
        }
        prepared.computeMilliseconds = monotonicMilliseconds() - started
        return prepared
    }

    /// Adopts a computed share as this node's copy of the committed step:
    /// manifests and the commit marker first (a restart finds the share
    /// whole), then the store; the machine hears of it under the same lock,
    /// so the step is never seen neither claimed nor held.
    private func install(_ prepared: PreparedCheckFree, id: ProtectionMachine.StepID, token: UInt64) throws -> CheckFreeOutcome {
        let (job, step) = (id.job, id.step)
        guard let world = prepared.shards.first?.manifest.world else { throw StoreError(.internalError, "an empty CheckFree share") }
        for shard in prepared.shards { try arena.writeManifest(shard.manifest) }
        try arena.writeCommitMarker(job: job, step: step, world: world, ranks: prepared.shards.map(\.manifest.key.rank), parity: [:])
        let adopt = { (cluster: inout ClusterState, state: inout NodeState) in
            for shard in prepared.shards { state.segments[shard.manifest.key] = shard.segment }
            state.store.adoptCommitted(job: job, step: step, world: world, shards: Dictionary(uniqueKeysWithValues: prepared.shards.map { ($0.manifest.key.rank, $0.manifest.shard) }))
            cluster.protection.stepRebuilt(job: job, step: step)
            _ = cluster.refreshRebuildNeed(store: state.store)
        }
        let outcome = try checkFreeEvent(alongside: adopt) { $0.installFinished(id, token: token, nowMilliseconds: $1.nowMilliseconds) }
        state.broadcast()
        for rank in prepared.ranks {
            logger.warning("rank rebuilt approximately by CheckFree: restores of it say so", metadata: [
                "job": "\(job)", "step": "\(step)", "rank": "\(rank.rank)", "stage": "\(rank.stage)", "reconstruction": "\(rank.reconstruction)",
            ])
        }
        let bytes = prepared.shards.reduce(UInt64(0)) { $0 + $1.manifest.shard.specs.reduce(0) { $0 + $1.byteLength } }
        logger.notice("CheckFree rebuild complete", metadata: [
            "job": "\(job)", "step": "\(step)", "ranks": "\(prepared.ranks.map(\.rank))", "bytes": "\(bytes)",
            "computeSeconds": "\(Double(prepared.computeMilliseconds) / 1000)",
        ])
        return outcome
    }

    /// Writes every tensor of `plan` into `segment` (laid out as `layout`
    /// says) and returns their CRCs. Refuses a source tensor with NaN or infinity.
    private func compute(_ plan: RankPlan, into segment: MappedSegment, layout: ShardRecord, sources: [Rank: MappedSegment], reported: [Rank: ReportedShard]) throws -> [UInt32] {
        func pointer(_ reference: TensorReference) -> UnsafeRawPointer {
            let offset = reported[reference.rank]!.manifest.shard.tensorOffsets[reference.index]
            return UnsafeRawPointer(sources[reference.rank]!.base! + Int(offset))
        }
        func refuse(_ reference: TensorReference) -> StoreError {
            let source = reported[reference.rank]!.manifest
            let refusal = CheckFreeRefusal.nonFinite(tensor: source.shard.specs[reference.index].name, sourceRank: reference.rank, sourceStage: source.shard.topology.pipelineStage)
            return StoreError(.unrecoverable, "CheckFree refuses step \(plan.reconstruction.sourceStep): \(refusal)")
        }
        let weights = plan.reconstruction.weights
        var checksums: [UInt32] = []
        checksums.reserveCapacity(layout.specs.count)
        for ((spec, offset), source) in zip(zip(layout.specs, layout.tensorOffsets), plan.sources) {
            let output = segment.base! + Int(offset)
            let length = Int(spec.byteLength)
            let count = length / Int(spec.dtype.elementSizeBytes)
            switch source {
            case .zeros:
                memset(output, 0, length)
            case .copy(let reference):
                guard StageAveraging.copy(spec.dtype, source: pointer(reference), count: count, into: output) else { throw refuse(reference) }
            case .average(let previous, let next):
                guard StageAveraging.average(spec.dtype, previous: pointer(previous), next: pointer(next), count: count, weightPrevious: weights[0], weightNext: weights[1], into: output) else {
                    throw refuse(StageAveraging.allFinite(spec.dtype, pointer(previous), count: count) ? next : previous)
                }
            }
            checksums.append(CRC32C.checksum(UnsafeRawBufferPointer(start: output, count: length)))
        }
        return checksums
    }

    /// One rank's committed shard: this node's own segment (read in place),
    /// or fetched whole from the node that holds it; every tensor checked
    /// against its sealed CRC.
    func fetchShard(job: JobID, step: Step, rank: Rank, reported: ReportedShard) throws -> MappedSegment {
        let key = ShardKey(job: job, step: step, rank: rank)
        let size = Int(reported.manifest.shard.segmentSizeBytes)
        let local: MappedSegment? = state.withLock { state in
            state.store.isCommitted(job: job, step: step) && state.store.jobs[job]?.steps[step]?[rank] != nil ? state.segments[key] : nil
        }
        let buffer: MappedSegment
        if let local, local.sizeBytes == size {
            buffer = local
        } else {
            buffer = try MappedSegment.anonymous(sizeBytes: max(1, size))
            try mesh.withConnection(reported.node, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds) { connection in
                try connection.send(.shardGet(ShardGet(job: job, step: step, rank: rank)), requestID: 1)
                let reply = try PeerMesh.reply(connection)
                guard case .shardData(let data) = reply, data.job == job, data.step == step, data.rank == rank, data.segmentSizeBytes == UInt64(size) else {
                    throw PeerError(code: nil, message: "unexpected reply \(reply.type) to a shard request")
                }
                try connection.stream.readExact(into: buffer.base!, count: size, deadlineMilliseconds: connection.bulkDeadline(UInt64(size)))
            }
        }
        let bad = corruptedTensors(reported.manifest.shard, in: buffer)
        guard bad.isEmpty else {
            counters.increment(.crcFailures)
            throw StoreError(.checksumMismatch, "rank \(rank)'s shard of \(job)/\(step) from node \(reported.node) fails the CRC check for \(bad)")
        }
        return buffer
    }

    // MARK: Serving

    /// Sends one rank's committed, exact shard whole, once its tensors pass their sealed CRCs.
    func serveShard(_ request: ShardGet, requestID: UInt64, connection: FramedConnection) throws {
        let key = ShardKey(job: request.job, step: request.step, rank: request.rank)
        let held: (ShardRecord, MappedSegment)? = state.withLock { state in
            guard state.store.isCommitted(job: key.job, step: key.step), let shard = state.store.jobs[key.job]?.steps[key.step]?[key.rank], let segment = state.segments[key] else { return nil }
            return (shard, segment)
        }
        guard let (shard, segment) = held else { throw StoreError(.unavailable, "node \(selfID) does not hold a committed shard for \(key)") }
        guard shard.reconstruction == nil else { throw StoreError(.unavailable, "node \(selfID)'s shard for \(key) is itself approximate (CheckFree); it is no source for another rebuild") }
        let bad = corruptedTensors(shard, in: segment)
        guard bad.isEmpty else {
            counters.increment(.crcFailures)
            logger.error("refusing to serve a shard: tensors fail their sealed CRCs", metadata: ["shard": "\(key)", "tensors": "\(bad)"])
            throw StoreError(.checksumMismatch, "node \(selfID): \(key) has tensor(s) \(bad) that fail their sealed CRCs")
        }
        let size = Int(shard.segmentSizeBytes)
        try connection.send(.shardData(ShardData(job: key.job, step: key.step, rank: key.rank, segmentSizeBytes: UInt64(size))), requestID: requestID, bulkLength: UInt64(size))
        try connection.stream.writeAll(segment.base!, count: size, deadlineMilliseconds: connection.bulkDeadline(UInt64(size)))
    }
}

/// This node's part in CheckFree rebuilds (``ClusterState/checkFree``): the
/// machine that decides, and its answers to claims until the orders that
/// wait for them collect them (a claim that waited for the exact rebuild is
/// answered on another thread).
struct CheckFreeState: Sendable {
    typealias Action = CheckFreeMachine<PreparedCheckFree>.Action
    typealias Reply = CheckFreeMachine<PreparedCheckFree>.Reply
    typealias Refusal = CheckFreeMachine<PreparedCheckFree>.Refusal

    var machine = CheckFreeMachine<PreparedCheckFree>()
    var claimAnswers: [CheckFreeClaim: CheckFreeMachine<PreparedCheckFree>.ClaimAnswer] = [:]

    /// Runs one event and files its answers to claims.
    mutating func handle(_ event: (inout CheckFreeMachine<PreparedCheckFree>, CheckFreeNodeView) -> [Action], _ node: CheckFreeNodeView) -> [Action] {
        let actions = event(&machine, node)
        for case .answerClaim(let id, let token, let answer) in actions { claimAnswers[CheckFreeClaim(id: id, token: token)] = answer }
        return actions
    }
}

/// One planner's claim of a step: the rebuild's token and the step.
struct CheckFreeClaim: Hashable, Sendable {
    let id: ProtectionMachine.StepID
    let token: UInt64
}

/// What the CheckFree machine asks of the node with an event, read under the state lock.
struct CheckFreeNodeView {
    let nowMilliseconds: Int64
    let exactRebuildRunning: Bool
    let store: SnapshotStore

    /// The node holds a committed share of the step: nothing for CheckFree to rebuild here.
    func holds(_ id: ProtectionMachine.StepID) -> Bool {
        store.isCommitted(job: id.job, step: id.step) && !store.localShards(job: id.job, step: id.step).isEmpty
    }
}

/// What an event left to the thread that fed it.
struct CheckFreeOutcome {
    var reply: CheckFreeState.Reply?
    var install: PreparedCheckFree?
    var answeredClaims = false
}

/// A node's CheckFree share, computed and waiting for the commit.
struct PreparedCheckFree: Sendable {
    struct Shard: Sendable {
        var manifest: ManifestFile
        let segment: MappedSegment
    }

    var shards: [Shard] = []
    var ranks: [RankReconstruction] = []
    var computeMilliseconds: Int64 = 0
}
