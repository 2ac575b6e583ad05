import ErasureCoding
import SnapshotIO
import SnapshotProtocol

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
