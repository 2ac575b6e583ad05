import Glibc
import SnapshotIO
public import SnapshotProtocol

/// A save in progress: write every tensor, then commit.
public final class PendingSave: @unchecked Sendable {
    public let step: Step
    public let specs: [TensorSpec]
    let client: SnapshotClient
    let offsets: [UInt64]
    let segment: MappedSegment?
    var committed = false
    /// Chunk size for TCP puts: large enough to amortize the frame header,
    /// small enough that a refused put costs little.
    static let streamChunkBytes = 16 << 20

    init(client: SnapshotClient, step: Step, specs: [TensorSpec], offsets: [UInt64], segment: MappedSegment?) {
        self.client = client
        self.step = step
        self.specs = specs
        self.offsets = offsets
        self.segment = segment
    }

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
        repeat {
            let count = min(Self.streamChunkBytes, bytes.count - offset)
            let chunk = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + count)])
            try client.put(step: step, tensorIndex: tensorIndex, offsetBytes: UInt64(offset), bytes: chunk)
            offset += count
        } while offset < bytes.count
    }

    public func commit(gradientNorm: Double? = nil, metadata: [UInt8] = [], checksums: [UInt32]? = nil) throws {
        precondition(!committed, "save of step \(step) committed twice")
        try client.commit(step: step, checksums: checksums, gradientNorm: gradientNorm, metadata: metadata)
        committed = true
    }
}
