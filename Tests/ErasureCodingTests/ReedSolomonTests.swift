import ErasureCoding
import SnapshotProtocol
import Glibc
import Testing

let codeShapes: [(k: Int, m: Int)] = [(1, 1), (2, 1), (3, 1), (4, 2), (6, 2), (8, 3), (10, 4)]
let oddLengths = [1, 31, 4097, (1 << 20) - 1]

@Suite("Reed-Solomon over ISA-L")
struct ReedSolomonTests {
    /// Every erasure pattern of 1...m lost fragments (data and/or parity) rebuilds byte-identical.
    @Test(arguments: codeShapes.flatMap { shape in oddLengths.map { (shape.k, shape.m, $0) } })
    func everyErasurePatternReconstructs(k: Int, m: Int, length: Int) throws {
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        let original = FragmentBuffers(count: k + m, length: length)
        var rng = SplitMix64(seed: UInt64(k * 1000 + m * 100 + length))
        for i in 0..<k { rng.fill(original[i]) }
        try code.encode(data: (0..<k).map { UnsafeRawBufferPointer(original[$0]) }, parity: (k..<(k + m)).map { original[$0] })

        let work = FragmentBuffers(count: k + m, length: length)
        var patterns = 0
        for lostCount in 1...m {
            for lost in combinations(of: k + m, choose: lostCount) {
                for i in 0..<(k + m) {
                    if lost.contains(i) {
                        memset(work[i].baseAddress!, 0xA5, length)  // garbage where the lost fragment was
                    } else {
                        memcpy(work[i].baseAddress!, original[i].baseAddress!, length)
                    }
                }
                try code.reconstruct(fragments: (0..<(k + m)).map { work[$0] }, rebuilding: lost)
                for i in lost {
                    #expect(work.equal(i, UnsafeRawBufferPointer(original[i])), "k=\(k) m=\(m) len=\(length) lost=\(lost) fragment \(i)")
                }
                patterns += 1
            }
        }
        #expect(patterns == (1...m).reduce(0) { $0 + combinations(of: k + m, choose: $1).count })
    }

    /// Survivors may be any k of the fragments, not just "all but the lost ones".
    @Test func reconstructsFromAnyKSurvivorsWhenOthersAreUnavailable() throws {
        let (k, m, length) = (4, 3, 1000)
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        let original = FragmentBuffers(count: k + m, length: length)
        var rng = SplitMix64(seed: 7)
        for i in 0..<k { rng.fill(original[i]) }
        try code.encode(data: (0..<k).map { UnsafeRawBufferPointer(original[$0]) }, parity: (k..<(k + m)).map { original[$0] })
        // Fragments 0 and 5 are gone; 2 is unavailable too (its node is slow): rebuild 0 and 5 from {1, 3, 4, 6}.
        let work = FragmentBuffers(count: k + m, length: length)
        for i in [1, 3, 4, 6] { memcpy(work[i].baseAddress!, original[i].baseAddress!, length) }
        var slots: [UnsafeMutableRawBufferPointer?] = (0..<(k + m)).map { work[$0] }
        slots[2] = nil
        try code.reconstruct(fragments: slots, rebuilding: [5, 0])
        #expect(work.equal(0, UnsafeRawBufferPointer(original[0])))
        #expect(work.equal(5, UnsafeRawBufferPointer(original[5])))
    }

    /// Folding data fragments into zeroed parity one at a time, in any order, equals a full encode.
    @Test(arguments: codeShapes)
    func incrementalEncodeEqualsFullEncode(k: Int, m: Int) throws {
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        for length in [1, 31, 4097, 65_537] {
            let full = FragmentBuffers(count: k + m, length: length)
            var rng = SplitMix64(seed: UInt64(length * 31 + k))
            for i in 0..<k { rng.fill(full[i]) }
            try code.encode(data: (0..<k).map { UnsafeRawBufferPointer(full[$0]) }, parity: (k..<(k + m)).map { full[$0] })

            let incremental = FragmentBuffers(count: m, length: length)
            for dataIndex in (0..<k).shuffled(using: &rng) {
                for row in 0..<m {
                    try code.accumulate(dataIndex: dataIndex, data: UnsafeRawBufferPointer(full[dataIndex]), parityRow: row, parity: incremental[row])
                }
            }
            for row in 0..<m {
                #expect(incremental.equal(row, UnsafeRawBufferPointer(full[k + row])), "k=\(k) m=\(m) len=\(length) row \(row)")
            }
        }
    }

