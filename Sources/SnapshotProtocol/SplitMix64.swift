/// SplitMix64 (Steele, Lea and Flood): a small, fast generator whose sequence
/// depends only on its seed, so the simulation, randomized tests, the demo's
/// synthetic state and benchmarks replay exactly from a printed seed. The one
/// copy in the project. Never for secrets (``SystemRandomNumberGenerator`` is).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A value in 0..<bound (0 when bound is 0); modulo bias is irrelevant at
    /// the bounds the tests use and keeps sequences stable across versions.
    public mutating func next(below bound: UInt64) -> UInt64 { bound == 0 ? 0 : next() % bound }

    /// True with `probability` (0 never, 1 always).
    public mutating func chance(_ probability: Double) -> Bool {
        probability > 0 && Double(next() >> 11) / Double(UInt64(1) << 53) < probability
    }

    /// Fills `buffer` a word at a time; a tail shorter than a word takes the
    /// low bytes of one more word.
    public mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        var offset = 0
        while offset + 8 <= buffer.count {
            buffer.storeBytes(of: next().littleEndian, toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
        guard offset < buffer.count else { return }
        var tail = next()
        while offset < buffer.count {
            buffer[offset] = UInt8(truncatingIfNeeded: tail)
            tail >>= 8
            offset += 1
        }
    }
}
