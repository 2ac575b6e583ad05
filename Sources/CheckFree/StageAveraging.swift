import Dispatch
public import SnapshotProtocol
import Synchronization

/// The arithmetic of CheckFree: per tensor, `out = wNext·next + wPrevious·previous`
/// (the weights are `a/(a+b)` and `b/(a+b)`, computed in double precision),
/// or a plain copy. fp32, fp16 and bf16 compute in fp32 and round to nearest
/// even. Pure functions over memory; chunks run in parallel.
public enum StageAveraging {
    /// Elements per parallel chunk: large enough to amortize dispatch, small
    /// enough to spread a multi-GB tensor over every core.
    public static let chunkElements = 1 << 18

    /// Dtypes that can be averaged.
    public static func canAverage(_ dtype: DType) -> Bool {
        switch dtype {
        case .float32, .float16, .bfloat16: true
        default: false
        }
    }

    /// `(wPrevious, wNext)` for gradient norms `normPrevious = ‖g_{i−1}‖`, `normNext = ‖g_{i+1}‖`:
    /// `a = normNext + 1e-4`, `b = normPrevious + 1e-4`, weights `b/(a+b)` and `a/(a+b)`.
    public static func weights(normPrevious: Double, normNext: Double) -> (previous: Double, next: Double) {
        precondition(normPrevious.isFinite && normPrevious >= 0 && normNext.isFinite && normNext >= 0)
        let a = normNext + 1e-4
        let b = normPrevious + 1e-4
        return (b / (a + b), a / (a + b))
    }

    /// Writes the weighted average of `count` elements of `previous` and
    /// `next` to `output`. Returns false, leaving `output` partly written, if
    /// either input holds a NaN or an infinity (the caller refuses: averaging
    /// would spread it into the rebuilt stage).
    public static func average(
        _ dtype: DType, previous: UnsafeRawPointer, next: UnsafeRawPointer, count: Int,
        weightPrevious: Double, weightNext: Double, into output: UnsafeMutableRawPointer
    ) -> Bool {
        precondition(canAverage(dtype), "\(dtype) cannot be averaged")
        let wp = Float(weightPrevious)
        let wn = Float(weightNext)
        return parallelChunks(count) { range in
            switch dtype {
            case .float32:
                averageFloat32(previous.assumingMemoryBound(to: Float.self), next.assumingMemoryBound(to: Float.self), range, wp, wn, output.assumingMemoryBound(to: Float.self))
            case .bfloat16:
                averageBFloat16(previous.assumingMemoryBound(to: UInt16.self), next.assumingMemoryBound(to: UInt16.self), range, wp, wn, output.assumingMemoryBound(to: UInt16.self))
            default:
                averageFloat16(previous.assumingMemoryBound(to: UInt16.self), next.assumingMemoryBound(to: UInt16.self), range, wp, wn, output.assumingMemoryBound(to: UInt16.self))
            }
        }
    }

    /// Copies `count` elements; for float dtypes, false if the source holds a NaN or an infinity.
    public static func copy(_ dtype: DType, source: UnsafeRawPointer, count: Int, into output: UnsafeMutableRawPointer) -> Bool {
        let bytes = count * Int(dtype.elementSizeBytes)
        return parallelChunks(bytes) { range in
            (output + range.lowerBound).copyMemory(from: source + range.lowerBound, byteCount: range.count)
            return true
        } && allFinite(dtype, source, count: count)
    }

    /// Whether every element of a float tensor is finite (other dtypes: true).
    public static func allFinite(_ dtype: DType, _ data: UnsafeRawPointer, count: Int) -> Bool {
        switch dtype {
        case .float32: return parallelChunks(count) { finiteBits(data.assumingMemoryBound(to: UInt32.self), $0, exponentMask: 0x7F80_0000) }
        case .float64: return parallelChunks(count) { finiteBits(data.assumingMemoryBound(to: UInt64.self), $0, exponentMask: 0x7FF0_0000_0000_0000) }
        case .bfloat16: return parallelChunks(count) { finiteBits(data.assumingMemoryBound(to: UInt16.self), $0, exponentMask: 0x7F80) }
        case .float16: return parallelChunks(count) { finiteBits(data.assumingMemoryBound(to: UInt16.self), $0, exponentMask: 0x7C00) }
        default: return true
        }
    }

    // MARK: Kernels (plain loops the optimizer vectorizes)

    @inline(__always)
    static func averageFloat32(_ p: UnsafePointer<Float>, _ n: UnsafePointer<Float>, _ range: Range<Int>, _ wp: Float, _ wn: Float, _ o: UnsafeMutablePointer<Float>) -> Bool {
        var nonFinite: UInt32 = 0
        for i in range {
            let x = p[i], y = n[i]
            nonFinite |= nonFiniteBit(x.bitPattern, exponentMask: 0x7F80_0000) | nonFiniteBit(y.bitPattern, exponentMask: 0x7F80_0000)
            o[i] = wp * x + wn * y
        }
        return nonFinite == 0
    }

