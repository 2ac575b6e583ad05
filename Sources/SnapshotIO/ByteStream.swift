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
/// attached to each: RDMA registrations of the mapping, one per connection,
/// made on first use and reused for as long as both live. The attachments go
/// (an RDMA region is deregistered) before the mapping is unmapped, so no
/// registration ever outlives the pages it pinned: a later mapping at the
/// same address can never be reached through a stale one.
public final class MappedMemory: Sendable {
    public static let shared = MappedMemory()

    struct Mapping {
        let count: Int
        let writable: Bool
        /// Tells this mapping from a later one at the same address.
        let generation: UInt64
        var attachments: [UInt: any Sendable] = [:]
    }

    struct Mappings {
        var byBase: [UInt: Mapping] = [:]
        var nextGeneration: UInt64 = 0
    }

    private let mappings = Mutex(Mappings())

    func add(base: UnsafeMutableRawPointer, count: Int, writable: Bool) {
        mappings.withLock {
            $0.byBase[UInt(bitPattern: base)] = Mapping(count: count, writable: writable, generation: $0.nextGeneration)
            $0.nextGeneration += 1
        }
    }

    /// Drops the mapping's attachments (outside the lock: deregistering takes time).
    func remove(base: UnsafeMutableRawPointer) {
        let dropped = mappings.withLock { $0.byBase.removeValue(forKey: UInt(bitPattern: base)) }
        _ = dropped
    }

    /// Drops every attachment under `key` (a connection that goes).
    public func removeAttachments(key: UInt) {
        let dropped = mappings.withLock { mappings in
            mappings.byBase.keys.compactMap { base in mappings.byBase[base]?.attachments.removeValue(forKey: key) }
        }
        _ = dropped
    }

    /// The attachment under `key` of the mapping holding `count` bytes at
    /// `address`, made by `make(base, count, writable)` on first use; nil
    /// when no live mapping holds the whole range (the caller registers for
    /// the one transfer). The caller holds the mapping (it is transferring
    /// into or out of it), so it stays while `make` runs outside the lock.
    public func attachment<T: Sendable>(
        containing address: UnsafeRawPointer, count: Int, key: UInt, make: (UnsafeMutableRawPointer, Int, Bool) throws -> T
    ) rethrows -> T? {
        let start = UInt(bitPattern: address)
        let found: (base: UInt, mapping: Mapping)? = mappings.withLock { mappings in
            // Mappings are few (one per segment in use): a scan is cheap next to a transfer.
            mappings.byBase.first { base, mapping in
                start >= base && start - base <= UInt(mapping.count) && UInt(mapping.count) - (start - base) >= UInt(count)
            }.map { ($0.key, $0.value) }
        }
        guard let (base, mapping) = found else { return nil }
        if let existing = mapping.attachments[key] as? T { return existing }
        let made = try make(UnsafeMutableRawPointer(bitPattern: base)!, mapping.count, mapping.writable)
        return mappings.withLock { mappings in
            guard mappings.byBase[base]?.generation == mapping.generation else { return made }  // gone meanwhile: this transfer's only
            if let raced = mappings.byBase[base]?.attachments[key] as? T { return raced }
            mappings.byBase[base]?.attachments[key] = made
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
