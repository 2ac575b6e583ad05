import Synchronization
import SnapshotCore

/// A latency histogram with fixed bucket bounds in seconds: observations are
/// counted into the first bucket whose bound they do not exceed, so a scrape
/// costs one copy of a few counters and recording never allocates.
final class Histogram: Sendable {
    /// Ascending upper bounds, seconds; observations above the last one go
    /// into the `+Inf` bucket only.
    let upperBoundsSeconds: [Double]

    private struct Counts {
        var buckets: [UInt64]
        var sumSeconds: Double = 0
    }

    private let counts: Mutex<Counts>

    init(upperBoundsSeconds: [Double]) {
        precondition(!upperBoundsSeconds.isEmpty && zip(upperBoundsSeconds, upperBoundsSeconds.dropFirst()).allSatisfy { $0 < $1 }, "bounds must ascend")
        self.upperBoundsSeconds = upperBoundsSeconds
        counts = Mutex(Counts(buckets: Array(repeating: 0, count: upperBoundsSeconds.count + 1)))
    }

    /// Records one duration. A negative or NaN one (a clock that cannot go
    /// back did not) is counted as 0 rather than dropped, so `_count` still
    /// says how many events there were.
    func observe(seconds: Double) {
        let value = seconds.isNaN || seconds < 0 ? 0 : seconds
        let bucket = upperBoundsSeconds.firstIndex { value <= $0 } ?? upperBoundsSeconds.count
        counts.withLock { counts in
            counts.buckets[bucket] &+= 1
            counts.sumSeconds += value
        }
    }

    func observe(since start: ContinuousClock.Instant) { observe(seconds: (ContinuousClock.now - start).seconds) }

    /// The histogram as it stands, for the exposition.
    func sample(labels: [MetricLabel] = []) -> HistogramSample {
        let (buckets, sum) = counts.withLock { ($0.buckets, $0.sumSeconds) }
        return HistogramSample(labels: labels, upperBounds: upperBoundsSeconds, bucketCounts: buckets, sum: sum)
    }
}

extension Duration {
    /// The duration in seconds, as a double.
    var seconds: Double {
        let (whole, fraction) = components
        return Double(whole) + Double(fraction) * 1e-18
    }
}
