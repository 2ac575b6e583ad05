import ErasureCoding
import Glibc
import SnapshotIO
public import SnapshotProtocol
import Synchronization

/// A save in progress: write every tensor, then commit.
public final class PendingSave: Sendable {
    public let step: Step
    public let specs: [TensorSpec]
    let client: SnapshotClient
    let offsets: [UInt64]
    let segment: MappedSegment?
    /// Whether the commit went through, and over TCP each tensor's CRC-32C,
    /// computed chunk by chunk while it was sent (cache-hot, no second pass);
    /// the commit carries them so the daemon verifies the bytes that arrived.
    private let progress: Mutex<(committed: Bool, streamedChecksums: [UInt32?])>
    /// Chunk size for TCP puts: large enough to amortize the frame header,
    /// small enough that a refused put costs little.
    static let streamChunkBytes = 16 << 20

    init(client: SnapshotClient, step: Step, specs: [TensorSpec], offsets: [UInt64], segment: MappedSegment?) {
        self.client = client
        self.step = step
        self.specs = specs
        self.offsets = offsets
        self.segment = segment
        progress = Mutex((false, Array(repeating: nil, count: specs.count)))
    }

    /// True over shared memory: tensors are written straight into the
    /// daemon's arena (``destination(tensorIndex:)``); false over TCP.
    public var writesInPlace: Bool { segment != nil }

    /// Over shared memory: where tensor `tensorIndex` lives in the daemon's
    /// arena, to write into directly. nil over TCP.
    public func destination(tensorIndex: Int) -> UnsafeMutableRawBufferPointer? {
        guard let segment else { return nil }
        return segment.bytes(offset: Int(offsets[tensorIndex]), count: Int(specs[tensorIndex].byteLength))
    }

    /// Copies a tensor's bytes in (shared memory: one memcpy; TCP: streamed).
    public func write(tensorIndex: Int, from bytes: UnsafeRawBufferPointer) throws {
        precondition(tensorIndex >= 0 && tensorIndex < specs.count, "tensor index \(tensorIndex) outside 0..<\(specs.count)")
        precondition(UInt64(bytes.count) == specs[tensorIndex].byteLength, "tensor '\(specs[tensorIndex].name)' size mismatch")
        if let target = destination(tensorIndex: tensorIndex) {
            if let source = bytes.baseAddress, let base = target.baseAddress { memcpy(base, source, bytes.count) }
            return
        }
        var offset = 0
        var crc: UInt32 = 0
        repeat {
            let count = min(Self.streamChunkBytes, bytes.count - offset)
            let chunk = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + count)])
            crc = CRC32C.checksum(chunk, seed: crc)
            try client.put(step: step, tensorIndex: tensorIndex, offsetBytes: UInt64(offset), bytes: chunk)
            offset += count
        } while offset < bytes.count
        progress.withLock { $0.streamedChecksums[tensorIndex] = crc }
    }

    /// Commits the save. Over TCP, without `checksums`, the CRCs computed
    /// while streaming are sent, so the daemon checks what arrived (a tensor
    /// never written leaves the daemon to compute its own).
    public func commit(gradientNorm: Double? = nil, metadata: [UInt8] = [], checksums: [UInt32]? = nil) throws {
        let streamed = progress.withLock { progress -> [UInt32]? in
            precondition(!progress.committed, "save of step \(step) committed twice")
            let crcs = progress.streamedChecksums
            return crcs.allSatisfy { $0 != nil } && segment == nil ? crcs.compactMap { $0 } : nil
        }
        try client.commit(step: step, checksums: checksums ?? streamed, gradientNorm: gradientNorm, metadata: metadata)
        progress.withLock { $0.committed = true }
    }
}
