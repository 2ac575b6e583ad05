import CheckFree
import Foundation
import SnapshotProtocol
import Testing

/// The kernels against values computed here, independently, in double
/// precision: `(a·next + b·previous) / (a + b)` with `a = ‖g_next‖ + 1e-4`
/// and `b = ‖g_previous‖ + 1e-4`, rounded to the dtype by the test's own
/// round-to-nearest-even.
///
/// The averages run twice: with the vectorized loops (AVX2 + F16C, where this
/// CPU has them) and with the portable ones, which every other CPU runs.
@Suite(.serialized) struct StageAveragingTests {
    static let paths: [Bool] = [false, true]  // forcePortable
    // MARK: Independent reference (double precision, written from the formats' definitions)

    /// Value of a half/bfloat16 bit pattern, from the format's definition.
    static func decode(_ bits: UInt16, exponentBits: Int, mantissaBits: Int) -> Double {
        let sign: Double = bits >> 15 == 1 ? -1 : 1
        let exponent = Int(bits >> mantissaBits) & ((1 << exponentBits) - 1)
        let mantissa = Double(Int(bits) & ((1 << mantissaBits) - 1))
        let bias = (1 << (exponentBits - 1)) - 1
        if exponent == (1 << exponentBits) - 1 { return mantissa == 0 ? sign * .infinity : .nan }
        if exponent == 0 { return sign * mantissa * pow(2, Double(1 - bias - mantissaBits)) }
        return sign * (1 + mantissa / pow(2, Double(mantissaBits))) * pow(2, Double(exponent - bias))
    }

    /// Every finite value of a 16-bit format, sorted, with its bits (positive and negative).
    static func finiteValues(exponentBits: Int, mantissaBits: Int) -> [(value: Double, bits: UInt16)] {
        (0...UInt16.max).compactMap { bits in
            let value = decode(bits, exponentBits: exponentBits, mantissaBits: mantissaBits)
            return value.isFinite && bits != 0x8000 ? (value, bits) : nil  // one zero: +0
        }.sorted { $0.value < $1.value || ($0.value == $1.value && $0.bits < $1.bits) }
    }
    static let halfValues = finiteValues(exponentBits: 5, mantissaBits: 10)
    static let bfloatValues = finiteValues(exponentBits: 8, mantissaBits: 7)

