import ArgumentParser
import CISALReference
import ErasureCoding

struct ErasureBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "erasure",
        abstract: "Reed-Solomon encode/decode GB/s of the Swift layer vs ISA-L from C vs memcpy.")

    @Option(help: "Fragment size in KiB.") var fragmentKiB = 1024
    @Option(help: "Timed rounds per figure; the best is reported.") var rounds = 7
    @Option(help: "Data bytes (MiB) processed per timed round.") var mibPerRound = 1024

    func run() throws {
        let fragmentBytes = fragmentKiB << 10
        print("Reed-Solomon (Cauchy) over ISA-L, fragment \(fragmentKiB) KiB, best of \(rounds) rounds")
        print("GB/s counts data bytes (k × fragment) per second; ratio = Swift / C on the same buffers.")
        print(["RS(k,m)", "memcpy", "enc Swift", "enc C", "ratio", "dec Swift", "dec C", "ratio"].map { padded($0, 10) }.joined())
        for (k, m) in [(4, 2), (8, 2), (10, 4)] {
            try measure(k: k, m: m, fragmentBytes: fragmentBytes)
        }
    }

    private func measure(k: Int, m: Int, fragmentBytes: Int) throws {
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        let buffers = AlignedBuffers(count: k + m, byteCount: fragmentBytes, seed: UInt64(k * 31 + m))
        let copyBuffers = AlignedBuffers(count: 2, byteCount: k * fragmentBytes, seed: 3)
        let dataBytes = k * fragmentBytes
        let iterations = max(4, (mibPerRound << 20) / dataBytes)
        let fragments = buffers.pointers
        let data = fragments[0..<k].map { UnsafeRawPointer($0) }
        let parity = Array(fragments[k...])
        let slots: [UnsafeMutableRawPointer?] = fragments
        let lost = Array(0..<m)

        var cPointers = fragments.map { $0.assumingMemoryBound(to: UInt8.self) as UnsafeMutablePointer<UInt8>? }
        let swiftEncode = try data.withUnsafeBufferPointer { d in
            try parity.withUnsafeBufferPointer { p in
                try bestSecondsThrowing(rounds: rounds) {
                    let start = nowSeconds()
                    for _ in 0..<iterations { try code.encode(data: d, parity: p, fragmentSizeBytes: fragmentBytes) }
                    return nowSeconds() - start
                }
            }
        }
        let cEncode = cPointers.withUnsafeMutableBufferPointer { all in
            bestSeconds(rounds: rounds) {
                isal_reference_encode_seconds(Int32(k), Int32(m), Int32(fragmentBytes), all.baseAddress!, all.baseAddress! + k, Int32(iterations))
            }
        }
        let swiftDecode = try slots.withUnsafeBufferPointer { s in
            try bestSecondsThrowing(rounds: rounds) {
                let start = nowSeconds()
                for _ in 0..<iterations { try code.reconstruct(fragments: s, rebuilding: lost, fragmentSizeBytes: fragmentBytes) }
                return nowSeconds() - start
            }
        }
        let cDecode = cPointers.withUnsafeMutableBufferPointer { all in
            bestSeconds(rounds: rounds) {
                isal_reference_decode_seconds(Int32(k), Int32(m), Int32(m), Int32(fragmentBytes), all.baseAddress!, Int32(iterations))
            }
        }
        let copy = bestSeconds(rounds: rounds) {
            reference_memcpy_seconds(copyBuffers.pointers[0], copyBuffers.pointers[1], dataBytes, Int32(iterations))
        }
        let total = dataBytes * iterations
        let figures = [copy, swiftEncode, cEncode].map { gigabytesPerSecond(bytes: total, seconds: $0) }
        let decodes = [swiftDecode, cDecode].map { gigabytesPerSecond(bytes: total, seconds: $0) }
        let row = ["RS(\(k),\(m))", format(figures[0]), format(figures[1]), format(figures[2]), format(cEncode / swiftEncode) + "×",
                   format(decodes[0]), format(decodes[1]), format(cDecode / swiftDecode) + "×"]
        print(row.map { padded($0, 10) }.joined())
    }
}

func bestSecondsThrowing(rounds: Int, _ body: () throws -> Double) throws -> Double {
    var best = Double.infinity
    for _ in 0..<rounds { best = min(best, try body()) }
    return best
}
