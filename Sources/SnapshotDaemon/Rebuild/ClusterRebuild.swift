import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import Synchronization
import SnapshotCore

/// Rebuilding a lost node on its replacement (docs/architecture.md, "Rebuild"): for every
/// committed step it took part in, pull k surviving fragments per affected
/// stripe, decode its data fragments and the parity it held, check every CRC,
/// and adopt the result. Runs when the coordinator orders it.
extension ClusterNode {
    /// The coordinator ordered this node to rebuild.
    func beginRebuild() {
        let actions = withClusterState { cluster, state -> [RebuildMachine.Action] in
            guard !state.stopping else { return [] }
            return cluster.rebuild.ordered(discovered: cluster.discovered, rebuildable: cluster.rebuildableSteps(store: state.store))
        }
        executeRebuild(actions)
    }

    /// Carries out the rebuild machine's actions, on a control-pool thread:
    /// a run's steps one after another, each on its own (a step whose
    /// surviving bytes fail their checksums is recorded lost with the reason
    /// and the others are served; one that failed for a reason that may pass
    /// waits for the coordinator's next order).
    func executeRebuild(_ actions: [RebuildMachine.Action]) {
        guard !actions.isEmpty else { return }
        controlPool.submit { [self] in
            let started = monotonicMilliseconds()
            var tally = RebuildTally()
            var pending = actions[...]
            while let action = pending.popFirst() {
                pending += perform(action, started: started, tally: &tally)
            }
        }
    }

    private func perform(_ action: RebuildMachine.Action, started: Int64, tally: inout RebuildTally) -> [RebuildMachine.Action] {
        switch action {
        case .pullState:
            pullState(from: mesh.peers)  // fresh knowledge of committed steps
            return withClusterState { cluster, state in
                let steps = cluster.rebuildableSteps(store: state.store)
                logger.notice("rebuild started", metadata: ["steps": "\(steps.map { "\($0.job)/\($0.step)" })"])
                return cluster.rebuild.statePulled(rebuildable: steps)
            }
        case .rebuild(let id):
            let outcome: RebuildMachine.Outcome
            do {
                try rebuildStep(job: id.job, step: id.step, tally: &tally)
                outcome = .rebuilt
            } catch let error as StoreError where error.code == .checksumMismatch {
                logger.error("step cannot be rebuilt: its surviving bytes fail their checksums; this node serves its other steps", metadata: ["job": "\(id.job)", "step": "\(id.step)", "error": "\(error)"])
                outcome = .notRebuildable(reason: error.message)
            } catch {
                logger.error("rebuild of a step failed; it is retried on the coordinator's next order", metadata: ["job": "\(id.job)", "step": "\(id.step)", "error": "\(error)"])
                outcome = .failed(reason: "\(error)")
            }
            return withClusterState { cluster, state in
                if case .notRebuildable(let reason) = outcome { cluster.protection.stepLost(job: id.job, step: id.step, reason: reason) }
                return cluster.rebuild.stepFinished(id, outcome, rebuildable: cluster.rebuildableSteps(store: state.store))
            }
        case .finished(let summary):
            let seconds = Double(monotonicMilliseconds() - started) / 1000
            let lost = summary.notRebuildable.keys.sorted().map { "\($0.job)/\($0.step)" }
            // Said before the node stops counting itself as rebuilding: whoever
            // sees it healthy can read how the rebuild went.
            if summary.isComplete {
                logger.notice("rebuild complete: this node serves its ranks again", metadata: [
                    "steps": "\(summary.rebuilt.count)", "lostSteps": "\(lost)", "bytes": "\(tally.bytes)", "seconds": "\(seconds)",
                    "megabytesPerSecond": "\(seconds > 0 ? Double(tally.bytes) / seconds / 1e6 : 0)",
                    "pipelinedFragments": "\(tally.pipelinedFragments)", "gatheredFragments": "\(tally.gatheredFragments)",
                ])
            } else {
                logger.error("rebuild incomplete; the coordinator will order it again", metadata: [
                    "failedSteps": "\(summary.retryLater.keys.sorted().map { "\($0.job)/\($0.step)" })", "lostSteps": "\(lost)",
                ])
            }
            withClusterState { cluster, state in
                cluster.rebuild.reported()
                _ = cluster.refreshRebuildNeed(store: state.store)
            }
            state.broadcast()
            checkFreeExactRebuildStopped()
            return []
        }
    }

