import ArgumentParser
import CheckFree
import CISALReference
import Foundation
import SnapshotProtocol

struct CheckFreeBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkfree",
        abstract: "CheckFree stage reconstruction GB/s (weighted average of two neighbours, and a copy) vs memcpy of the same bytes.")

    @Option(help: "Bytes (MiB) of one stage's tensor: each neighbour holds this much, and so does the result.") var mib = 512
    @Option(help: "Timed rounds per figure; the best is reported.") var rounds = 5

    func run() throws {
        let bytes = mib << 20
        let buffers = AlignedBuffers(count: 3, byteCount: bytes, seed: 11)
        let (previous, next, output) = (UnsafeRawPointer(buffers.pointers[0]), UnsafeRawPointer(buffers.pointers[1]), buffers.pointers[2])
        // Normal finite values of either sign in every dtype, as a trained model
        // holds (random bit patterns would include NaN, infinity and subnormals).
        let halves = bytes / 2
        for (index, pointer) in buffers.pointers.prefix(2).enumerated() {
            let words = pointer.bindMemory(to: UInt16.self, capacity: halves)
            for i in 0..<halves { words[i] = UInt16(truncatingIfNeeded: (i + index) &* 2_654_435_761) & 0x83FF | 0x3C00 }
        }
        let copy = bestSeconds(rounds: rounds) { reference_memcpy_seconds(output, buffers.pointers[0], bytes, 1) }
        let cores = ProcessInfo.processInfo.activeProcessorCount
        print("CheckFree reconstruction of a \(mib) MiB stage tensor, best of \(rounds) rounds, \(cores) cores")
        print("GB/s counts result bytes per second (an average reads two neighbours per result byte);")
        print("ratio = reconstruction / memcpy of the same bytes on one core (glibc, measured in this run).")
        print(["operation", "GB/s", "memcpy", "ratio"].map { padded($0, 16) }.joined())
        func row(_ name: String, _ seconds: Double) {
            let rate = gigabytesPerSecond(bytes: bytes, seconds: seconds)
            let reference = gigabytesPerSecond(bytes: bytes, seconds: copy)
            print([name, format(rate), format(reference), format(rate / reference) + "×"].map { padded($0, 16) }.joined())
        }
        for dtype in [DType.float32, .bfloat16, .float16] {
            let count = bytes / Int(dtype.elementSizeBytes)
            let seconds = bestSeconds(rounds: rounds) {
                let start = nowSeconds()
                _ = StageAveraging.average(dtype, previous: previous, next: next, count: count, weightPrevious: 0.3, weightNext: 0.7, into: output)
                return nowSeconds() - start
            }
            row("average \(dtype)", seconds)
        }
        let copySeconds = bestSeconds(rounds: rounds) {
            let start = nowSeconds()
            _ = StageAveraging.copy(.bfloat16, source: previous, count: halves, into: output)
            return nowSeconds() - start
        }
        row("copy BF16", copySeconds)
    }
}