    /// Accumulating several parity rows in one call matches row-at-a-time.
    @Test func incrementalEncodeOfSeveralRowsAtOnce() throws {
        let (k, m, length) = (6, 3, 4099)
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        let full = FragmentBuffers(count: k + m, length: length)
        var rng = SplitMix64(seed: 99)
        for i in 0..<k { rng.fill(full[i]) }
        try code.encode(data: (0..<k).map { UnsafeRawBufferPointer(full[$0]) }, parity: (k..<(k + m)).map { full[$0] })
        let rows = FragmentBuffers(count: 2, length: length)
        let pointers = [rows[0].baseAddress!, rows[1].baseAddress!]
        for dataIndex in 0..<k {
            try pointers.withUnsafeBufferPointer {
                try code.accumulate(dataIndex: dataIndex, data: full[dataIndex].baseAddress!, intoParityRowsFrom: 1, parity: $0, fragmentSizeBytes: length)
            }
        }
        #expect(rows.equal(0, UnsafeRawBufferPointer(full[k + 1])))
        #expect(rows.equal(1, UnsafeRawBufferPointer(full[k + 2])))
    }

    /// Repair pipelining: each survivor folds coefficient × its fragment into a
    /// running partial, slice by slice and in chain order; the final partial
    /// is the lost fragment, for every target and every set of k survivors.
    @Test(arguments: [(2, 1), (4, 2), (5, 3)])
    func pipelinedRepairEqualsTheLostFragment(k: Int, m: Int) throws {
        let length = 5000  // slices of 1536 bytes: three full and a short tail
        let sliceBytes = 1536
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        let original = FragmentBuffers(count: k + m, length: length)
        var rng = SplitMix64(seed: UInt64(k * 10 + m))
        for i in 0..<k { rng.fill(original[i]) }
        try code.encode(data: (0..<k).map { UnsafeRawBufferPointer(original[$0]) }, parity: (k..<(k + m)).map { original[$0] })
        let partial = FragmentBuffers(count: 1, length: length)
        var checked = 0
        for target in 0..<(k + m) {
            for survivors in combinations(of: k + m, choose: k) where !survivors.contains(target) {
                let terms = try code.repairCoefficients(survivors: FragmentSet(survivors), target: target)
                #expect(terms.map(\.index) == survivors)
                memset(partial[0].baseAddress!, 0xEE, length)
                for offset in stride(from: 0, to: length, by: sliceBytes) {
                    let count = min(sliceBytes, length - offset)
                    memset(partial[0].baseAddress! + offset, 0, count)
                    for term in terms.reversed() {  // the chain's order does not matter
                        GFMultiplier(coefficient: term.coefficient).multiplyAdd(
                            from: original[term.index].baseAddress! + offset, into: partial[0].baseAddress! + offset, count: count)
                    }
                }
                #expect(partial.equal(0, UnsafeRawBufferPointer(original[target])), "k=\(k) m=\(m) target \(target) from \(survivors)")
                checked += 1
            }
        }
        #expect(checked == (k + m) * combinations(of: k + m - 1, choose: k).count)
        #expect(throws: ErasureCodingError.notEnoughSurvivors(available: k - 1, required: k)) {
            try code.repairCoefficients(survivors: FragmentSet(1..<k), target: 0)
        }
        #expect(throws: ErasureCodingError.notEnoughSurvivors(available: k - 1, required: k)) {
            try code.repairCoefficients(survivors: FragmentSet(0..<k), target: 0)
        }
        #expect(throws: ErasureCodingError.indexOutOfRange(k + m, count: k + m)) {
            try code.repairCoefficients(survivors: FragmentSet(0..<k), target: k + m)
        }
    }

    @Test func constructionErrors() {
        #expect(throws: ErasureCodingError.invalidDataFragmentCount(0)) { try ReedSolomon(dataFragmentCount: 0, parityFragmentCount: 1) }
        #expect(throws: ErasureCodingError.invalidParityFragmentCount(-1)) { try ReedSolomon(dataFragmentCount: 4, parityFragmentCount: -1) }
        #expect(throws: ErasureCodingError.tooManyFragments(total: 257, limit: 256)) { try ReedSolomon(dataFragmentCount: 200, parityFragmentCount: 57) }
        #expect(throws: Never.self) { try ReedSolomon(dataFragmentCount: 200, parityFragmentCount: 56) }
        #expect(throws: Never.self) { try ReedSolomon(dataFragmentCount: 3, parityFragmentCount: 0) }
    }

    @Test func callErrors() throws {
        let code = try ReedSolomon(dataFragmentCount: 3, parityFragmentCount: 2)
        let buffers = FragmentBuffers(count: 5, length: 64)
        let short = UnsafeMutableRawBufferPointer(rebasing: buffers[4][0..<63])
        #expect(throws: ErasureCodingError.fragmentLengthMismatch(expected: 64, actual: 63, index: 4)) {
            try code.encode(data: (0..<3).map { UnsafeRawBufferPointer(buffers[$0]) }, parity: [buffers[3], short])
        }
        #expect(throws: ErasureCodingError.fragmentCountMismatch(expected: 3, actual: 2)) {
            try code.encode(data: (0..<2).map { UnsafeRawBufferPointer(buffers[$0]) }, parity: [buffers[3], buffers[4]])
        }
        let all: [UnsafeMutableRawBufferPointer?] = (0..<5).map { buffers[$0] }
        #expect(throws: ErasureCodingError.tooManyLost(lost: 3, tolerated: 2)) { try code.reconstruct(fragments: all, rebuilding: [0, 1, 2]) }
        #expect(throws: ErasureCodingError.duplicateIndex(1)) { try code.reconstruct(fragments: all, rebuilding: [1, 1]) }
        #expect(throws: ErasureCodingError.indexOutOfRange(5, count: 5)) { try code.reconstruct(fragments: all, rebuilding: [5]) }
        #expect(throws: ErasureCodingError.indexOutOfRange(-1, count: 5)) { try code.reconstruct(fragments: all, rebuilding: [-1]) }
        var sparse = all
        sparse[0] = nil
        sparse[1] = nil
        #expect(throws: ErasureCodingError.notEnoughSurvivors(available: 2, required: 3)) { try code.reconstruct(fragments: sparse, rebuilding: [2]) }
        #expect(throws: ErasureCodingError.fragmentCountMismatch(expected: 5, actual: 4)) { try code.reconstruct(fragments: Array(all.prefix(4)), rebuilding: [0]) }
        #expect(throws: ErasureCodingError.indexOutOfRange(3, count: 3)) {
            try code.accumulate(dataIndex: 3, data: UnsafeRawBufferPointer(buffers[0]), parityRow: 0, parity: buffers[3])
        }
        #expect(throws: ErasureCodingError.indexOutOfRange(2, count: 2)) {
            try code.accumulate(dataIndex: 0, data: UnsafeRawBufferPointer(buffers[0]), parityRow: 2, parity: buffers[3])
        }
        #expect(throws: ErasureCodingError.fragmentTooLarge(bytes: Int(Int32.max) + 1, limit: Int(Int32.max))) {
            try [UnsafeMutableRawPointer?](repeating: buffers[0].baseAddress!, count: 5).withUnsafeBufferPointer {
                try code.reconstruct(fragments: $0, rebuilding: [0], fragmentSizeBytes: Int(Int32.max) + 1)
            }
        }
    }

    /// Descriptions are what operators read in logs; they must name the numbers.
    @Test func errorsDescribeThemselves() {
        #expect(ErasureCodingError.tooManyLost(lost: 3, tolerated: 2).description == "3 fragments lost, this code tolerates 2")
    }
}

