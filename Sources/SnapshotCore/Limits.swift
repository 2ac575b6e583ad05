public import ErasureCoding
public import SnapshotProtocol

/// Every bound and timeout of the daemon, in one place (TIGER_STYLE: a limit
/// on everything). Configuration values are checked against the ranges here
/// with an error naming the setting; the relationships between limits are
/// checked by ``checkRelationships()`` at start and by a unit test.
/// Wire-format limits live in ``ProtocolLimits`` (shared with clients).
public enum Limits {
    // MARK: Ranges of configurable values

    /// A budget below one segment granule holds nothing; one above the
    /// largest segment could not be laid out without overflow.
    public static let memoryBudgetBytes: ClosedRange<UInt64> = (1 << 20)...SegmentLayout.maximumSegmentBytes
    public static let snapshotsKeptPerJob: ClosedRange<Int> = 1...64
    public static let maximumConnections: ClosedRange<Int> = 1...65_536
    public static let frameTimeoutMilliseconds: ClosedRange<Int64> = 100...3_600_000
    public static let heartbeatIntervalMilliseconds: ClosedRange<Int64> = 10...60_000
    public static let failureTimeoutMilliseconds: ClosedRange<Int64> = 30...600_000
    /// 0 turns the scrub off; at most once a day otherwise.
    public static let scrubIntervalMilliseconds: ClosedRange<Int64> = 0...86_400_000
    /// Durable tier cadence: every N-th committed step (0: not by count),
    /// and/or every so many milliseconds (0: not by time).
    public static let flushEverySteps: ClosedRange<Int> = 0...1_000_000
    public static let flushIntervalMilliseconds: ClosedRange<Int64> = 0...604_800_000
    /// What a flush writes per second at most, so it never takes the disk
    /// or memory bandwidth that saves and protection need.
    public static let flushBytesPerSecond: ClosedRange<UInt64> = (8 << 20)...(1 << 40)
    /// Flushed steps kept per job in the flush directory.
    public static let flushKeptSteps: ClosedRange<Int> = 1...64
    /// Nodes in one cluster file: each peer has a heartbeat thread.
    public static let maximumNodes = 1024

    // MARK: Defaults of configurable values

    /// A cluster file that names no heartbeat interval or failure timeout gets these.
    public static let defaultHeartbeatIntervalMilliseconds: Int64 = 200
    public static let defaultFailureTimeoutMilliseconds: Int64 = 2000

    // MARK: Threads and queues

    /// Reports, state pulls, rebuild orders.
    public static let controlPoolThreads = 4
    /// Fragment streams to parity holders.
    public static let dataPoolThreads = 4
    /// Queued jobs per pool; beyond it a submission is refused and logged.
    public static let queuedJobsPerPool = 4096

    // MARK: Cluster state

    /// Reports per page of a cluster-state reply (a single larger report
    /// travels alone: it fits the large-message limit, as a stepReady does).
    public static let clusterStatePageBytes = 64 << 20
    /// Pages one pull may take; each makes progress, so this is a bound on
    /// time, not on what a node can learn: 4096 × 64 MiB = 256 GiB of reports.
    public static let maximumClusterStatePages = 4096

    // MARK: Peers

    /// A heartbeat's connect and reply are bounded by half the failure
    /// timeout (a peer answers at least twice within it), but never by less
    /// than this: a loaded loopback connect takes tens of milliseconds.
    public static let minimumHeartbeatTimeoutMilliseconds: Int64 = 200
    /// How long a peer's reply may take to start, by purpose. Heartbeats: at
    /// least this (their connect timeout if longer), so a stuck peer is seen
    /// quickly. Control (reports, state pulls, orders): a loaded peer answers
    /// within seconds. Data: a fragment's acknowledgement follows reading,
    /// checking and folding up to gigabytes.
    public static let heartbeatReplyTimeoutMilliseconds: Int64 = 1000
    public static let controlReplyTimeoutMilliseconds: Int64 = 10_000
    public static let dataReplyTimeoutMilliseconds: Int64 = 60_000
    /// A peer that did not answer over RDMA is reached over TCP, and RDMA is
    /// tried again only after this (not a connect timeout on every reconnect).
    public static let rdmaRetryMilliseconds: Int64 = 60_000
    /// A fragment send is tried this many times, this far apart (a stale
    /// connection, or a holder that has not yet received the step's reports).
    public static let fragmentSendAttempts = 5
    public static let fragmentSendRetryMilliseconds: Int64 = 200
    /// A node that starts asks its peers for the cluster's state this often;
    /// with every peer refusing for a failure timeout it starts as the first.
    public static let discoveryPollMilliseconds: Int64 = 100
    /// While discovery waits, a warning this often.
    public static let discoveryWarningIntervalMilliseconds: Int64 = 5000
    /// Peers unreachable at start are named in a warning; each is given this long to answer.
    public static let startupPeerProbeMilliseconds: Int64 = 1000

