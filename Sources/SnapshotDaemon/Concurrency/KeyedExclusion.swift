import Foundation
import Synchronization

/// One owner at a time per key: work on one parity fragment (creating its
/// buffer, folding a data fragment into it, sealing it) runs one thread at a
/// time, while different fragments are folded in parallel. An entry lives
/// only while a thread uses its key, so memory is bounded by the threads
/// working, not by the keys ever seen.
final class KeyedExclusion<Key: Hashable & Sendable>: Sendable {
    private final class Entry: Sendable {
        let lock = NSLock()
    }

    private let entries = Mutex<[Key: (entry: Entry, users: Int)]>([:])

    /// Runs `body` as the key's only owner. Not reentrant: `body` must not
    /// ask for the same key again. Taken before the state lock, never under it.
    func withExclusive<Result>(_ key: Key, _ body: () throws -> Result) rethrows -> Result {
        let entry = entries.withLock { entries -> Entry in
            let entry = entries[key]?.entry ?? Entry()
            entries[key] = (entry, (entries[key]?.users ?? 0) + 1)
            return entry
        }
        defer {
            entries.withLock { entries in
                guard let (entry, users) = entries[key] else { return }
                entries[key] = users > 1 ? (entry, users - 1) : nil
            }
        }
        return try entry.lock.withLock(body)
    }

    /// Keys in use now (for tests: zero once every owner is done).
    var keysInUse: Int { entries.withLock { $0.count } }
}
