/// The declustered, rotating-parity layout of a protection group (docs/architecture.md,
/// "Erasure coding").
///
/// A group of `n` nodes tolerates `m` node losses with RS(k = n − m, m). Each
/// node's step data is cut into k equal fragments. There are n stripes; stripe
/// `j` keeps its m parity fragments on nodes `j, j+1, …, j+m−1 (mod n)` and
/// takes one data fragment from each of the other k nodes. Each node is thus
/// a data source in exactly k stripes and a parity holder in exactly m, no
/// stripe has two fragments on one node, and losing any m nodes loses at most
/// m fragments of every stripe: always recoverable.
///
/// Node i's data fragment f goes to stripe `(i + 1 + f) mod n`, which is the
/// f-th stripe after the m stripes node i holds parity for.
public struct StripeLayout: Hashable, Sendable {
    public let groupSize: Int
    public let parityCount: Int
    public var dataFragmentCount: Int { groupSize - parityCount }
    public var stripeCount: Int { groupSize }

    /// What a node does in one stripe.
    public enum Role: Hashable, Sendable {
        /// Holds parity row `row` (`0..<m`) of the stripe.
        case parity(row: Int)
        /// Contributes its data fragment `fragment` as the stripe's data slot `slot` (`0..<k`).
        case data(slot: Int, fragment: Int)
    }

    /// Where one of a node's data fragments goes.
    public struct Placement: Hashable, Sendable {
        public let stripe: Int
        public let slot: Int
        /// The nodes holding the stripe's parity, row 0 first.
        public let parityHolders: [Int]
    }

    public init(groupSize n: Int, parityCount m: Int) throws(ErasureCodingError) {
        guard n >= 1 else { throw .invalidGroupSize(n) }
        guard m >= 0 else { throw .invalidParityFragmentCount(m) }
        guard m < n else { throw .invalidDataFragmentCount(n - m) }
        guard n <= ReedSolomon.maximumTotalFragments else {
            throw .tooManyFragments(total: n, limit: ReedSolomon.maximumTotalFragments)
        }
        groupSize = n
        parityCount = m
    }

    public func role(node: Int, stripe: Int) throws(ErasureCodingError) -> Role {
        try checkNode(node)
        try checkStripe(stripe)
        let offset = mod(node - stripe)
        if offset < parityCount { return .parity(row: offset) }
        let fragment = mod(stripe - node - 1)
        return .data(slot: offset - parityCount, fragment: fragment)
    }

    /// Node holding parity row `row` of `stripe`.
    public func parityHolder(stripe: Int, row: Int) throws(ErasureCodingError) -> Int {
        try checkStripe(stripe)
        guard row >= 0, row < parityCount else { throw .indexOutOfRange(row, count: parityCount) }
        return mod(stripe + row)
    }

    /// Node contributing data slot `slot` of `stripe`.
    public func dataSource(stripe: Int, slot: Int) throws(ErasureCodingError) -> Int {
        try checkStripe(stripe)
        guard slot >= 0, slot < dataFragmentCount else { throw .indexOutOfRange(slot, count: dataFragmentCount) }
        return mod(stripe + parityCount + slot)
    }

    /// Where node `node`'s data fragment `fragment` goes.
    public func placement(node: Int, fragment: Int) throws(ErasureCodingError) -> Placement {
        try checkNode(node)
        guard fragment >= 0, fragment < dataFragmentCount else {
            throw .indexOutOfRange(fragment, count: dataFragmentCount)
        }
        let stripe = mod(node + 1 + fragment)
        let slot = mod(node - stripe) - parityCount
        let holders = (0..<parityCount).map { mod(stripe + $0) }
        return Placement(stripe: stripe, slot: slot, parityHolders: holders)
    }

    /// The stripes node `node` holds parity for, as (stripe, row), row 0 first.
    public func parityStripes(node: Int) throws(ErasureCodingError) -> [(stripe: Int, row: Int)] {
        try checkNode(node)
        return (0..<parityCount).map { row in (stripe: mod(node - row), row: row) }
    }

    /// Fragment size for the group: the largest node's data cut into k, rounded up.
    /// Smaller nodes pad their data with zeroes to `k × fragmentSizeBytes`.
    public func fragmentSizeBytes(nodeDataSizesBytes: [Int]) throws(ErasureCodingError) -> Int {
        guard nodeDataSizesBytes.count == groupSize else {
            throw .fragmentCountMismatch(expected: groupSize, actual: nodeDataSizesBytes.count)
        }
        var largest = 0
        for size in nodeDataSizesBytes {
            guard size >= 0 else { throw .invalidDataSize(size) }
            largest = max(largest, size)
        }
        let k = dataFragmentCount
        return largest / k + (largest % k == 0 ? 0 : 1)
    }

    /// Zero padding node `dataSizeBytes` gets so its data fills k whole fragments.
    public func paddingBytes(dataSizeBytes: Int, fragmentSizeBytes: Int) -> Int {
        precondition(dataSizeBytes >= 0 && dataSizeBytes <= fragmentSizeBytes * dataFragmentCount)
        return fragmentSizeBytes * dataFragmentCount - dataSizeBytes
    }

    /// Parity each node holds: one fragment per stripe it is a holder for,
    /// m fragments, i.e. ≈ m/k of the largest node's data.
    public func parityBytesPerNode(fragmentSizeBytes: Int) -> Int {
        parityCount * fragmentSizeBytes
    }

    private func mod(_ value: Int) -> Int {
        let r = value % groupSize
        return r < 0 ? r + groupSize : r
    }

    private func checkNode(_ node: Int) throws(ErasureCodingError) {
        guard node >= 0, node < groupSize else { throw .invalidNodeIndex(node, groupSize: groupSize) }
    }

    private func checkStripe(_ stripe: Int) throws(ErasureCodingError) {
        guard stripe >= 0, stripe < groupSize else { throw .invalidStripeIndex(stripe, groupSize: groupSize) }
    }
}