    // MARK: Protection

    /// A step's protection is retried this often while a holder does not
    /// acknowledge, and given up (the step does not commit) after the timeout.
    public static let protectionRetryIntervalMilliseconds: Int64 = 1000
    public static let protectionTimeoutMilliseconds: Int64 = 120_000

    // MARK: Scrub

    /// How much longer systemd should wait for start-up, asked for before
    /// arena recovery and again after each step recovered (EXTEND_TIMEOUT_USEC):
    /// a large arena is CRC-checked before the daemon says READY=1.
    public static let startupExtensionMicroseconds: UInt64 = 30_000_000
    /// How long a CheckFree order waits for the node's own exact rebuild
    /// (which retries a step beyond tolerance) to stop before it is refused.
    public static let checkFreeClaimTimeoutMilliseconds: Int64 = 30_000
    /// A computed CheckFree share whose planner never committed or aborted
    /// it is dropped this long after it was computed (``CheckFreeMachine``).
    public static let checkFreeShareLifetimeMilliseconds: Int64 = 600_000
    /// What the background scrub reads per second at most: it must not take
    /// memory bandwidth a trainer's save or a rebuild needs.
    public static let scrubBytesPerSecond = 256 << 20
    /// The scrub paces itself in pieces of this size.
    public static let scrubChunkBytes = 16 << 20

    // MARK: Durable tier

    /// Flushes and exports write in pieces of this size (the pacer's unit).
    public static let durableWriteChunkBytes = 4 << 20
    /// How often the flusher looks for a newly committed step to flush.
    public static let flushPollMilliseconds: Int64 = 200
    /// The pacer sleeps at most this long at once, so a flush abandoned
    /// meanwhile is noticed soon.
    public static let pacerLongestSleepMilliseconds: Int64 = 10_000
    /// A rank's JSON manifest read back from disk (16,384 tensors with long names fit).
    public static let maximumRankManifestFileBytes = 64 << 20

    // MARK: Operator requests

    /// How long an operator request waits for a peer to connect and answer
    /// (status, drain, rebuild plan): longer than a heartbeat, since a loaded
    /// peer is slow, not dead; peers are asked at once, so this bounds the whole request.
    public static let operatorPeerTimeoutMilliseconds: Int64 = 5000
    /// Threads one operator request uses to ask the nodes of a cluster at once.
    public static let operatorFanOutThreads = 32
    /// How long a node may take to verify what it holds (unpaced, on a dedicated connection).
    public static let verifyReplyTimeoutMilliseconds: Int64 = 3_600_000

    // MARK: Sessions

    /// Bulk bytes of a refused put are read and dropped up to this size to
    /// keep the session; a larger refused put closes it instead.
    public static let maximumDiscardBytes: UInt64 = 64 << 20
    /// TCP connections still authenticating, all together; more are refused
    /// at accept (no thread, no memory). Each must finish within
    /// ``authenticationTimeoutMilliseconds``.
    public static let maximumHandshakes = 256
    public static let authenticationTimeoutMilliseconds: Int64 = 5000
    /// The largest frame read before authentication: the authenticate frame
    /// (a 32-byte tag) fits many times over, an 8 MiB claim does not.
    public static let unauthenticatedPayloadBytes = 1024
    /// The longest a trainer may wait for a commit in one request.
    public static let longestCommitWaitMilliseconds: UInt32 = 3_600_000
    /// A commit wait looks, between slices this long, whether its client is
    /// still there: a trainer killed while waiting frees its rank within one.
    public static let commitWaitSliceMilliseconds: Int64 = 100
    /// A refusal (slots full) sent over RDMA may take this long; a socket's
    /// buffer takes one at once or drops it.
    public static let rdmaRefusalGraceMilliseconds: Int64 = 2000
    /// The RDMA listener wakes this often to see whether the daemon stops.
    public static let rdmaAcceptWakeMilliseconds: Int32 = 200
    /// After a failed accept (EMFILE and the like), this pause before the next.
    public static let acceptRetryPauseMilliseconds: Int64 = 10
    /// Warnings that repeat under load (refused connections, RDMA accept
    /// failures) are logged at most this often.
    public static let repeatedWarningIntervalMilliseconds: Int64 = 1000

    // MARK: Metrics endpoint

    /// The most a scrape's request head (request line and headers) may be;
    /// Prometheus sends a few hundred bytes. A larger one is answered 431.
    public static let metricsRequestBytes = 8 << 10
    /// The whole request head must arrive within this. The endpoint serves
    /// one connection at a time, so a silent or slow client holds it this
    /// long at most, and a scrape behind it waits no longer.
    public static let metricsRequestTimeoutMilliseconds: Int64 = 2000
    /// A scraper must take the whole response within this.
    public static let metricsResponseTimeoutMilliseconds: Int64 = 5000
    /// After answering, how long the endpoint reads what a client still
    /// sends before closing (a reset would lose the answer).
    public static let metricsLingerMilliseconds: Int64 = 200
    /// Steps whose protection is being timed (local-complete, not yet
    /// committed), all jobs together; beyond it the oldest is dropped.
    public static let metricsProtectionTimers = 1024
    /// Saves one session has begun and not committed whose staging is timed;
    /// beyond it the oldest is dropped.
    public static let metricsStagingTimersPerSession = 64
    /// Prometheus's default scrape timeout: a scrape that waits behind one
    /// stuck client must still be answered within it.
    public static let prometheusDefaultScrapeTimeoutMilliseconds: Int64 = 10_000

