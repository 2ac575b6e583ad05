import ErasureCoding
import Glibc

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
