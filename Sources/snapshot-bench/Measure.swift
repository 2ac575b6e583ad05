import Glibc

/// Monotonic seconds.
func nowSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Best (shortest) of `rounds` timings: the least disturbed by other load.
func bestSeconds(rounds: Int, _ body: () -> Double) -> Double {
    var best = Double.infinity
    for _ in 0..<rounds { best = min(best, body()) }
    return best
}

func gigabytesPerSecond(bytes: Int, seconds: Double) -> Double { Double(bytes) / seconds / 1e9 }

func format(_ value: Double, _ digits: Int = 2) -> String {
    var text = String(Int((value * pow(10, Double(digits))).rounded()))
    while text.count <= digits { text = "0" + text }
    text.insert(".", at: text.index(text.endIndex, offsetBy: -digits))
    return text
}

func padded(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : String(repeating: " ", count: width - text.count) + text
}

/// Page-aligned buffers, filled so every page is faulted in before timing.
final class AlignedBuffers {
    let pointers: [UnsafeMutableRawPointer]
    let byteCount: Int

    init(count: Int, byteCount: Int, seed: UInt64) {
        self.byteCount = byteCount
        var state = seed
        pointers = (0..<count).map { _ in
            let pointer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 4096)
            let words = pointer.bindMemory(to: UInt64.self, capacity: byteCount / 8)
            for i in 0..<(byteCount / 8) {
                state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                words[i] = state
            }
            return pointer
        }
    }

    deinit { pointers.forEach { $0.deallocate() } }
}