@Suite("Checksums over ISA-L")
struct ChecksumTests {
    let check = Array("123456789".utf8)

    @Test func crc32cCheckValue() { #expect(CRC32C.checksum(check) == 0xE306_9283) }
    @Test func crc64XZCheckValue() { #expect(CRC64.checksum(check) == 0x995D_C9BB_DF19_39FA) }
    @Test func emptyInputIsZero() {
        #expect(CRC32C.checksum([UInt8]()) == 0)
        #expect(CRC64.checksum([UInt8]()) == 0)
    }

    @Test func chainingEqualsWhole() {
        var rng = SplitMix64(seed: 5)
        let bytes = (0..<10_007).map { _ in UInt8.random(in: 0...255, using: &rng) }
        for split in [0, 1, 4096, 5000, 10_006, 10_007] {
            let head = Array(bytes[..<split]), tail = Array(bytes[split...])
            #expect(CRC32C.checksum(tail, seed: CRC32C.checksum(head)) == CRC32C.checksum(bytes))
            #expect(CRC64.checksum(tail, seed: CRC64.checksum(head)) == CRC64.checksum(bytes))
        }
    }

    @Test func detectsASingleFlippedBit() {
        var bytes = check
        bytes[4] ^= 0x10
        #expect(CRC32C.checksum(bytes) != 0xE306_9283)
        #expect(CRC64.checksum(bytes) != 0x995D_C9BB_DF19_39FA)
    }
}
