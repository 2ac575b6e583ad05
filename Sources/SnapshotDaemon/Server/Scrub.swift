import ErasureCoding
import Foundation
import Glibc
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// The background scrub (docs/architecture.md, "Restarts, quarantine and scrub"):
/// every `scrub_interval_ms`, every shard of a committed step and every
/// sealed parity fragment this node holds is read again and checked against
/// the CRCs it was sealed with, at most ``Limits/scrubBytesPerSecond``. Rot
/// found there is counted (`scrub_corruptions_found`) and, in a cluster,
/// healed in place from the peers: the bytes are decoded again from k
/// fragments of their stripes and written back only if they match the sealed
/// CRCs, so a heal can only restore what was sealed
/// (`scrub_corruptions_healed`). On a single node nothing can heal it; the
/// shard stays refused at restore, as it would be without the scrub.
extension SnapshotServer {
    /// What the scrub checks: held bytes and what they were sealed with.
    enum ScrubItem {
        case shard(ShardKey, ShardRecord, MappedSegment)
        case parity(ParityKey, ParityRecord, MappedSegment)
    }

    /// Starts the scrub's one long-lived thread (none when the interval is 0).
    func startScrub() {
        guard configuration.scrubIntervalMilliseconds > 0 else { return }
        Thread.detachNewThread { [self] in
            while sleepUnlessStopping(milliseconds: configuration.scrubIntervalMilliseconds) { scrubPass() }
        }
    }

    /// Sleeps for `milliseconds`; false as soon as the daemon is stopping.
    func sleepUnlessStopping(milliseconds: Int64) -> Bool {
        let deadline = Date().addingTimeInterval(Double(milliseconds) / 1000)
        let stopping = state.withLock(waitingUntil: deadline) { state -> Bool? in state.stopping ? true : nil }
        return stopping == nil
    }

    /// One pass over everything held now. Items freed meanwhile are skipped
    /// (their segment may already hold a newer save).
    func scrubPass() {
        let items = state.withLock { state in Self.scrubItems(state) }
        var pacer = ScrubPacer(bytesPerSecond: Limits.scrubBytesPerSecond)
        for item in items {
            guard !state.withLock({ $0.stopping }) else { return }
            switch item {
            case .shard(let key, let shard, let segment):
                guard let sealed = shard.checksums else { continue }
                let bad = zip(shard.specs, zip(shard.tensorOffsets, sealed)).filter { spec, placed in
                    pacer.checksum(segment.bytes(offset: Int(placed.0), count: Int(spec.byteLength))) != placed.1
                }.map(\.0.name)
                counters.increment(.scrubBytesChecked, by: shard.segmentSizeBytes)
                guard !bad.isEmpty, isStillHeld(item) else { continue }
                counters.increment(.scrubCorruptionsFound)
                counters.increment(.crcFailures)
                logger.error("scrub: a held shard fails its sealed CRCs", metadata: ["shard": "\(key)", "tensors": "\(bad.prefix(8))"])
                heal(item)
            case .parity(let key, let record, let segment):
                let crc = pacer.checksum(segment.bytes(offset: 0, count: Int(record.fragmentSizeBytes)))
                counters.increment(.scrubBytesChecked, by: record.fragmentSizeBytes)
                guard crc != record.crc32c, isStillHeld(item) else { continue }
                counters.increment(.scrubCorruptionsFound)
                counters.increment(.crcFailures)
                logger.error("scrub: a held parity fragment fails its sealed CRC", metadata: ["parity": "\(key)"])
                heal(item)
            }
        }
    }

    private func heal(_ item: ScrubItem) {
        guard let cluster else {
            if case .shard(let key, _, _) = item {
                logger.error("scrub: a single node cannot heal a shard; it is refused at restore", metadata: ["shard": "\(key)"])
            }
            return
        }
        let healed: Bool
        switch item {
        case .shard(let key, let shard, let segment): healed = cluster.healShard(key, shard: shard, segment: segment)
        case .parity(let key, let record, let segment): healed = cluster.healParity(key, record: record, segment: segment)
        }
        if healed { counters.increment(.scrubCorruptionsHealed) }
    }

    /// Committed shards and sealed parity (cluster mode), in step order.
    static func scrubItems(_ state: NodeState) -> [ScrubItem] {
        var items: [ScrubItem] = []
        for (job, record) in state.store.jobs.sorted(by: { $0.key < $1.key }) {
            for step in record.committedSteps.sorted() {
                for (rank, shard) in (record.steps[step] ?? [:]).sorted(by: { $0.key < $1.key }) {
                    let key = ShardKey(job: job, step: step, rank: rank)
                    if let segment = state.segments[key] { items.append(.shard(key, shard, segment)) }
                }
                for (stripe, parity) in (record.parity[step] ?? [:]).sorted(by: { $0.key < $1.key }) where parity.isComplete {
                    let key = ParityKey(job: job, step: step, stripe: stripe)
                    if let segment = state.paritySegments[key] { items.append(.parity(key, parity, segment)) }
                }
            }
        }
        return items
    }

    /// Whether `item` is still held, in the same segment, for the same step.
    func isStillHeld(_ item: ScrubItem) -> Bool {
        state.withLock { state in
            switch item {
            case .shard(let key, _, let segment):
                state.segments[key] === segment && state.store.isCommitted(job: key.job, step: key.step)
            case .parity(let key, _, let segment):
                state.paritySegments[key] === segment && state.store.parity(key)?.isComplete == true
            }
        }
    }
}

/// Reads at most `bytesPerSecond`, averaged over a pass, in pieces of
/// ``Limits/scrubChunkBytes``.
struct ScrubPacer {
    private var pacer: BandwidthPacer

    init(bytesPerSecond: Int) { pacer = BandwidthPacer(bytesPerSecond: bytesPerSecond) }

    mutating func checksum(_ buffer: UnsafeMutableRawBufferPointer) -> UInt32 {
        var crc: UInt32 = 0
        var offset = 0
        while offset < buffer.count {
            let count = min(Limits.scrubChunkBytes, buffer.count - offset)
            crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buffer[offset..<offset + count]), seed: crc)
            offset += count
            pacer.consumed(bytes: count)
        }
        return crc
    }
}