    @inline(__always)
    static func averageBFloat16(_ p: UnsafePointer<UInt16>, _ n: UnsafePointer<UInt16>, _ range: Range<Int>, _ wp: Float, _ wn: Float, _ o: UnsafeMutablePointer<UInt16>) -> Bool {
        var nonFinite: UInt16 = 0
        for i in range {
            let x = p[i], y = n[i]
            nonFinite |= nonFiniteBit(x, exponentMask: 0x7F80) | nonFiniteBit(y, exponentMask: 0x7F80)
            o[i] = bfloat16Bits(wp * floatFromBFloat16(x) + wn * floatFromBFloat16(y))
        }
        return nonFinite == 0
    }

    @inline(__always)
    static func averageFloat16(_ p: UnsafePointer<UInt16>, _ n: UnsafePointer<UInt16>, _ range: Range<Int>, _ wp: Float, _ wn: Float, _ o: UnsafeMutablePointer<UInt16>) -> Bool {
        var nonFinite: UInt16 = 0
        for i in range {
            let x = p[i], y = n[i]
            nonFinite |= nonFiniteBit(x, exponentMask: 0x7C00) | nonFiniteBit(y, exponentMask: 0x7C00)
            o[i] = float16Bits(wp * floatFromFloat16(x) + wn * floatFromFloat16(y))
        }
        return nonFinite == 0
    }

    /// The sign bit's position set when `bits` is NaN or infinite: its
    /// exponent bits are all ones exactly when adding the exponent's lowest
    /// bit to them carries into the sign position. Branch-free.
    @inline(__always)
    static func nonFiniteBit<T: FixedWidthInteger & UnsignedInteger>(_ bits: T, exponentMask: T) -> T {
        let lowest = exponentMask & (~exponentMask &+ 1)
        let top = T(1) << (T.bitWidth - 1)
        return ((bits & exponentMask) &+ lowest) & top
    }

    @inline(__always)
    static func finiteBits<T: FixedWidthInteger & UnsignedInteger>(_ data: UnsafePointer<T>, _ range: Range<Int>, exponentMask: T) -> Bool {
        var nonFinite: T = 0
        for i in range { nonFinite |= nonFiniteBit(data[i], exponentMask: exponentMask) }
        return nonFinite == 0
    }

    // MARK: Conversions (branch-free, so loops vectorize; exact, RNE)

    @inline(__always)
    public static func floatFromBFloat16(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

    /// Round to nearest even; NaN stays a (quiet) NaN of the same sign.
    @inline(__always)
    public static func bfloat16Bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let isNaN = (bits & 0x7FFF_FFFF) > 0x7F80_0000
        let rounded = UInt16(truncatingIfNeeded: (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16)
        return isNaN ? UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 : rounded
    }

    /// IEEE half → float, exactly (subnormals, infinities and NaNs included).
    @inline(__always)
    public static func floatFromFloat16(_ h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let magnitude = UInt32(h & 0x7FFF)
        let exponent = magnitude & 0x7C00
        // Normal numbers: rebias the exponent (112 = 127 − 15).
        let normal = Float(bitPattern: (magnitude << 13) &+ (112 << 23))
        // Subnormals and zero: the mantissa times 2^-24, exact in float.
        let subnormal = Float(magnitude) * Float(bitPattern: 0x3380_0000)
        // Infinity and NaN: all-ones exponent, mantissa carried over.
        let special = Float(bitPattern: 0x7F80_0000 | (magnitude & 0x03FF) << 13)
        let value = exponent == 0 ? subnormal : (exponent == 0x7C00 ? special : normal)
        return Float(bitPattern: value.bitPattern | sign)
    }

    /// Float → IEEE half, round to nearest even (overflow → ±infinity, NaN → quiet NaN).
    @inline(__always)
    public static func float16Bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (bits >> 16) & 0x8000)
        let magnitude = bits & 0x7FFF_FFFF
        // ≥ 65520 rounds to infinity; NaN stays NaN.
        let overflow: UInt16 = magnitude > 0x7F80_0000 ? 0x7E00 : 0x7C00
        // Below 2^-14 the result is subnormal: adding 0.5 aligns the mantissa so
        // the FPU's own round-to-nearest-even does the rounding.
        let subnormal = UInt16(truncatingIfNeeded: (Float(bitPattern: magnitude) + 0.5).bitPattern &- 0x3F00_0000)
        // Normal: rebias and round the 13 dropped bits to nearest even.
        let odd = (magnitude >> 13) & 1
        let normal = UInt16(truncatingIfNeeded: (magnitude &- (112 << 23) &+ 0x0FFF &+ odd) >> 13)
        let result = magnitude >= 0x4780_0000 ? overflow : (magnitude < 0x3880_0000 ? subnormal : normal)
        return result | sign
    }

    // MARK: Parallelism

    /// Runs `body` over `0..<count` in chunks on every core; true if every chunk returned true.
    static func parallelChunks(_ count: Int, _ body: (Range<Int>) -> Bool) -> Bool {
        guard count > chunkElements else { return body(0..<count) }
        let chunks = (count + chunkElements - 1) / chunkElements
        let failed = Atomic<Bool>(false)
        withoutActuallyEscaping(body) { body in
            // Each chunk touches its own range of the buffers `body` captured: no shared mutable state.
            nonisolated(unsafe) let body = body
            DispatchQueue.concurrentPerform(iterations: chunks) { chunk in
                let start = chunk * chunkElements
                if !body(start..<min(count, start + chunkElements)) { failed.store(true, ordering: .relaxed) }
            }
        }
        return !failed.load(ordering: .relaxed)
    }
}
