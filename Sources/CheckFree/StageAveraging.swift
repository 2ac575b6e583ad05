import CStageAveraging
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
    /// Nil when the norms are not finite and non-negative, or so large that `a + b` overflows.
    public static func weights(normPrevious: Double, normNext: Double) -> (previous: Double, next: Double)? {
        guard normPrevious.isFinite, normPrevious >= 0, normNext.isFinite, normNext >= 0 else { return nil }
        let a = normNext + 1e-4
        let b = normPrevious + 1e-4
        guard (a + b).isFinite else { return nil }
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
            // The inner loops are C (CStageAveraging): one build runs AVX2 and
            // F16C where the CPU has them and portable code elsewhere.
            let (start, length) = (range.lowerBound, range.count)
            if dtype == .float32 {
                let (p, n, o) = (previous.assumingMemoryBound(to: Float.self), next.assumingMemoryBound(to: Float.self), output.assumingMemoryBound(to: Float.self))
                return stage_average_f32(p + start, n + start, length, wp, wn, o + start) != 0
            }
            let (p, n, o) = (previous.assumingMemoryBound(to: UInt16.self), next.assumingMemoryBound(to: UInt16.self), output.assumingMemoryBound(to: UInt16.self))
            let loop = dtype == .bfloat16 ? stage_average_bf16 : stage_average_f16
            return loop(p + start, n + start, length, wp, wn, o + start) != 0
        }
    }

    /// Whether the vectorized (AVX2 + F16C) loops run on this CPU.
    public static var usesAVX2: Bool { stage_averaging_uses_avx2() != 0 }

    /// Tests: run the portable loops even where AVX2 is available.
    public static func forcePortable(_ force: Bool) { stage_averaging_force_portable(force ? 1 : 0) }

    /// Copies `count` elements; for float dtypes, false if the source holds a NaN or an infinity.
    public static func copy(_ dtype: DType, source: UnsafeRawPointer, count: Int, into output: UnsafeMutableRawPointer) -> Bool {
        let size = Int(dtype.elementSizeBytes)
        // Each chunk is checked right after it is copied, while it is still in cache.
        return parallelChunks(count) { range in
            (output + range.lowerBound * size).copyMemory(from: source + range.lowerBound * size, byteCount: range.count * size)
            return finite(dtype, source, range)
        }
    }

    /// Whether every element of a float tensor is finite (other dtypes: true).
    public static func allFinite(_ dtype: DType, _ data: UnsafeRawPointer, count: Int) -> Bool {
        parallelChunks(count) { finite(dtype, data, $0) }
    }

    static func finite(_ dtype: DType, _ data: UnsafeRawPointer, _ range: Range<Int>) -> Bool {
        switch dtype {
        case .float32: finiteBits(data.assumingMemoryBound(to: UInt32.self), range, exponentMask: 0x7F80_0000)
        case .float64: finiteBits(data.assumingMemoryBound(to: UInt64.self), range, exponentMask: 0x7FF0_0000_0000_0000)
        case .bfloat16: finiteBits(data.assumingMemoryBound(to: UInt16.self), range, exponentMask: 0x7F80)
        case .float16: finiteBits(data.assumingMemoryBound(to: UInt16.self), range, exponentMask: 0x7C00)
        default: true
        }
    }

    // MARK: Finiteness

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

    // MARK: Conversions (exact, round to nearest even; the C loops use the same arithmetic)

    public static func floatFromBFloat16(_ bits: UInt16) -> Float { stage_bf16_to_float(bits) }

    /// Round to nearest even; overflow goes to infinity (NaN: not handled,
    /// as the loops refuse non-finite inputs).
    public static func bfloat16Bits(_ value: Float) -> UInt16 { stage_float_to_bf16(value) }

    /// IEEE half → float, exactly (subnormals, infinities and NaNs included).
    public static func floatFromFloat16(_ bits: UInt16) -> Float { stage_f16_to_float(bits) }

    /// Float → IEEE half, round to nearest even (overflow → ±infinity, NaN → quiet NaN).
    public static func float16Bits(_ value: Float) -> UInt16 { stage_float_to_f16(value) }

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
