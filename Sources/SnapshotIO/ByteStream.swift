import Glibc
import Synchronization

/// A reliable, ordered byte stream between two processes: what
/// ``FramedConnection`` moves frames and bulk bytes over. ``Socket`` is one
/// (Unix or TCP); `RDMAStream` (module RDMATransport) is the other, with
/// bulk bytes moved by RDMA WRITE straight between registered memories. The
/// daemon's sessions, its peer connections and the clients see only this.
public protocol ByteStream: Sendable {
    /// Exactly `count` bytes into `buffer`; by the deadline (monotonic ms) if one is given.
    func readExact(into buffer: UnsafeMutableRawPointer, count: Int, deadlineMilliseconds: Int64?) throws
    /// Exactly `count` bytes into a new array.
    func readExact(count: Int, deadlineMilliseconds: Int64?) throws -> [UInt8]
    /// Exactly `count` bytes, and any file descriptors that arrive with them (Unix sockets only).
    func readExact(count: Int, collecting descriptors: inout [Int32]) throws -> [UInt8]
    /// Reads and throws away `count` bytes.
    func discard(count: UInt64, deadlineMilliseconds: Int64?) throws
    /// All `count` bytes at `buffer`, by the deadline.
    func writeAll(_ buffer: UnsafeRawPointer, count: Int, deadlineMilliseconds: Int64) throws
    /// `bytes`, with `descriptors` attached (only a Unix socket can pass them).
    func writeAll(_ bytes: [UInt8], passing descriptors: [Int32], deadlineMilliseconds: Int64) throws
    /// Returns when a byte can be read; throws ``IOError/timedOut(_:)`` at the deadline.
    func waitReadable(until deadlineMilliseconds: Int64) throws
    /// Whether the peer is gone. Never blocks.
    func peerHasClosed() -> Bool
    /// Unblocks a thread reading or writing this stream (from any thread).
    func shutdownBoth()
    func close()
}

extension Socket: ByteStream {}

/// The process's live memory mappings (``MappedSegment``s) and what is
/// attached to each: RDMA registrations of the mapping, made on first use and
/// reused for as long as the mapping lives. The attachments go (an RDMA
/// region is deregistered) before the mapping is unmapped, so no registration
/// ever outlives the pages it pinned: a later mapping at the same address
/// can never be reached through a stale one.
public final class MappedMemory: Sendable {
    public static let shared = MappedMemory()

    struct Mapping {
        let count: Int
        let writable: Bool
        var attachments: [UInt: any Sendable] = [:]
    }

    /// By base address.
    private let mappings = Mutex<[UInt: Mapping]>([:])

    func add(base: UnsafeMutableRawPointer, count: Int, writable: Bool) {
        mappings.withLock { $0[UInt(bitPattern: base)] = Mapping(count: count, writable: writable) }
    }

    /// Drops the mapping's attachments (outside the lock: their deinit may take time).
    func remove(base: UnsafeMutableRawPointer) {
        let dropped = mappings.withLock { $0.removeValue(forKey: UInt(bitPattern: base)) }
        _ = dropped
    }

    /// The attachment under `key` of the mapping holding `count` bytes at
    /// `address`, made by `make(base, count, writable)` on first use; nil when
    /// no live mapping holds the range (the caller registers for the one transfer).
    public func attachment<T: Sendable>(
        containing address: UnsafeRawPointer, count: Int, key: UInt, make: (UnsafeMutableRawPointer, Int, Bool) throws -> T
    ) rethrows -> T? {
        let start = UInt(bitPattern: address)
        return try mappings.withLock { mappings -> T? in
            // Mappings are few (one per segment in use): a scan is cheap next to a transfer.
            guard let (base, mapping) = mappings.first(where: { base, mapping in start >= base && start - base <= UInt(mapping.count) && UInt(mapping.count) - (start - base) >= UInt(count) })
            else { return nil }
            if let existing = mapping.attachments[key] as? T { return existing }
            let made = try make(UnsafeMutableRawPointer(bitPattern: base)!, mapping.count, mapping.writable)
            mappings[base]?.attachments[key] = made
            return made
        }
    }
}

extension ByteStream {
    public func readExact(into buffer: UnsafeMutableRawPointer, count: Int) throws {
        try readExact(into: buffer, count: count, deadlineMilliseconds: nil)
    }

    public func readExact(count: Int) throws -> [UInt8] { try readExact(count: count, deadlineMilliseconds: nil) }

    public func writeAll(_ bytes: [UInt8], deadlineMilliseconds: Int64) throws {
        try writeAll(bytes, passing: [], deadlineMilliseconds: deadlineMilliseconds)
    }
}
