import SnapshotCore
/// The Prometheus text exposition format, version 0.0.4, as pure values and
/// one renderer: families in, text out, no I/O.
///
/// Written by hand rather than with a client library: the format is small
/// and fixed (HELP, TYPE, samples, three escapes), the daemon keeps its own
/// counters and state already, and a dependency would bring its own registry,
/// locks and threads for what is a few dozen lines here.
enum MetricsExposition {
    /// What a scrape is answered with.
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    /// The text of `families`, in the order given. A family with no samples
    /// still gets its HELP and TYPE lines, so the series a dashboard expects
    /// are described even before they first appear.
    static func render(_ families: [MetricFamily]) -> String {
        var text = ""
        for family in families {
            precondition(isValidMetricName(family.name), "metric name '\(family.name)'")
            text += "# HELP \(family.name) \(escapeHelp(family.help))\n"
            text += "# TYPE \(family.name) \(family.kind.rawValue)\n"
            switch family.body {
            case .samples(let samples):
                for sample in samples {
                    text += "\(family.name)\(labelSet(sample.labels)) \(sample.value.text)\n"
                }
            case .histograms(let histograms):
                for histogram in histograms { text += render(histogram, name: family.name) }
            }
        }
        return text
    }

    /// `_bucket` lines with cumulative counts (each counts every observation
    /// at or below its bound), the `+Inf` bucket equal to `_count`, then `_sum`
    /// and `_count`.
    static func render(_ histogram: HistogramSample, name: String) -> String {
        var text = ""
        var cumulative: UInt64 = 0
        for (bound, count) in zip(histogram.upperBounds, histogram.bucketCounts) {
            cumulative &+= count
            text += "\(name)_bucket\(labelSet(histogram.labels + [MetricLabel("le", MetricValue.double(bound).text)])) \(cumulative)\n"
        }
        let total = histogram.count
        text += "\(name)_bucket\(labelSet(histogram.labels + [MetricLabel("le", "+Inf")])) \(total)\n"
        text += "\(name)_sum\(labelSet(histogram.labels)) \(MetricValue.double(histogram.sum).text)\n"
        text += "\(name)_count\(labelSet(histogram.labels)) \(total)\n"
        return text
    }

    static func labelSet(_ labels: [MetricLabel]) -> String {
        guard !labels.isEmpty else { return "" }
        return "{" + labels.map { label in
            precondition(isValidLabelName(label.name), "label name '\(label.name)'")
            return "\(label.name)=\"\(escapeLabelValue(label.value))\""
        }.joined(separator: ",") + "}"
    }

    /// Label values may hold anything: backslash, double quote and newline are escaped.
    static func escapeLabelValue(_ value: String) -> String { escape(value, quote: true) }

    /// HELP text escapes backslash and newline only (a quote is literal there).
    static func escapeHelp(_ help: String) -> String { escape(help, quote: false) }

    private static func escape(_ text: String, quote: Bool) -> String {
        var escaped = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\\": escaped += "\\\\"
            case "\"" where quote: escaped += "\\\""
            case "\n": escaped += "\\n"
            default: escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`. Names come from this code, never from
    /// input, so a bad one is a programming error.
    static func isValidMetricName(_ name: String) -> Bool { isValidName(name, allowingColon: true) }

    /// `[a-zA-Z_][a-zA-Z0-9_]*`, and not starting with `__` (reserved).
    static func isValidLabelName(_ name: String) -> Bool { isValidName(name, allowingColon: false) && !name.hasPrefix("__") }

    private static func isValidName(_ name: String, allowingColon: Bool) -> Bool {
        guard let first = name.utf8.first else { return false }
        func isLetter(_ byte: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || byte == UInt8(ascii: "_") || (allowingColon && byte == UInt8(ascii: ":"))
        }
        return isLetter(first) && name.utf8.allSatisfy { isLetter($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
    }
}

/// One metric family: a name, its help, its type and its samples.
struct MetricFamily: Sendable, Equatable {
    enum Kind: String, Sendable {
        case counter, gauge, histogram
    }

    enum Body: Sendable, Equatable {
        /// Counters and gauges.
        case samples([MetricSample])
        case histograms([HistogramSample])
    }

    let name: String
    let help: String
    let kind: Kind
    let body: Body

    static func counter(_ name: String, _ help: String, _ samples: [MetricSample]) -> MetricFamily {
        MetricFamily(name: name, help: help, kind: .counter, body: .samples(samples))
    }

    static func gauge(_ name: String, _ help: String, _ samples: [MetricSample]) -> MetricFamily {
        MetricFamily(name: name, help: help, kind: .gauge, body: .samples(samples))
    }

    static func histogram(_ name: String, _ help: String, _ histograms: [HistogramSample]) -> MetricFamily {
        MetricFamily(name: name, help: help, kind: .histogram, body: .histograms(histograms))
    }
}

struct MetricLabel: Sendable, Equatable {
    let name: String
    let value: String

    init(_ name: String, _ value: String) {
        self.name = name
        self.value = value
    }
}

struct MetricSample: Sendable, Equatable {
    let labels: [MetricLabel]
    let value: MetricValue

    init(_ labels: [MetricLabel], _ value: MetricValue) {
        self.labels = labels
        self.value = value
    }

    init(_ value: MetricValue) { self.init([], value) }
}

/// A sample's value. Byte counts stay integers: a double would round them
/// above 2^53.
enum MetricValue: Sendable, Equatable {
    case unsigned(UInt64)
    case signed(Int64)
    case double(Double)

    /// As the text format writes it: integers plainly, `NaN`, `+Inf`, `-Inf`,
    /// and other doubles in the shortest form that reads back exactly.
    var text: String {
        switch self {
        case .unsigned(let value): return "\(value)"
        case .signed(let value): return "\(value)"
        case .double(let value):
            if value.isNaN { return "NaN" }
            if value.isInfinite { return value < 0 ? "-Inf" : "+Inf" }
            if value == value.rounded(), abs(value) < 1e15 { return "\(Int64(value))" }
            return "\(value)"
        }
    }
}

/// One histogram's state: per-bucket counts (not cumulative) for each upper
/// bound, ascending, plus the observations above the last bound.
struct HistogramSample: Sendable, Equatable {
    let labels: [MetricLabel]
    let upperBounds: [Double]
    /// `upperBounds.count + 1` counts: the last is for observations above every bound.
    let bucketCounts: [UInt64]
    let sum: Double

    init(labels: [MetricLabel] = [], upperBounds: [Double], bucketCounts: [UInt64], sum: Double) {
        precondition(bucketCounts.count == upperBounds.count + 1, "one count per bound plus the overflow")
        self.labels = labels
        self.upperBounds = upperBounds
        self.bucketCounts = bucketCounts
        self.sum = sum
    }

    var count: UInt64 { bucketCounts.reduce(0, &+) }
}
