import SnapshotProtocol
import Synchronization
import SnapshotCore

/// Monotonic event counters of one daemon, reported in the status reply
/// (``StatusReply/counters``) under stable snake_case names. Separate from
/// ``NodeState``: counting an event never waits on the state lock.
final class Counters: Sendable {
    /// Exported to Prometheus too, as `snapshotd_<name>_total` with ``help``.
    enum Name: String, CaseIterable, Sendable {
        case peersDeclaredDead = "peers_declared_dead"
        case ownPausesDiscounted = "own_pauses_discounted"
        case connectionsRefused = "connections_refused"
        case handshakesEvicted = "handshakes_evicted"
        case authenticationFailures = "authentication_failures"
        case quarantinedFiles = "quarantined_files"
        case rolesRefused = "roles_refused"
        case scrubCorruptionsFound = "scrub_corruptions_found"
        case scrubCorruptionsHealed = "scrub_corruptions_healed"
        case scrubBytesChecked = "scrub_bytes_checked"
        /// Steps this node wrote its ranks of to the durable tier, and the tensor bytes.
        case stepsFlushed = "steps_flushed"
        case flushedBytes = "flushed_bytes"
        /// Flushes that failed (the directory unwritable, the disk full); each is logged.
        case flushFailures = "flush_failures"
        /// Flushes given up because their step was retired from memory first (too slow for the cadence).
        case flushesAbandoned = "flushes_abandoned"
        /// Restores served from the durable tier because memory could not serve them.
        case durableRestores = "durable_restores"
        /// Durable copies that could not be served (unreadable, or failing their CRCs).
        case durableReadFailures = "durable_read_failures"
        case crcFailures = "crc_failures"
        case rebuilds = "rebuilds"
        case rebuiltBytes = "rebuilt_bytes"

        /// What the counter counts (the HELP line of its Prometheus series).
        var help: String {
            switch self {
            case .peersDeclaredDead: "This node declared a peer dead (no heartbeat within the failure timeout)."
            case .ownPausesDiscounted: "This node's own ticks stopped (SIGSTOP, starvation) and the pause was discounted."
            case .connectionsRefused: "Connections refused at accept because their slots were full."
            case .handshakesEvicted: "Handshakes shut down to make room for a newer connection (the pool was full)."
            case .authenticationFailures: "TCP connections that failed or did not finish authentication in time."
            case .quarantinedFiles: "Arena files set aside at start (bad manifest, size or CRC), never deleted."
            case .rolesRefused: "Hellos whose role did not match the session's credential."
            case .scrubCorruptionsFound: "Shards and parity fragments the background scrub found failing their sealed CRCs."
            case .scrubCorruptionsHealed: "Of the scrub's finds, the ones healed byte-identical from peers."
            case .scrubBytesChecked: "Bytes the scrub has checked."
            case .crcFailures:
                "Checks against a CRC that failed, wherever bytes are checked: arena recovery, the scrub, restores, "
                    + "sealing against the client's CRCs, fragments received or served for protection and rebuilds."
            case .rebuilds: "Steps this node rebuilt exactly from its peers' fragments (its shards and parity of the step)."
            case .rebuiltBytes: "Segment bytes of the shards and parity this node rebuilt from its peers."
            case .stepsFlushed: "Steps this node wrote its ranks of to the durable tier."
            case .flushedBytes: "Tensor bytes this node wrote to the durable tier."
            case .flushFailures: "Flushes to the durable tier that failed (each is logged)."
            case .flushesAbandoned: "Flushes given up because their step was retired from memory before it was written."
            case .durableRestores: "Restores served from the durable tier because memory could not serve them."
            case .durableReadFailures: "Durable copies that could not be served (unreadable, or failing their CRCs)."
            }
        }
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

    /// The same, by name, for the Prometheus exposition.
    var all: [(name: Name, value: UInt64)] {
        let current = values.withLock { $0 }
        return Name.allCases.map { ($0, current[$0] ?? 0) }
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