    /// The cluster's reports of a step and its fragment size.
    func stepEntry(job: JobID, step: Step) throws -> (ClusterLedger.StepEntry, UInt64) {
        try withClusterState { cluster, _ throws -> (ClusterLedger.StepEntry, UInt64) in
            let ledger = cluster.protection.ledger
            guard let entry = ledger.entry(job: job, step: step), let size = ledger.fragmentSizeBytes(job: job, step: step, group: group) else {
                throw StoreError(.unrecoverable, "the cluster state for \(job)/\(step) is incomplete")
            }
            return (entry, size)
        }
    }

    /// Rebuilds this node's shards and parity of one step.
    private func rebuildStep(job: JobID, step: Step, tally: inout RebuildTally) throws {
        let (entry, fragmentSize) = try stepEntry(job: job, step: step)
        let own = entry.ready[selfID]!
        let manifests = try own.manifests.map { try ManifestFile(decoding: $0) }.sorted { $0.key.rank < $1.key.rank }
        let paritySlots = try layout.parityStripes(node: position)
        guard let paritySegmentSize = SegmentLayout.fragmentSegmentBytes(fragmentSize) else {
            throw StoreError(.invalidRequest, "a fragment of \(fragmentSize) bytes is over the segment limit")
        }
        // The budget first, for everything the step will hold here; every
        // file made below is given back if the rebuild stops before adoption.
        var reservation = Reservation()
        let reservedBytes = manifests.reduce(0) { $0 + $1.shard.segmentSizeBytes } + UInt64(paritySlots.count) * paritySegmentSize
        let reserved = try state.withLock { try $0.store.reserve(bytes: reservedBytes, for: "the rebuild of \(job) step \(step)") }
        reservation.took { [self] in state.withLock { $0.store.cancelReservation(reserved) } }
        // Fresh segments for this node's shards (no one else writes these keys: the store holds none of this step).
        var segments: [MappedSegment] = []
        for manifest in manifests {
            let segment = try arena.createSegment(manifest.key, sizeBytes: manifest.shard.segmentSizeBytes)
            reservation.took { [arena] in arena.release(manifest.key, segment: segment, poolLimitBytes: 0) }
            segments.append(segment)
        }
        try Failpoints.hit("rebuild.afterShardSegments")
        let data = NodeStepData(segments: segments)
        guard UInt64(data.totalBytes) == own.dataSizeBytes else {
            throw StoreError(.unrecoverable, "manifests give \(data.totalBytes) bytes, the node reported \(own.dataSizeBytes)")
        }
        let size = Int(fragmentSize)
        let output = try MappedSegment.anonymous(sizeBytes: max(1, size))
        var workspace: StripeWorkspace? = nil  // k + m fragment buffers, only if a stripe must be gathered
        for fragment in 0..<layout.dataFragmentCount where fragment * size < data.totalBytes {
            let placement = try layout.placement(node: position, fragment: fragment)
            try rebuildFragment(job: job, step: step, stripe: placement.stripe, target: placement.slot, entry: entry, fragmentSizeBytes: fragmentSize, workspace: &workspace, tally: &tally, into: output.base!)
            data.scatter(from: output.base!, offset: fragment * size, count: size)
        }
        var parity: [Int: ParityRecord] = [:]
        var paritySegmentsBuilt: [Int: MappedSegment] = [:]
        for (stripe, row) in paritySlots {
            let key = ParityKey(job: job, step: step, stripe: stripe)
            let segmentSize = paritySegmentSize
            let segment = try arena.createParitySegment(key, sizeBytes: segmentSize)
            var parityTaken = Reservation()
            parityTaken.took { [arena] in arena.releaseParity(key, segment: segment, poolLimitBytes: 0) }
            do {
                try rebuildFragment(job: job, step: step, stripe: stripe, target: layout.dataFragmentCount + row, entry: entry, fragmentSizeBytes: fragmentSize, workspace: &workspace, tally: &tally, into: segment.base!)
            } catch let error as StoreError where error.code == .checksumMismatch {
                // The survivors' bytes for this stripe are bad: this node's data is
                // intact and served, but the step has one less parity here.
                logger.error("parity of a step cannot be rebuilt: the group tolerates one loss fewer for this step", metadata: ["job": "\(job)", "step": "\(step)", "stripe": "\(stripe)", "error": "\(error)"])
                continue  // parityTaken gives the segment back
            }
            parityTaken.installed()
            reservation.took { [arena] in arena.releaseParity(key, segment: segment, poolLimitBytes: 0) }
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: 0, count: size)))
            parity[stripe] = ParityRecord(row: row, fragmentSizeBytes: fragmentSize, segmentSizeBytes: segmentSize, crc32c: crc)
            paritySegmentsBuilt[stripe] = segment
        }
        // Every rebuilt tensor must match the CRC its trainer's daemon sealed.
        for (manifest, segment) in zip(manifests, segments) {
            let bad = corruptedTensors(manifest.shard, in: segment)
            guard bad.isEmpty else {
                counters.increment(.crcFailures)
                throw StoreError(.checksumMismatch, "rebuilt \(manifest.key) fails the CRC check for \(bad)")
            }
            try arena.writeManifest(manifest)  // given back with its segment
        }
        // The marker before the store changes: a node that restarts after
        // this holds the step whole; one that stops before it holds nothing.
        let rebuiltRanks = manifests.map(\.key.rank)
        try arena.writeCommitMarker(job: job, step: step, world: entry.world, ranks: rebuiltRanks, parity: parity)
        reservation.took { [arena] in arena.removeCommitMarker(job: job, step: step) }
        try Failpoints.hit("rebuild.beforeAdoption")
        let actions = withClusterState { cluster, state in
            // Parity this node folded from late fragments before the rebuild is replaced.
            for stripe in (state.store.jobs[job]?.parity[step] ?? [:]).keys.sorted() {
                storeEffects.apply(state.store.releaseParity(ParityKey(job: job, step: step, stripe: stripe)), to: &state)
            }
            for (manifest, segment) in zip(manifests, segments) { state.segments[manifest.key] = segment }
            for (stripe, segment) in paritySegmentsBuilt { state.paritySegments[ParityKey(job: job, step: step, stripe: stripe)] = segment }
            var shards: [Rank: ShardRecord] = [:]
            for manifest in manifests { shards[manifest.key.rank] = manifest.shard }
            state.store.adoptCommitted(job: job, step: step, world: entry.world, shards: shards, parity: parity, reservation: reserved)
            // Counted with the adoption, under the same lock: whoever sees the node no longer missing the step sees it counted.
            counters.increment(.rebuilds)
            counters.increment(.rebuiltBytes, by: UInt64(data.totalBytes) + parity.values.reduce(0) { $0 + $1.segmentSizeBytes })
            cluster.protection.stepRebuilt(job: job, step: step)
            return cluster.protection.paritySealed(job: job, step: step, store: state.store)
        }
        reservation.installed()
        execute(actions)
        logger.info("step rebuilt", metadata: ["job": "\(job)", "step": "\(step)", "ranks": "\(manifests.map(\.key.rank))", "dataBytes": "\(data.totalBytes)", "parityStripes": "\(parity.keys.sorted())"])
        tally.bytes += UInt64(data.totalBytes) + UInt64(parity.count) * fragmentSize
    }

    /// Rebuilds RS fragment `target` of `stripe` into `output`: through a
    /// chain of survivors (``pipelinedRepair``) unless the cluster file says
    /// `repair = "gather"`, and by gathering k fragments if the chain fails.
    func rebuildFragment(
        job: JobID, step: Step, stripe: Int, target: Int, entry: ClusterLedger.StepEntry, fragmentSizeBytes: UInt64,
        workspace: inout StripeWorkspace?, tally: inout RebuildTally, into output: UnsafeMutableRawPointer
    ) throws {
        let sources = try repairSources(stripe: stripe, target: target, entry: entry, fragmentSizeBytes: fragmentSizeBytes)
        let id = FragmentID(job: job, step: step, stripe: UInt16(stripe), index: UInt16(target))
        if cluster.repair == .pipelined {
            do {
                try pipelinedRepair(id, sources: sources, fragmentSizeBytes: fragmentSizeBytes, into: output)
                tally.pipelinedFragments += 1
                return
            } catch {
                logger.warning("pipelined repair failed; gathering k fragments instead", metadata: ["fragment": "\(id)", "error": "\(error)"])
            }
        }
        if workspace == nil { workspace = try StripeWorkspace(count: layout.groupSize, fragmentSizeBytes: Int(fragmentSizeBytes)) }
        try gather(id, sources: sources, fragmentSizeBytes: fragmentSizeBytes, workspace: workspace!, into: output)
        tally.gatheredFragments += 1
    }

    /// Where the other fragments of `stripe` are; peers that are dead,
    /// rebuilding or not yet heard from come last.
    private func repairSources(stripe: Int, target: Int, entry: ClusterLedger.StepEntry, fragmentSizeBytes: UInt64) throws -> RepairSources {
        let k = layout.dataFragmentCount
        let doubtful = withClusterState { cluster, _ in cluster.lostNodes.union(cluster.monitor.unheardNodes) }
        var zeroSlots: [Int] = []
        var remote: [(index: Int, node: NodeID)] = []
        for index in 0..<layout.groupSize where index != target {
            let holderPosition = index < k ? try layout.dataSource(stripe: stripe, slot: index) : try layout.parityHolder(stripe: stripe, row: index - k)
            let node = group.nodes[holderPosition]
            if index < k, case .data(_, let fragment) = try layout.role(node: holderPosition, stripe: stripe),
                UInt64(fragment) * fragmentSizeBytes >= entry.ready[node]?.dataSizeBytes ?? 0
            {
                zeroSlots.append(index)
            } else if node != selfID {
                remote.append((index, node))
            }
        }
        remote.sort { (doubtful.contains($0.node) ? 1 : 0, $0.index) < (doubtful.contains($1.node) ? 1 : 0, $1.index) }
        return RepairSources(zeroSlots: zeroSlots, remote: remote)
    }

    /// The classic rebuild: fetch k fragments to this node and decode.
    private func gather(
        _ id: FragmentID, sources: RepairSources, fragmentSizeBytes: UInt64,
        workspace: StripeWorkspace, into output: UnsafeMutableRawPointer
    ) throws {
        let k = layout.dataFragmentCount
        let size = Int(fragmentSizeBytes)
        let (job, step, stripe, target) = (id.job, id.step, Int(id.stripe), Int(id.index))
        var slots = [UnsafeMutableRawPointer?](repeating: nil, count: layout.groupSize)
        var collected = 0
        for index in sources.zeroSlots where collected < k {
            memset(workspace.buffers[index], 0, size)
            slots[index] = workspace.buffers[index]
            collected += 1
        }
        // Fetch the rest from different peers at once; replace failures from the remaining candidates.
        var candidates = sources.remote[...]
        var transientFailures = 0
        var corruptSources = 0
        while collected < k, !candidates.isEmpty {
            let batch = Array(candidates.prefix(k - collected))
            candidates = candidates.dropFirst(batch.count)
            let fetched = FetchResults(count: batch.count)
            DispatchQueue.concurrentPerform(iterations: batch.count) { position in
                let (index, node) = batch[position]
                do {
                    try fetch(FragmentID(job: job, step: step, stripe: UInt16(stripe), index: UInt16(index)), from: node, fragmentSizeBytes: fragmentSizeBytes, into: workspace.buffers[index])
                    fetched.succeeded(position)
                } catch {
                    fetched.failed(corrupt: (error as? PeerError)?.code == .checksumMismatch)
                    logger.warning("fragment unavailable; trying another", metadata: ["peer": "\(node)", "stripe": "\(stripe)", "index": "\(index)", "error": "\(error)"])
                }
            }
            transientFailures += fetched.failures.transient
            corruptSources += fetched.failures.corrupt
            for position in fetched.successes {
                slots[batch[position].index] = workspace.buffers[batch[position].index]
                collected += 1
            }
        }
        guard collected == k else {
            // Sources that refused because their bytes fail their sealed CRCs will not heal by waiting.
            if collected + transientFailures < k, corruptSources > 0 {
                throw StoreError(.checksumMismatch, "stripe \(stripe) of \(job)/\(step): only \(collected) of the \(k) fragments needed are intact; \(corruptSources) failed their CRCs")
            }
            throw StoreError(.unrecoverable, "stripe \(stripe) of \(job)/\(step): only \(collected) of the \(k) fragments needed could be read")
        }
        slots[target] = output
        try slots.withUnsafeBufferPointer { try code.reconstruct(fragments: $0, rebuilding: [target], fragmentSizeBytes: size) }
    }

    private func fetch(_ id: FragmentID, from node: NodeID, fragmentSizeBytes: UInt64, into buffer: UnsafeMutableRawPointer) throws {
        try mesh.withConnection(node, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds) { connection in
            try connection.send(.fragmentGet(FragmentGet(fragment: id)), requestID: 1)
            let reply = try PeerMesh.reply(connection)
            guard case .fragmentData(let data) = reply, data.fragment == id, data.fragmentSizeBytes == fragmentSizeBytes else {
                throw PeerError(code: nil, message: "unexpected reply \(reply.type) to a fragment request")
            }
            let size = Int(fragmentSizeBytes)
            try connection.stream.readExact(into: buffer, count: size, deadlineMilliseconds: connection.bulkDeadline(UInt64(size)))
            guard CRC32C.checksum(UnsafeRawBufferPointer(start: buffer, count: size)) == data.crc32c else {
                counters.increment(.crcFailures)
                throw PeerError(code: .checksumMismatch, message: "fragment \(id) from node \(node) failed its CRC check")
            }
        }
    }
}

