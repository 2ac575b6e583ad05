import ErasureCoding
import SnapshotProtocol
import Glibc
import Testing

@Suite("Stripe layout across a protection group")
struct StripeLayoutTests {
    static let allShapes: [(n: Int, m: Int)] = (1...10).flatMap { n in (0..<n).map { (n, $0) } }

    /// For every n ≤ 10 and m < n: each node is a data source in exactly k stripes
    /// and a parity holder in exactly m; no stripe has two fragments on one node;
    /// roles, placements, holders and sources agree with each other.
    @Test func invariantsHoldExhaustively() throws {
        for (n, m) in Self.allShapes {
            let layout = try StripeLayout(groupSize: n, parityCount: m)
            let k = n - m
            var dataStripes = [Int](repeating: 0, count: n)
            var parityStripes = [Int](repeating: 0, count: n)
            for stripe in 0..<n {
                var nodesInStripe = Set<Int>()
                for row in 0..<m {
                    let holder = try layout.parityHolder(stripe: stripe, row: row)
                    #expect(nodesInStripe.insert(holder).inserted, "n=\(n) m=\(m) stripe \(stripe): node \(holder) twice")
                    #expect(try layout.role(node: holder, stripe: stripe) == .parity(row: row))
                    parityStripes[holder] += 1
                }
                for slot in 0..<k {
                    let source = try layout.dataSource(stripe: stripe, slot: slot)
                    #expect(nodesInStripe.insert(source).inserted, "n=\(n) m=\(m) stripe \(stripe): node \(source) twice")
                    guard case .data(let roleSlot, let fragment) = try layout.role(node: source, stripe: stripe) else {
                        Issue.record("n=\(n) m=\(m): source \(source) of stripe \(stripe) is not a data role")
                        continue
                    }
                    #expect(roleSlot == slot)
                    let placement = try layout.placement(node: source, fragment: fragment)
                    #expect(placement.stripe == stripe && placement.slot == slot)
                    #expect(placement.parityHolders == (0..<m).map { try! layout.parityHolder(stripe: stripe, row: $0) })
                    dataStripes[source] += 1
                }
                #expect(nodesInStripe.count == n)
            }
            #expect(dataStripes == [Int](repeating: k, count: n), "n=\(n) m=\(m)")
            #expect(parityStripes == [Int](repeating: m, count: n), "n=\(n) m=\(m)")
            for node in 0..<n {
                let fragmentsStripes = Set((0..<k).map { try! layout.placement(node: node, fragment: $0).stripe })
                #expect(fragmentsStripes.count == k, "a node's k fragments go to k distinct stripes")
                for (stripe, row) in try layout.parityStripes(node: node) {
                    #expect(try layout.parityHolder(stripe: stripe, row: row) == node)
                }
            }
        }
    }

    /// Every set of m lost nodes loses at most m fragments of every stripe.
    @Test func everySetOfMLostNodesIsRecoverable() throws {
        for (n, m) in Self.allShapes where m > 0 {
            let layout = try StripeLayout(groupSize: n, parityCount: m)
            for lost in combinations(of: n, choose: m) {
                for stripe in 0..<n {
                    let members = (0..<m).map { try! layout.parityHolder(stripe: stripe, row: $0) }
                        + (0..<(n - m)).map { try! layout.dataSource(stripe: stripe, slot: $0) }
                    let lostInStripe = members.filter(lost.contains).count
                    #expect(lostInStripe <= m, "n=\(n) m=\(m) lost=\(lost) stripe \(stripe)")
                }
            }
        }
    }

    /// End to end over real bytes: nodes with unequal data are encoded by the
    /// layout, any m nodes are dropped, and their data comes back byte-identical.
    @Test(arguments: [(2, 1), (3, 1), (4, 1), (4, 2), (5, 2), (6, 2), (7, 3)])
    func lostNodesRebuildThroughTheLayout(n: Int, m: Int) throws {
        let layout = try StripeLayout(groupSize: n, parityCount: m)
        let k = n - m
        let code = try ReedSolomon(dataFragmentCount: k, parityFragmentCount: m)
        var rng = SplitMix64(seed: UInt64(n * 10 + m))
        let sizes = (0..<n).map { 100 + $0 * 37 + (n == 2 ? 0 : Int.random(in: 0..<300, using: &rng)) }
        let nodeData: [[UInt8]] = sizes.map { size in (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) } }
        let fragmentSize = try layout.fragmentSizeBytes(nodeDataSizesBytes: sizes)
        #expect(fragmentSize * k >= sizes.max()!)
        #expect(fragmentSize * k - sizes.max()! < k)