    /// The two representable values around `x` (equal when exact); nil above the largest.
    static func bracket(_ x: Double, in table: [(value: Double, bits: UInt16)]) -> (low: (value: Double, bits: UInt16), high: (value: Double, bits: UInt16))? {
        var lo = 0, hi = table.count - 1
        guard x >= table[lo].value, x <= table[hi].value else { return nil }
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if table[mid].value <= x { lo = mid } else { hi = mid }
        }
        if table[lo].value == x { return (table[lo], table[lo]) }
        return (table[lo], table[hi])
    }

    /// Checks a 16-bit result against the double-precision reference: it must
    /// be the round-to-nearest-even of the exact value, except where the exact
    /// value lies so close to a midpoint that fp32 arithmetic (which the issue
    /// prescribes) may fall on either side; then either neighbour is right.
    static func expectRounded(_ got: UInt16, exact: Double, termScale: Double, table: [(value: Double, bits: UInt16)], format: (exponentBits: Int, mantissaBits: Int), context: String) {
        // Zero comes out with either sign.
        let got = got == 0x8000 ? 0 : got
        guard let (low, high) = bracket(exact, in: table) else {
            Issue.record("\(context): reference \(exact) is outside the format")
            return
        }
        if low.value == high.value {
            #expect(got == low.bits, "\(context): exact \(exact), got bits \(got)")
            return
        }
        let midpoint = (low.value + high.value) / 2
        // fp32 arithmetic errs by a few ulps of the larger term (the weights
        // are rounded to fp32, and the terms may cancel).
        let fp32Error = 4 * Double(Float(max(abs(exact), termScale)).ulp)
        let nearest = abs(exact - midpoint) <= fp32Error ? nil : (exact < midpoint ? low : high)
        if let nearest {
            #expect(got == nearest.bits, "\(context): exact \(exact) rounds to \(nearest.value) (bits \(nearest.bits)), got bits \(got)")
        } else {
            // At or next to a tie (or where cancelling terms make fp32's error
            // span several 16-bit steps), fp32's own rounding decides: the
            // result lies within that error, plus one step, of the exact value
            // (exact ties with exact arithmetic: ``midpointsRoundToEven``).
            let value = decode(got, exponentBits: format.exponentBits, mantissaBits: format.mantissaBits)
            #expect(abs(value - exact) <= fp32Error + (high.value - low.value), "\(context): exact \(exact), got \(value) (bits \(got))")
        }
    }

    static func seeded(_ test: String) -> SplitMix64 {
        let seed = ProcessInfo.processInfo.environment["SNAPSHOTD_TEST_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64(UInt32.max))
        print("[\(test)] seed \(seed) (replay with SNAPSHOTD_TEST_SEED=\(seed))")
        return SplitMix64(seed: seed)
    }

    // MARK: Conversions

    @Test func everyHalfConvertsToFloatExactly() {
        for bits in 0...UInt16.max {
            let reference = Self.decode(bits, exponentBits: 5, mantissaBits: 10)
            let got = StageAveraging.floatFromFloat16(bits)
            if reference.isNaN { #expect(got.isNaN, "bits \(bits)") } else { #expect(Double(got) == reference, "bits \(bits)") }
        }
    }

    @Test func floatToHalfRoundsToNearestEven() {
        // Every midpoint between neighbouring halves is a tie (exact in float): it goes to the even one.
        for (low, high) in zip(Self.halfValues, Self.halfValues.dropFirst()) where low.value > 0 {
            let mid = (low.value + high.value) / 2
            let even = (low.bits & 1) == 0 ? low.bits : high.bits
            #expect(StageAveraging.float16Bits(Float(mid)) == even, "tie \(mid)")
            #expect(StageAveraging.float16Bits(-Float(mid)) == even | 0x8000, "tie -\(mid)")
            // Just off the tie, each side rounds to its own neighbour.
            #expect(StageAveraging.float16Bits(Float(mid).nextDown) == low.bits, "below \(mid)")
            #expect(StageAveraging.float16Bits(Float(mid).nextUp) == high.bits, "above \(mid)")
        }
        #expect(StageAveraging.float16Bits(65504) == 0x7BFF)
        #expect(StageAveraging.float16Bits(65519.99) == 0x7BFF)  // below the overflow threshold
        #expect(StageAveraging.float16Bits(65520) == 0x7C00)  // the tie with 2^16 rounds to even: infinity
        #expect(StageAveraging.float16Bits(.infinity) == 0x7C00)
        #expect(StageAveraging.float16Bits(-.infinity) == 0xFC00)
        #expect(StageAveraging.float16Bits(.nan) & 0x7C00 == 0x7C00 && StageAveraging.float16Bits(.nan) & 0x03FF != 0)
        #expect(StageAveraging.float16Bits(Float(pow(2.0, -25.0))) == 0)  // half the smallest subnormal: ties to zero (even)
        #expect(StageAveraging.float16Bits(Float(pow(2.0, -25.0)).nextUp) == 1)
        #expect(StageAveraging.float16Bits(-0.0) == 0x8000)
    }

    @Test func floatToBFloat16RoundsToNearestEven() {
        for (low, high) in zip(Self.bfloatValues, Self.bfloatValues.dropFirst()) where low.value > 0 {
            let mid = (low.value + high.value) / 2
            let even = (low.bits & 1) == 0 ? low.bits : high.bits
            #expect(StageAveraging.bfloat16Bits(Float(mid)) == even, "tie \(mid)")
            #expect(StageAveraging.bfloat16Bits(Float(mid).nextDown) == low.bits, "below \(mid)")
            #expect(StageAveraging.bfloat16Bits(Float(mid).nextUp) == high.bits, "above \(mid)")
        }
        #expect(StageAveraging.bfloat16Bits(.greatestFiniteMagnitude) == 0x7F80)  // rounds up past the largest bfloat16
        for bits in 0...UInt16.max {
            let reference = Self.decode(bits, exponentBits: 8, mantissaBits: 7)
            let got = StageAveraging.floatFromBFloat16(bits)
            if reference.isNaN { #expect(got.isNaN) } else { #expect(Double(got) == reference, "bits \(bits)") }
        }
    }

    // MARK: Averages against double precision

    @Test(arguments: [DType.float32, .float16, .bfloat16], paths)
    func averagesMatchDoublePrecision(dtype: DType, portable: Bool) {
        StageAveraging.forcePortable(portable)
        defer { StageAveraging.forcePortable(false) }
        print("[averagesMatchDoublePrecision] \(dtype): \(StageAveraging.usesAVX2 ? "AVX2 + F16C loops" : "portable loops")")
        var random = Self.seeded("averagesMatchDoublePrecision \(dtype)")
        // Past one parallel chunk, so chunk edges are covered too.
        let count = StageAveraging.chunkElements * 2 + 1_001
        let norms = [(0.0, 0.0), (1.0, 1.0), (0.3, 2.7), (1e-3, 50.0), (Double.random(in: 0...10, using: &random), Double.random(in: 0...10, using: &random))]
        for (normPrevious, normNext) in norms {
            let a = normNext + 1e-4, b = normPrevious + 1e-4
            let (wp, wn) = StageAveraging.weights(normPrevious: normPrevious, normNext: normNext)!
            #expect(abs(wp - b / (a + b)) < 1e-15 && abs(wn - a / (a + b)) < 1e-15)
            switch dtype {
            case .float32:
                let p = (0..<count).map { _ in Float(Double.random(in: -4...4, using: &random)) }
                let n = (0..<count).map { _ in Float(Double.random(in: -4...4, using: &random)) }
                var out = [Float](repeating: .nan, count: count)
                let finite = p.withUnsafeBytes { pb in n.withUnsafeBytes { nb in out.withUnsafeMutableBytes { ob in
                    StageAveraging.average(.float32, previous: pb.baseAddress!, next: nb.baseAddress!, count: count, weightPrevious: wp, weightNext: wn, into: ob.baseAddress!)
                } } }
                #expect(finite)
                var worst = 0.0
                for i in 0..<count {
                    let exact = (a * Double(n[i]) + b * Double(p[i])) / (a + b)
                    // fp32 arithmetic: within a few ulps of the larger term.
                    let scale = max(abs(Double(p[i])), abs(Double(n[i])), 1e-30)
                    worst = max(worst, abs(Double(out[i]) - exact) / Double(Float(scale).ulp))
                }
                #expect(worst <= 3, "norms \(normPrevious), \(normNext): worst error \(worst) ulps")
            default:
                let table = dtype == .float16 ? Self.halfValues : Self.bfloatValues
                let (e, m) = dtype == .float16 ? (5, 10) : (8, 7)
                // Random finite values, each 16-bit pattern decoded by the reference.
                func randomBits() -> UInt16 {
                    while true {
                        let bits = UInt16(truncatingIfNeeded: random.next())
                        if Self.decode(bits, exponentBits: e, mantissaBits: m).isFinite, abs(Self.decode(bits, exponentBits: e, mantissaBits: m)) < 1e4 { return bits }
                    }
                }
                let p = (0..<count).map { _ in randomBits() }
                let n = (0..<count).map { _ in randomBits() }
                var out = [UInt16](repeating: 0, count: count)
                let finite = p.withUnsafeBytes { pb in n.withUnsafeBytes { nb in out.withUnsafeMutableBytes { ob in
                    StageAveraging.average(dtype, previous: pb.baseAddress!, next: nb.baseAddress!, count: count, weightPrevious: wp, weightNext: wn, into: ob.baseAddress!)
                } } }
                #expect(finite)
                for i in stride(from: 0, to: count, by: 7) {
                    let (x, y) = (Self.decode(p[i], exponentBits: e, mantissaBits: m), Self.decode(n[i], exponentBits: e, mantissaBits: m))
                    let exact = (a * y + b * x) / (a + b)
                    Self.expectRounded(out[i], exact: exact, termScale: max(abs(x), abs(y)), table: table, format: (e, m), context: "\(dtype) element \(i), norms \(normPrevious), \(normNext)")
                }
            }
        }
    }

    /// Equal norms give weights of exactly ½: the average of two neighbouring
    /// 16-bit values is their exact midpoint, which must round to the even one.
    @Test(arguments: [DType.float16, .bfloat16], paths)
    func midpointsRoundToEven(dtype: DType, portable: Bool) {
        StageAveraging.forcePortable(portable)
        defer { StageAveraging.forcePortable(false) }
        let table = dtype == .float16 ? Self.halfValues : Self.bfloatValues
        let pairs = zip(table, table.dropFirst()).filter { $0.0.value != $0.1.value && $0.0.value != 0 && $0.1.value != 0 }
        let p = pairs.map(\.0.bits), n = pairs.map(\.1.bits)
        var out = [UInt16](repeating: 0, count: pairs.count)
        let (wp, wn) = StageAveraging.weights(normPrevious: 2.5, normNext: 2.5)!
        #expect(wp == 0.5 && wn == 0.5)
        _ = p.withUnsafeBytes { pb in n.withUnsafeBytes { nb in out.withUnsafeMutableBytes { ob in
            StageAveraging.average(dtype, previous: pb.baseAddress!, next: nb.baseAddress!, count: pairs.count, weightPrevious: wp, weightNext: wn, into: ob.baseAddress!)
        } } }
        for (i, pair) in pairs.enumerated() {
            let even = (pair.0.bits & 1) == 0 ? pair.0.bits : pair.1.bits
            #expect(out[i] == even, "\(dtype): midpoint of \(pair.0.value) and \(pair.1.value)")
        }
    }

    @Test(arguments: [DType.float32, .float16, .bfloat16], paths)
    func nonFiniteNeighboursAreReported(dtype: DType, portable: Bool) {
        StageAveraging.forcePortable(portable)
        defer { StageAveraging.forcePortable(false) }
        let size = Int(dtype.elementSizeBytes)
        let count = 1_000
        let specials: [UInt32] = dtype == .float32 ? [0x7FC0_0000, 0x7F80_0000, 0xFF80_0000] : (dtype == .float16 ? [0x7E00, 0x7C00, 0xFC00] : [0x7FC0, 0x7F80, 0xFF80])
        for special in specials {
            for side in 0..<2 {
                var p = [UInt8](repeating: 0, count: count * size), n = [UInt8](repeating: 0, count: count * size)
                withUnsafeBytes(of: special.littleEndian) { bytes in
                    if side == 0 { p.replaceSubrange(size * 777..<size * 778, with: bytes.prefix(size)) } else { n.replaceSubrange(size * 777..<size * 778, with: bytes.prefix(size)) }
                }
                var out = [UInt8](repeating: 0, count: count * size)
                let finite = StageAveraging.average(dtype, previous: p, next: n, count: count, weightPrevious: 0.5, weightNext: 0.5, into: &out)
                #expect(!finite, "\(dtype): special \(special) on side \(side) was not reported")
                #expect(!StageAveraging.allFinite(dtype, side == 0 ? p : n, count: count))
                var copied = [UInt8](repeating: 0, count: count * size)
                #expect(!StageAveraging.copy(dtype, source: side == 0 ? p : n, count: count, into: &copied))
            }
        }
        // The largest finite values are finite.
        let largest: [UInt8] = dtype == .float32 ? [0xFF, 0xFF, 0x7F, 0x7F] : (dtype == .float16 ? [0xFF, 0x7B] : [0x7F, 0x7F])
        #expect(StageAveraging.allFinite(dtype, largest, count: 1))
    }

    /// Norms that cannot weigh an average are refused, never trapped on.
    @Test func unusableNormsGiveNoWeights() {
        for (previous, next) in [(Double.nan, 1.0), (1, -1), (.infinity, 1), (.greatestFiniteMagnitude, .greatestFiniteMagnitude)] {
            #expect(StageAveraging.weights(normPrevious: previous, normNext: next) == nil, "\(previous), \(next)")
        }
    }

    @Test func copiesAreByteExact() {
        var random = Self.seeded("copiesAreByteExact")
        let bytes = (0..<(StageAveraging.chunkElements * 3 + 5)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        var out = [UInt8](repeating: 0, count: bytes.count)
        #expect(StageAveraging.copy(.bytes, source: bytes, count: bytes.count, into: &out))
        #expect(out == bytes)
    }
}

