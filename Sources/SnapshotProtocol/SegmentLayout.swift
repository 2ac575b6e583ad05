/// Tensor layout inside a segment: each tensor starts on a 256-byte boundary
/// (wide enough for any vector load), and the segment's size is rounded up to
/// a whole MiB so segments of one rank are interchangeable from step to step
/// and can be reused without reallocation.
///
/// In the protocol module, not the daemon's: this is the arithmetic a daemon
/// runs on a client's sizes before it trusts them, so the fuzz target
/// (`fuzz/`) exercises the very code the daemon runs.
public enum SegmentLayout {
    public static let tensorAlignmentBytes: UInt64 = 256
    public static let segmentGranularityBytes: UInt64 = 1 << 20

    /// The largest segment the daemon lays out: far above any memory budget,
    /// far enough below 2^64 that no sum or rounding of sizes under it overflows.
    public static let maximumSegmentBytes: UInt64 = 1 << 50

    /// Where each tensor goes, and the segment size; nil when the tensors do
    /// not fit in ``maximumSegmentBytes`` (sizes from a client are checked
    /// here before any arithmetic on them can overflow).
    public static func offsets(for specs: [TensorSpec]) -> (offsets: [UInt64], segmentSizeBytes: UInt64)? {
        var offsets: [UInt64] = []
        offsets.reserveCapacity(specs.count)
        var cursor: UInt64 = 0
        for spec in specs {
            offsets.append(cursor)
            guard spec.byteLength <= maximumSegmentBytes - cursor, let next = roundUp(cursor + spec.byteLength, to: tensorAlignmentBytes) else { return nil }
            cursor = next
        }
        guard let size = roundUp(cursor, to: segmentGranularityBytes) else { return nil }
        return (offsets, max(segmentGranularityBytes, size))
    }

    /// `value` rounded up to a multiple of `multiple` (a power of two no
    /// larger than a segment granule); nil past ``maximumSegmentBytes``.
    public static func roundUp(_ value: UInt64, to multiple: UInt64) -> UInt64? {
        assert(multiple > 0 && multiple <= segmentGranularityBytes && multiple & (multiple - 1) == 0)
        guard value <= maximumSegmentBytes else { return nil }
        return (value + multiple - 1) / multiple * multiple
    }

    /// The segment that holds one fragment of `fragmentSizeBytes` (at least one granule).
    public static func fragmentSegmentBytes(_ fragmentSizeBytes: UInt64) -> UInt64? {
        roundUp(max(fragmentSizeBytes, 1), to: segmentGranularityBytes)
    }
}
