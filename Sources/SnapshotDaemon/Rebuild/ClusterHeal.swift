import ErasureCoding
import Foundation
import Glibc
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Healing rot in place (found by the scrub, `Server/Scrub.swift`): the bad
/// bytes are decoded again from k fragments of their stripes held by peers,
/// as a rebuild would, and written back only if they match the CRCs they
/// were sealed with. The step stays committed and served throughout; a heal
/// that cannot prove its bytes changes nothing.
extension ClusterNode {
    /// A sealed parity fragment that fails its CRC.
    func healParity(_ key: ParityKey, record: ParityRecord, segment: MappedSegment) -> Bool {
        guard let sealed = record.crc32c else { return false }
        do {
            let decoded = try decodeParity(key, record: record)
            let size = Int(record.fragmentSizeBytes)
            guard CRC32C.checksum(UnsafeRawBufferPointer(decoded.bytes(offset: 0, count: size))) == sealed else {
                counters.increment(.crcFailures)
                logger.error("scrub: parity decoded from the peers does not match its sealed CRC; left as it is", metadata: ["parity": "\(key)"])
                return false
            }
            memcpy(segment.base!, decoded.base!, size)
            logger.notice("scrub: parity healed from the peers", metadata: ["parity": "\(key)", "bytes": "\(size)"])
            return true
        } catch {
            logger.error("scrub: cannot heal parity from the peers", metadata: ["parity": "\(key)", "error": "\(error)"])
            return false
        }
    }

    /// Whether a held parity fragment equals parity decoded again from the
    /// other fragments of its stripe (`snapshotctl verify`).
    func parityMatchesReencoding(_ key: ParityKey, record: ParityRecord, segment: MappedSegment) throws -> Bool {
        let decoded = try decodeParity(key, record: record)
        return memcmp(decoded.base!, segment.base!, Int(record.fragmentSizeBytes)) == 0
    }

    /// The parity fragment `key` decoded from k fragments of its stripe held by peers.
    private func decodeParity(_ key: ParityKey, record: ParityRecord) throws -> MappedSegment {
        let (entry, fragmentSize) = try stepEntry(job: key.job, step: key.step)
        guard fragmentSize == record.fragmentSizeBytes else {
            throw StoreError(.internalError, "\(key): the cluster's fragment size \(fragmentSize) is not the held one \(record.fragmentSizeBytes)")
        }
        let scratch = try MappedSegment.anonymous(sizeBytes: max(1, Int(fragmentSize)))
        var workspace: StripeWorkspace?
        var tally = RebuildTally()
        try rebuildFragment(
            job: key.job, step: key.step, stripe: key.stripe, target: layout.dataFragmentCount + record.row, entry: entry,
            fragmentSizeBytes: fragmentSize, workspace: &workspace, tally: &tally, into: scratch.base!)
        return scratch
    }

    /// A committed shard with tensors that fail their CRCs: the fragments of
    /// this node's share that cover them are decoded again, and each bad
    /// tensor whose decoded bytes match its sealed CRC is written back.
    func healShard(_ key: ShardKey, shard: ShardRecord, segment: MappedSegment) -> Bool {
        do {
            let (entry, fragmentSize) = try stepEntry(job: key.job, step: key.step)
            // The share as NodeStepData lays it out: this node's shards in rank order.
            let share = state.withLock { state in
                state.store.localShards(job: key.job, step: key.step).compactMap { rank, _ in
                    state.segments[ShardKey(job: key.job, step: key.step, rank: rank)].map { (rank, $0) }
                }
            }
            guard let index = share.firstIndex(where: { $0.0 == key.rank && $0.1 === segment }), let sealed = shard.checksums else { return false }
            let base = share[..<index].reduce(0) { $0 + $1.1.sizeBytes }
            let bad = shard.specs.indices.filter { tensor in
                CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: Int(shard.tensorOffsets[tensor]), count: Int(shard.specs[tensor].byteLength)))) != sealed[tensor]
            }
            guard !bad.isEmpty else { return true }
            // Scratch copies of the share's segments (anonymous memory: only the pages written are allocated).
            let scratch = NodeStepData(segments: try share.map { try MappedSegment.anonymous(sizeBytes: max(1, $0.1.sizeBytes)) })
            let size = Int(fragmentSize)
            let output = try MappedSegment.anonymous(sizeBytes: max(1, size))
            var workspace: StripeWorkspace?
            var tally = RebuildTally()
            for fragment in 0..<layout.dataFragmentCount where fragment * size < scratch.totalBytes {
                let covered = fragment * size..<(fragment + 1) * size
                let needed = bad.contains { tensor in
                    let start = base + Int(shard.tensorOffsets[tensor])
                    return start < covered.upperBound && start + Int(shard.specs[tensor].byteLength) > covered.lowerBound
                }
                guard needed else { continue }
                let placement = try layout.placement(node: position, fragment: fragment)
                try rebuildFragment(
                    job: key.job, step: key.step, stripe: placement.stripe, target: placement.slot, entry: entry,
                    fragmentSizeBytes: fragmentSize, workspace: &workspace, tally: &tally, into: output.base!)
                scratch.scatter(from: output.base!, offset: fragment * size, count: size)
            }
            let decoded = scratch.segments[index]
            var healed: [String] = []
            for tensor in bad {
                let offset = Int(shard.tensorOffsets[tensor])
                let count = Int(shard.specs[tensor].byteLength)
                guard CRC32C.checksum(UnsafeRawBufferPointer(decoded.bytes(offset: offset, count: count))) == sealed[tensor] else {
                    counters.increment(.crcFailures)
                    logger.error("scrub: a tensor decoded from the peers does not match its sealed CRC; left as it is", metadata: ["shard": "\(key)", "tensor": "\(shard.specs[tensor].name)"])
                    continue
                }
                memcpy(segment.base! + offset, decoded.base! + offset, count)
                healed.append(shard.specs[tensor].name)
            }
            logger.notice("scrub: shard healed from the peers", metadata: ["shard": "\(key)", "tensors": "\(healed.prefix(8))", "of": "\(bad.count)"])
            return healed.count == bad.count
        } catch {
            logger.error("scrub: cannot heal a shard from the peers", metadata: ["shard": "\(key)", "error": "\(error)"])
            return false
        }
    }
}
