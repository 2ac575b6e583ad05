import ErasureCoding
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// CRC-32C of each tensor of a shard, read from its mapped segment.
func tensorChecksums(_ shard: ShardRecord, in segment: MappedSegment) -> [UInt32] {
    zip(shard.specs, shard.tensorOffsets).map { spec, offset in
        CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: Int(offset), count: Int(spec.byteLength))))
    }
}

/// Names of the tensors whose bytes no longer match the sealed manifest.
func corruptedTensors(_ shard: ShardRecord, in segment: MappedSegment) -> [String] {
    guard let sealed = shard.checksums else { return shard.specs.map(\.name) }
    return zip(shard.specs, zip(tensorChecksums(shard, in: segment), sealed)).compactMap { spec, pair in
        pair.0 == pair.1 ? nil : spec.name
    }
}

/// Names of the tensors of a node's share (`shards` in rank order, laid end to
/// end as ``NodeStepData`` lays out their segments) that overlap bytes
/// `range` and no longer match the sealed manifest. A fragment is checked
/// this way before it is served for a rebuild: a survivor's silently
/// corrupted data would otherwise decode into wrong bytes on the replacement
/// (its own shards are checked there, but the parity it rebuilds is not).
func corruptedTensors(of shards: [(ShardRecord, MappedSegment)], overlapping range: Range<Int>) -> [String] {
    var corrupted: [String] = []
    var base = 0
    for (shard, segment) in shards {
        defer { base += segment.sizeBytes }
        guard base < range.upperBound, base + segment.sizeBytes > range.lowerBound else { continue }
        guard let sealed = shard.checksums else {
            corrupted += shard.specs.map(\.name)
            continue
        }
        for ((spec, offset), crc) in zip(zip(shard.specs, shard.tensorOffsets), sealed) where spec.byteLength > 0 {
            let start = base + Int(offset)
            guard start < range.upperBound, start + Int(spec.byteLength) > range.lowerBound else { continue }
            if CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: Int(offset), count: Int(spec.byteLength)))) != crc { corrupted.append(spec.name) }
        }
    }
    return corrupted
}