    /// Checks how the limits relate; a violation is a programming error in
    /// this file, so it traps at start (never on input). `LimitsTests` runs
    /// the same checks.
    public static func checkRelationships() {
        let violated = violatedRelationships()
        precondition(violated.isEmpty, "limits do not hold together: \(violated.joined(separator: "; "))")
    }

    /// The relationships between limits that do not hold (none, when this file is right).
    public static func violatedRelationships() -> [String] {
        let relationships: [(holds: Bool, what: String)] = [
            (memoryBudgetBytes.lowerBound >= SegmentLayout.segmentGranularityBytes, "a budget must hold one segment"),
            (heartbeatIntervalMilliseconds.lowerBound * 2 < failureTimeoutMilliseconds.upperBound, "some heartbeat interval fits a failure timeout twice"),
            (failureTimeoutMilliseconds.lowerBound > 2 * heartbeatIntervalMilliseconds.lowerBound, "the shortest failure timeout spans two of the shortest heartbeats"),
            (defaultFailureTimeoutMilliseconds > 2 * defaultHeartbeatIntervalMilliseconds, "the default failure timeout spans two default heartbeats"),
            (heartbeatIntervalMilliseconds.contains(defaultHeartbeatIntervalMilliseconds), "the default heartbeat interval is a valid one"),
            (failureTimeoutMilliseconds.contains(defaultFailureTimeoutMilliseconds), "the default failure timeout is a valid one"),
            (minimumHeartbeatTimeoutMilliseconds <= heartbeatReplyTimeoutMilliseconds, "a heartbeat's reply may take as long as its connect"),
            (heartbeatReplyTimeoutMilliseconds < controlReplyTimeoutMilliseconds && controlReplyTimeoutMilliseconds < dataReplyTimeoutMilliseconds,
             "replies are given more time as they carry more work"),
            // The retries are for quick failures (a stale connection, a holder
            // not yet told of the step); those and one attempt that waits out
            // its whole reply timeout fit before the step is given up.
            (Int64(fragmentSendAttempts) * fragmentSendRetryMilliseconds + dataReplyTimeoutMilliseconds < protectionTimeoutMilliseconds,
             "a fragment send's quick retries and one slow attempt fit the protection timeout"),
            (protectionRetryIntervalMilliseconds < protectionTimeoutMilliseconds, "protection is retried before it is given up"),
            (discoveryPollMilliseconds < discoveryWarningIntervalMilliseconds, "discovery asks before it warns"),
            (checkFreeClaimTimeoutMilliseconds < checkFreeShareLifetimeMilliseconds, "a claimed CheckFree share outlives the claim's wait"),
            (commitWaitSliceMilliseconds * 10 <= Int64(longestCommitWaitMilliseconds), "a commit wait is many slices"),
            (maximumNodes >= ReedSolomon.maximumTotalFragments, "a cluster holds at least one full group"),
            (maximumDiscardBytes <= ProtocolLimits.maximumBulkBytes, "a refused put that is read and dropped is a valid one"),
            (unauthenticatedPayloadBytes >= 64 + ProtocolLimits.authenticationTagBytes, "the authenticate frame must fit"),
            (authenticationTimeoutMilliseconds <= frameTimeoutMilliseconds.upperBound, "authentication fits a frame timeout"),
            (UInt64(ProtocolLimits.maximumControlPayloadBytes) < SegmentLayout.maximumSegmentBytes, "a control message fits a segment"),
            (clusterStatePageBytes * 2 <= ProtocolLimits.maximumLargeControlPayloadBytes, "a page plus one report that overflowed it fits a message"),
            (scrubChunkBytes <= scrubBytesPerSecond, "the scrub paces in pieces it may read within a second"),
            (UInt64(durableWriteChunkBytes) <= flushBytesPerSecond.lowerBound, "a flush paces in pieces it may write within a second"),
            (flushPollMilliseconds < pacerLongestSleepMilliseconds, "the flusher looks for work more often than the pacer sleeps"),
            (metricsRequestTimeoutMilliseconds + metricsResponseTimeoutMilliseconds + metricsLingerMilliseconds < prometheusDefaultScrapeTimeoutMilliseconds,
             "a scrape queued behind one stuck client is still answered within Prometheus's default scrape timeout"),
        ]
        return relationships.filter { !$0.holds }.map(\.what)
    }
}