        func dataFragment(_ node: Int, _ fragment: Int) -> [UInt8] {
            let padded = nodeData[node] + [UInt8](repeating: 0, count: layout.paddingBytes(dataSizeBytes: sizes[node], fragmentSizeBytes: fragmentSize))
            return Array(padded[(fragment * fragmentSize)..<((fragment + 1) * fragmentSize)])
        }
        // Parity held per (node, stripe), built incrementally as a holder would.
        var parity: [Int: [Int: [UInt8]]] = [:]
        for node in 0..<n {
            for fragment in 0..<k {
                let placement = try layout.placement(node: node, fragment: fragment)
                for (row, holder) in placement.parityHolders.enumerated() {
                    var buffer = parity[holder, default: [:]][placement.stripe] ?? [UInt8](repeating: 0, count: fragmentSize)
                    let source = dataFragment(node, fragment)
                    try source.withUnsafeBytes { s in
                        try buffer.withUnsafeMutableBytes { p in
                            try code.accumulate(dataIndex: placement.slot, data: s, parityRow: row, parity: p)
                        }
                    }
                    parity[holder, default: [:]][placement.stripe] = buffer
                }
            }
        }
        #expect(parity.values.allSatisfy { $0.count == m }, "each node holds m parity fragments")

        for lost in combinations(of: n, choose: m) {
            for node in lost {
                var rebuilt = [UInt8]()
                for fragment in 0..<k {
                    let placement = try layout.placement(node: node, fragment: fragment)
                    var slots = [[UInt8]?](repeating: nil, count: n)
                    var rebuilding: [Int] = []
                    for slot in 0..<k {
                        let source = try layout.dataSource(stripe: placement.stripe, slot: slot)
                        if lost.contains(source) {
                            slots[slot] = [UInt8](repeating: 0, count: fragmentSize)
                            rebuilding.append(slot)
                        } else {
                            let (_, f) = try #require(dataRole(layout.role(node: source, stripe: placement.stripe)))
                            slots[slot] = dataFragment(source, f)
                        }
                    }
                    for row in 0..<m where !lost.contains(placement.parityHolders[row]) {
                        slots[k + row] = parity[placement.parityHolders[row]]![placement.stripe]
                    }
                    let buffers = slots.map { $0.map { bytes -> UnsafeMutableRawBufferPointer in
                        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: fragmentSize, alignment: 1)
                        b.copyBytes(from: bytes)
                        return b
                    } }
                    defer { buffers.forEach { $0?.deallocate() } }
                    try code.reconstruct(fragments: buffers, rebuilding: rebuilding)
                    rebuilt += Array(buffers[placement.slot]!)
                }
                #expect(Array(rebuilt.prefix(sizes[node])) == nodeData[node], "n=\(n) m=\(m) lost=\(lost) node \(node)")
            }
        }
    }

    @Test func sizesAndPadding() throws {
        let layout = try StripeLayout(groupSize: 6, parityCount: 2)
        #expect(layout.dataFragmentCount == 4)
        #expect(try layout.fragmentSizeBytes(nodeDataSizesBytes: [10, 7, 0, 3, 16, 17]) == 5)
        #expect(try layout.fragmentSizeBytes(nodeDataSizesBytes: [0, 0, 0, 0, 0, 0]) == 0)
        #expect(layout.paddingBytes(dataSizeBytes: 7, fragmentSizeBytes: 5) == 13)
        #expect(layout.parityBytesPerNode(fragmentSizeBytes: 1 << 20) == 2 << 20)
    }

    @Test func errors() throws {
        #expect(throws: ErasureCodingError.invalidGroupSize(0)) { try StripeLayout(groupSize: 0, parityCount: 0) }
        #expect(throws: ErasureCodingError.invalidDataFragmentCount(0)) { try StripeLayout(groupSize: 3, parityCount: 3) }
        #expect(throws: ErasureCodingError.invalidParityFragmentCount(-1)) { try StripeLayout(groupSize: 3, parityCount: -1) }
        #expect(throws: ErasureCodingError.tooManyFragments(total: 257, limit: 256)) { try StripeLayout(groupSize: 257, parityCount: 1) }
        let layout = try StripeLayout(groupSize: 4, parityCount: 1)
        #expect(throws: ErasureCodingError.invalidNodeIndex(4, groupSize: 4)) { try layout.role(node: 4, stripe: 0) }
        #expect(throws: ErasureCodingError.invalidStripeIndex(-1, groupSize: 4)) { try layout.role(node: 0, stripe: -1) }
        #expect(throws: ErasureCodingError.indexOutOfRange(3, count: 3)) { try layout.placement(node: 0, fragment: 3) }
        #expect(throws: ErasureCodingError.fragmentCountMismatch(expected: 4, actual: 3)) { try layout.fragmentSizeBytes(nodeDataSizesBytes: [1, 2, 3]) }
        #expect(throws: ErasureCodingError.invalidDataSize(-5)) { try layout.fragmentSizeBytes(nodeDataSizesBytes: [1, 2, 3, -5]) }
    }
}

private func dataRole(_ role: StripeLayout.Role) -> (slot: Int, fragment: Int)? {
    if case .data(let slot, let fragment) = role { return (slot, fragment) }
    return nil
}
