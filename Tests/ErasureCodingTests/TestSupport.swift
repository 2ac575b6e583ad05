import ErasureCoding
import Glibc

/// Deterministic, fast pseudo-random bytes (SplitMix64), so failures reproduce.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        var offset = 0
        while offset + 8 <= buffer.count {
            buffer.storeBytes(of: next(), toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
        var tail = next()
        while offset < buffer.count {
            buffer[offset] = UInt8(truncatingIfNeeded: tail)
            tail >>= 8
            offset += 1
        }
    }
}

/// k + m fragment buffers of one length, owned by the test.
final class FragmentBuffers {
    let length: Int
    let buffers: [UnsafeMutableRawBufferPointer]

    init(count: Int, length: Int) {
        self.length = length
        buffers = (0..<count).map { _ in
            UnsafeMutableRawBufferPointer.allocate(byteCount: max(length, 1), alignment: 1)
        }
        for buffer in buffers { memset(buffer.baseAddress!, 0, buffer.count) }
    }

    deinit { buffers.forEach { $0.deallocate() } }

    subscript(index: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: buffers[index][0..<length])
    }

    func equal(_ index: Int, _ other: UnsafeRawBufferPointer) -> Bool {
        other.count == length && memcmp(buffers[index].baseAddress!, other.baseAddress!, length) == 0
    }
}

func combinations(of n: Int, choose r: Int) -> [[Int]] {
    guard r > 0 else { return [[]] }
    guard r <= n else { return [] }
    var result: [[Int]] = []
    var current: [Int] = []
    func walk(_ start: Int) {
        if current.count == r {
            result.append(current)
            return
        }
        for i in start..<n where n - i >= r - current.count {
            current.append(i)
            walk(i + 1)
            current.removeLast()
        }
    }
    walk(0)
    return result
}