/// What a rebuild did, for its closing log line.
struct RebuildTally {
    var bytes: UInt64 = 0
    var pipelinedFragments = 0
    var gatheredFragments = 0
}

/// The other fragments of a stripe being rebuilt: data slots that are all
/// padding (zeroes, nothing to fetch) and the peers holding the rest, those
/// believed alive first.
struct RepairSources {
    var zeroSlots: [Int]
    var remote: [(index: Int, node: NodeID)]
}

/// Buffers for gathering one stripe at a time, one per fragment index,
/// allocated once per step and only when a stripe is gathered.
final class StripeWorkspace: @unchecked Sendable {  // immutable buffers; each fetch writes its own
    let segments: [MappedSegment]
    let buffers: [UnsafeMutableRawPointer]

    init(count: Int, fragmentSizeBytes: Int) throws {
        segments = try (0..<count).map { _ in try MappedSegment.anonymous(sizeBytes: max(1, fragmentSizeBytes)) }
        buffers = segments.map { $0.base! }
    }
}

/// Which of a batch of concurrent fetches succeeded.
final class FetchResults: Sendable {
    private struct State {
        var succeeded: [Int] = []
        var transient = 0
        var corrupt = 0
    }

    private let state = Mutex(State())

    init(count: Int) { state.withLock { $0.succeeded.reserveCapacity(count) } }

    func succeeded(_ position: Int) { state.withLock { $0.succeeded.append(position) } }
    /// A source failed: `corrupt` when it refused because its bytes fail their CRCs.
    func failed(corrupt: Bool) { state.withLock { if corrupt { $0.corrupt += 1 } else { $0.transient += 1 } } }
    var successes: [Int] { state.withLock { $0.succeeded.sorted() } }
    var failures: (transient: Int, corrupt: Int) { state.withLock { ($0.transient, $0.corrupt) } }
}
