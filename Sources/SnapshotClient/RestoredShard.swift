import SnapshotIO
public import SnapshotProtocol
import Synchronization

/// A restored shard. Over shared memory the tensors are read-only views of the
/// daemon's arena: keep the shard alive while reading, then ``release()`` (or
/// drop it) so the daemon may reuse that memory.
public final class RestoredShard: Sendable {
    public let step: Step
    public let entries: [ManifestEntry]
    public let gradientNorm: Double?
    /// Set when the shard was rebuilt approximately from its pipeline
    /// neighbours (CheckFree): its optimizer state restores as zeros, and the
    /// trainer should raise the stage's learning rate by
    /// ``Reconstruction/learningRateFactor``.
    public let reconstruction: Reconstruction?
    public let metadata: [UInt8]
    /// Set when memory could not serve the restore and the daemon read the
    /// shard from the durable tier: the file it came from. Nil: from memory.
    public let durableSource: String?
    let offsets: [UInt64]
    let segment: MappedSegment?
    /// Stream restores: the client's own copy, tensors back to back.
    let owned: MappedSegment?
    weak let client: SnapshotClient?
    private let released = Atomic(false)

    /// Checks that a shared-memory restore's layout fits its segment.
    static func validate(_ ready: RestoreReady) throws {
        guard zip(ready.entries, ready.tensorOffsets).allSatisfy({ $1 + $0.spec.byteLength <= ready.segmentSizeBytes }) else {
            throw SnapshotClientError(code: nil, message: "restore layout exceeds its segment")
        }
    }

    init(client: SnapshotClient, ready: RestoreReady, segment: MappedSegment?, owned: MappedSegment?) {
        self.client = client
        step = ready.step
        entries = ready.entries
        gradientNorm = ready.gradientNorm
        reconstruction = ready.reconstruction
        metadata = ready.metadata
        durableSource = ready.durableSource
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
        return UnsafeRawBufferPointer((segment ?? owned)!.bytes(offset: Int(offsets[index]), count: count))
    }

    public func tensor(named name: String) -> UnsafeRawBufferPointer? {
        entries.firstIndex { $0.spec.name == name }.map(tensor(at:))
    }

    /// Tells the daemon this client no longer reads the shard.
    public func release() {
        guard !released.exchange(true, ordering: .relaxed) else { return }
        if segment != nil { client?.releaseRestore(step: step) }
    }

    deinit { release() }
}
