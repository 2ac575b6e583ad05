import ErasureCoding
import SnapshotProtocol

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

    // MARK: Threads and queues

    /// Reports, state pulls, rebuild orders.
    static let controlPoolThreads = 4
    /// Fragment streams to parity holders.
    static let dataPoolThreads = 4
    /// Queued jobs per pool; beyond it a submission is refused and logged.
    static let queuedJobsPerPool = 4096

    // MARK: Cluster state

    /// Reports per page of a cluster-state reply (a single larger report
    /// travels alone: it fits the large-message limit, as a stepReady does).
    static let clusterStatePageBytes = 64 << 20
    /// Pages one pull may take; each makes progress, so this is a bound on
    /// time, not on what a node can learn: 4096 × 64 MiB = 256 GiB of reports.
    static let maximumClusterStatePages = 4096

    // MARK: Scrub

    /// How much longer systemd should wait for start-up, asked for before
    /// arena recovery and again after each step recovered (EXTEND_TIMEOUT_USEC):
    /// a large arena is CRC-checked before the daemon says READY=1.
    static let startupExtensionMicroseconds: UInt64 = 30_000_000
    /// How long a CheckFree order waits for the node's own exact rebuild
    /// (which retries a step beyond tolerance) to stop before it is refused.
    static let checkFreeClaimTimeoutMilliseconds: Int64 = 30_000
    /// A computed CheckFree share whose planner never committed or aborted
    /// it is dropped by the next rebuild of the step after this long.
    static let checkFreeShareLifetimeMilliseconds: Int64 = 600_000
    /// What the background scrub reads per second at most: it must not take
    /// memory bandwidth a trainer's save or a rebuild needs.
    static let scrubBytesPerSecond = 256 << 20
    /// The scrub paces itself in pieces of this size.
    static let scrubChunkBytes = 16 << 20

    // MARK: Durable tier

    /// Flushes and exports write in pieces of this size (the pacer's unit).
    static let durableWriteChunkBytes = 4 << 20
    /// How often the flusher looks for a newly committed step to flush.
    static let flushPollMilliseconds: Int64 = 200
    /// A rank's JSON manifest read back from disk (16,384 tensors with long names fit).
    static let maximumRankManifestFileBytes = 64 << 20

    // MARK: Operator requests

    /// How long an operator request waits for a peer to connect and answer
    /// (status, drain, rebuild plan): longer than a heartbeat, since a loaded
    /// peer is slow, not dead; peers are asked at once, so this bounds the whole request.
    static let operatorPeerTimeoutMilliseconds: Int64 = 5000
    /// Threads one operator request uses to ask the nodes of a cluster at once.
    static let operatorFanOutThreads = 32
    /// How long a node may take to verify what it holds (unpaced, on a dedicated connection).
    static let verifyReplyTimeoutMilliseconds: Int64 = 3_600_000

    // MARK: Sessions

    /// Bulk bytes of a refused put are read and dropped up to this size to
    /// keep the session; a larger refused put closes it instead.
    static let maximumDiscardBytes: UInt64 = 64 << 20
    /// TCP connections still authenticating, all together; more are refused
    /// at accept (no thread, no memory). Each must finish within
    /// ``authenticationTimeoutMilliseconds``.
    static let maximumHandshakes = 256
    static let authenticationTimeoutMilliseconds: Int64 = 5000
    /// The largest frame read before authentication: the authenticate frame
    /// (a 32-byte tag) fits many times over, an 8 MiB claim does not.
    static let unauthenticatedPayloadBytes = 1024

    // MARK: Metrics endpoint

    /// The most a scrape's request head (request line and headers) may be;
    /// Prometheus sends a few hundred bytes. A larger one is answered 431.
    static let metricsRequestBytes = 8 << 10
    /// The whole request head must arrive within this. The endpoint serves
    /// one connection at a time, so a silent or slow client holds it this
    /// long at most, and a scrape behind it waits no longer.
    static let metricsRequestTimeoutMilliseconds: Int64 = 2000
    /// A scraper must take the whole response within this.
    static let metricsResponseTimeoutMilliseconds: Int64 = 5000
    /// After answering, how long the endpoint reads what a client still
    /// sends before closing (a reset would lose the answer).
    static let metricsLingerMilliseconds: Int64 = 200
    /// Steps whose protection is being timed (local-complete, not yet
    /// committed), all jobs together; beyond it the oldest is dropped.
    static let metricsProtectionTimers = 1024
    /// Saves one session has begun and not committed whose staging is timed;
    /// beyond it the oldest is dropped.
    static let metricsStagingTimersPerSession = 64
    /// Prometheus's default scrape timeout: a scrape that waits behind one
    /// stuck client must still be answered within it.
    static let prometheusDefaultScrapeTimeoutMilliseconds: Int64 = 10_000

    /// Checks how the limits relate; a violation is a programming error in
    /// this file, so it traps at start (never on input).
    static func checkRelationships() {
        precondition(memoryBudgetBytes.lowerBound >= SegmentLayout.segmentGranularityBytes, "a budget must hold one segment")
        precondition(heartbeatIntervalMilliseconds.lowerBound * 2 < failureTimeoutMilliseconds.upperBound)
        precondition(failureTimeoutMilliseconds.lowerBound > 2 * heartbeatIntervalMilliseconds.lowerBound)
        precondition(maximumNodes >= ReedSolomon.maximumTotalFragments, "a cluster holds at least one full group")
        precondition(maximumDiscardBytes <= ProtocolLimits.maximumBulkBytes)
        precondition(unauthenticatedPayloadBytes >= 64 + ProtocolLimits.authenticationTagBytes, "the authenticate frame must fit")
        precondition(authenticationTimeoutMilliseconds <= frameTimeoutMilliseconds.upperBound)
        precondition(UInt64(ProtocolLimits.maximumControlPayloadBytes) < SegmentLayout.maximumSegmentBytes)
        precondition(clusterStatePageBytes * 2 <= ProtocolLimits.maximumLargeControlPayloadBytes, "a page plus one report that overflowed it fits a message")
        precondition(scrubChunkBytes <= scrubBytesPerSecond, "the scrub paces in pieces it may read within a second")
        precondition(UInt64(durableWriteChunkBytes) <= flushBytesPerSecond.lowerBound, "a flush paces in pieces it may write within a second")
        precondition(
            metricsRequestTimeoutMilliseconds + metricsResponseTimeoutMilliseconds + metricsLingerMilliseconds < prometheusDefaultScrapeTimeoutMilliseconds,
            "a scrape queued behind one stuck client is still answered within Prometheus's default scrape timeout")
    }
}
