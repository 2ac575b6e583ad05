import Dispatch
import Foundation
import Synchronization

/// One value behind one lock, with waits on it: the daemon's state has one
/// owner (docs/architecture.md, "State ownership"). A `Mutex` holds the value,
/// reachable only inside ``withLock(_:)``, so the compiler sees every access.
/// A `Mutex` cannot wait on a condition, which sessions need (a commit, a
/// freed shard), so each waiter parks on a semaphore of its own, registered
/// under the lock, that ``broadcast()`` signals.
final class Locked<State: Sendable>: Sendable {
    private let value: Mutex<State>
    /// The parked waiters, each woken once. Taken inside `value`'s lock (a
    /// waiter registers there, and ``broadcast()`` may be called there) or
    /// alone, never the other way round.
    private let waiters = Mutex<[ObjectIdentifier: DispatchSemaphore]>([:])

    init(_ value: State) { self.value = Mutex(value) }

    func withLock<Result>(_ body: (inout State) throws -> Result) rethrows -> Result {
        try value.withLock { state in try body(&state) }
    }

    /// Holds the lock while `decide` returns nil, sleeping between calls
    /// until ``broadcast()`` or `deadline`; returns its first non-nil answer,
    /// or its answer at the deadline (nil if it still has none).
    func withLock<Result>(waitingUntil deadline: Date, _ decide: (inout State) throws -> Result?) rethrows -> Result? {
        let wakeUp = DispatchSemaphore(value: 0)
        let waiter = ObjectIdentifier(wakeUp)
        while true {
            // `decide` looks and the waiter registers in one hold of the lock:
            // a change made after the look comes with a broadcast that finds it.
            let answer: Result? = try value.withLock { state in
                if let result = try decide(&state) { return result }
                waiters.withLock { $0[waiter] = wakeUp }
                return nil
            }
            if let answer { return answer }
            if wakeUp.wait(timeout: Self.dispatchTime(deadline)) == .timedOut {
                return try value.withLock { state in
                    waiters.withLock { $0[waiter] = nil }
                    return try decide(&state)
                }
            }
        }
    }

    /// Wakes every waiter: the state changed in a way they may wait for.
    /// Callable inside ``withLock(_:)`` or after it (a waiter looks and
    /// registers under the lock, so no wake-up is lost either way).
    func broadcast() {
        let parked = waiters.withLock { waiters in
            defer { waiters.removeAll() }
            return Array(waiters.values)
        }
        for wakeUp in parked { wakeUp.signal() }
    }

    /// Waiters parked now (for tests: zero once every wait has ended).
    var parkedWaiters: Int { waiters.withLock { $0.count } }

    /// `deadline` on the monotonic clock the semaphore waits by.
    private static func dispatchTime(_ deadline: Date) -> DispatchTime {
        let seconds = deadline.timeIntervalSinceNow
        return seconds > 0 ? .now() + seconds : .now()
    }
}
