import ErasureCoding
public import SnapshotIO
public import SnapshotProtocol

/// A restored shard. Over shared memory the tensors are read-only views of the
/// daemon's arena: keep the shard alive while reading, then ``release()`` (or
/// drop it) so the daemon may reuse that memory.
public final class RestoredShard: @unchecked Sendable {
    public let step: Step
    public let entries: [ManifestEntry]
    public let gradientNorm: Double?
    public let metadata: [UInt8]
    let offsets: [UInt64]
    let segment: MappedSegment?
    let owned: UnsafeMutableRawBufferPointer?
    weak var client: SnapshotClient?
    var released = false

    /// Checks a restore's layout (and, for streamed bytes, every CRC) before a
    /// shard takes ownership of anything.
    static func validate(_ ready: RestoreReady, owned: UnsafeMutableRawBufferPointer?) throws {
        if let owned {
            var cursor = 0
            for entry in ready.entries {
                let count = Int(entry.spec.byteLength)
                guard CRC32C.checksum(UnsafeRawBufferPointer(rebasing: owned[cursor..<(cursor + count)])) == entry.crc32c else {
                    throw SnapshotClientError(code: .checksumMismatch, message: "tensor '\(entry.spec.name)' arrived corrupted (CRC mismatch)")
                }
                cursor += count
            }
        } else {
            guard zip(ready.entries, ready.tensorOffsets).allSatisfy({ $1 + $0.spec.byteLength <= ready.segmentSizeBytes }) else {
                throw SnapshotClientError(code: nil, message: "restore layout exceeds its segment")
            }
        }
    }

    init(client: SnapshotClient, ready: RestoreReady, segment: MappedSegment?, owned: UnsafeMutableRawBufferPointer?) {
        self.client = client
        step = ready.step
        entries = ready.entries
        gradientNorm = ready.gradientNorm
        metadata = ready.metadata
        self.segment = segment
        self.owned = owned
        if owned != nil {
            // Stream layout: tensors back to back in manifest order.
            var cursor: UInt64 = 0
            offsets = ready.entries.map { entry in
                defer { cursor += entry.spec.byteLength }
                return cursor
            }
        } else {
            offsets = ready.tensorOffsets
        }
    }

    public var names: [String] { entries.map(\.spec.name) }

    public func tensor(at index: Int) -> UnsafeRawBufferPointer {
        let count = Int(entries[index].spec.byteLength)
        if let segment { return UnsafeRawBufferPointer(segment.bytes(offset: Int(offsets[index]), count: count)) }
        return UnsafeRawBufferPointer(rebasing: owned![Int(offsets[index])..<(Int(offsets[index]) + count)])
    }

    public func tensor(named name: String) -> UnsafeRawBufferPointer? {
        entries.firstIndex { $0.spec.name == name }.map(tensor(at:))
    }

    /// Tells the daemon this client no longer reads the shard.
    public func release() {
        guard !released else { return }
        released = true
        if segment != nil { client?.releaseRestore(step: step) }
    }

    deinit {
        release()
        owned?.deallocate()
    }
}
