import ErasureCoding
import Glibc
import SnapshotIO
import SnapshotCore

/// A node's share of a step as one logical byte string: its ranks' segments
/// in rank order (docs/architecture.md, "Protection across nodes": "cut into k equal
/// fragments"). Fragments are ranges of it, read and written in place, with
/// zero padding past the end; nothing is copied into a staging buffer.
struct NodeStepData {
    let segments: [MappedSegment]
    let totalBytes: Int

    init(segments: [MappedSegment]) {
        self.segments = segments
        totalBytes = segments.reduce(0) { $0 + $1.sizeBytes }
    }

    /// Calls `body` with each piece of `offset ..< offset + count`, in order;
    /// bytes past the end of the data are reported as `zeroBytes` at the end.
    func visit(offset: Int, count: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows -> (zeroBytes: Int, Void) {
        var cursor = offset
        let end = offset + count
        var base = 0
        for segment in segments where cursor < end {
            let segmentEnd = base + segment.sizeBytes
            if cursor < segmentEnd {
                let length = min(end, segmentEnd) - cursor
                try body(segment.bytes(offset: cursor - base, count: length))
                cursor += length
            }
            base = segmentEnd
        }
        return (end - cursor, ())
    }

    /// CRC-32C of the fragment `offset ..< offset + count`, zero padding included.
    func checksum(offset: Int, count: Int) -> UInt32 {
        var crc: UInt32 = 0
        var (left, _) = visit(offset: offset, count: count) { crc = CRC32C.checksum(UnsafeRawBufferPointer($0), seed: crc) }
        while left > 0 {
            let chunk = min(left, ZeroBytes.capacity)
            crc = CRC32C.checksum(ZeroBytes.buffer(chunk), seed: crc)
            left -= chunk
        }
        return crc
    }

    /// Writes the fragment to a connection, pieces straight from the
    /// segments, all by one bulk deadline.
    func write(offset: Int, count: Int, to connection: FramedConnection) throws {
        let deadline = connection.bulkDeadline(UInt64(count))
        let (zeros, _) = try visit(offset: offset, count: count) { piece in
            if let base = piece.baseAddress { try connection.stream.writeAll(base, count: piece.count, deadlineMilliseconds: deadline) }
        }
        var left = zeros
        while left > 0 {
            let chunk = min(left, ZeroBytes.capacity)
            try connection.stream.writeAll(ZeroBytes.buffer(chunk).baseAddress!, count: chunk, deadlineMilliseconds: deadline)
            left -= chunk
        }
    }

    /// Scatters `count` bytes from `source` into the data at `offset` (bytes
    /// that fall past the end are padding and dropped).
    func scatter(from source: UnsafeRawPointer, offset: Int, count: Int) {
        var read = 0
        _ = visit(offset: offset, count: count) { piece in
            if let base = piece.baseAddress { memcpy(base, source + read, piece.count) }
            read += piece.count
        }
    }
}

/// A shared page of zeroes for padding.
enum ZeroBytes {
    static let capacity = 1 << 20
    nonisolated(unsafe) static let storage: UnsafeMutableRawPointer = {
        let pointer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        memset(pointer, 0, capacity)
        return pointer
    }()

    /// Callers chunk larger runs of padding.
    static func buffer(_ count: Int) -> UnsafeRawBufferPointer {
        precondition(count <= capacity)
        return UnsafeRawBufferPointer(start: storage, count: count)
    }
}
