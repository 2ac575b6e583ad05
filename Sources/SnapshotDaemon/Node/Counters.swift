import SnapshotProtocol
import Synchronization

/// Monotonic event counters of one daemon, reported in the status reply
/// (``StatusReply/counters``) under stable snake_case names. Separate from
/// ``NodeState``: counting an event never waits on the state lock.
final class Counters: Sendable {
    enum Name: String, CaseIterable, Sendable {
        /// This node declared a peer dead (no heartbeat within the failure timeout).
        case peersDeclaredDead = "peers_declared_dead"
        /// This node's own ticks stopped (SIGSTOP, starvation) and the pause was discounted.
        case ownPausesDiscounted = "own_pauses_discounted"
        /// Connections refused at accept because their slots were full.
        case connectionsRefused = "connections_refused"
        /// Handshakes shut down to make room for a newer connection (the pool was full).
        case handshakesEvicted = "handshakes_evicted"
        /// TCP connections that failed or did not finish authentication in time.
        case authenticationFailures = "authentication_failures"
        /// Arena files set aside at start (bad manifest, size or CRC), never deleted.
        case quarantinedFiles = "quarantined_files"
        /// Hellos whose role did not match the session's credential.
        case rolesRefused = "roles_refused"
        /// Shards and parity fragments the background scrub found failing their sealed CRCs.
        case scrubCorruptionsFound = "scrub_corruptions_found"
        /// Of those, the ones healed byte-identical from peers.
        case scrubCorruptionsHealed = "scrub_corruptions_healed"
        /// Bytes the scrub has checked.
        case scrubBytesChecked = "scrub_bytes_checked"
        /// Steps this node wrote its ranks of to the durable tier, and the tensor bytes.
        case stepsFlushed = "steps_flushed"
        case bytesFlushed = "bytes_flushed"
        /// Flushes that failed (the directory unwritable, the disk full); each is logged.
        case flushFailures = "flush_failures"
        /// Restores served from the durable tier because memory could not serve them.
        case durableRestores = "durable_restores"
        /// Durable copies that could not be served (unreadable, or failing their CRCs).
        case durableReadFailures = "durable_read_failures"
    }

    private let values = Mutex<[Name: UInt64]>([:])

    func increment(_ name: Name, by amount: UInt64 = 1) {
        values.withLock { $0[name, default: 0] &+= amount }
    }

    func value(_ name: Name) -> UInt64 { values.withLock { $0[name] ?? 0 } }

    /// Every counter, zero ones included, in declaration order.
    var snapshot: [StatusCounter] {
        let current = values.withLock { $0 }
        return Name.allCases.map { StatusCounter(name: $0.rawValue, value: current[$0] ?? 0) }
    }
}

/// Lets one log line through per interval (for events that come in floods).
final class LogRateLimiter: Sendable {
    private let intervalMilliseconds: Int64
    private let lastLoggedMilliseconds = Mutex<Int64>(.min)

    init(intervalMilliseconds: Int64) { self.intervalMilliseconds = intervalMilliseconds }

    func shouldLog(nowMilliseconds: Int64) -> Bool {
        lastLoggedMilliseconds.withLock { last in
            guard last == .min || nowMilliseconds - last >= intervalMilliseconds else { return false }
            last = nowMilliseconds
            return true
        }
    }
}
