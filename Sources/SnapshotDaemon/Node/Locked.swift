import Foundation
import SnapshotCore

/// One value behind one lock, with waits on it: the daemon's state has one
/// owner (docs/architecture.md, "State ownership"). `Synchronization.Mutex` cannot
/// wait on a condition, which sessions need (a commit, a freed shard), so
/// this wraps an `NSCondition`; like `Mutex`, the value is reachable only
/// inside ``withLock(_:)``, so the compiler sees every access.
final class Locked<State>: @unchecked Sendable {  // a lock primitive: `value` is only touched with `condition` held
    private let condition = NSCondition()
    private var value: State

    init(_ value: State) { self.value = value }

    func withLock<Result>(_ body: (inout State) throws -> Result) rethrows -> Result {
        condition.lock()
        defer { condition.unlock() }
        return try body(&value)
    }

    /// Holds the lock while `decide` returns nil, sleeping between calls
    /// until ``broadcast()`` or `deadline`; returns its first non-nil answer,
    /// or its answer at the deadline (nil if it still has none).
    func withLock<Result>(waitingUntil deadline: Date, _ decide: (inout State) throws -> Result?) rethrows -> Result? {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let result = try decide(&value) { return result }
            if !condition.wait(until: deadline) { return try decide(&value) }
        }
    }

    /// Wakes every waiter: the state changed in a way they may wait for.
    /// Callable inside ``withLock(_:)`` or after it (a waiter re-checks its
    /// condition under the lock, so no wake-up is lost either way).
    func broadcast() { condition.broadcast() }
}
