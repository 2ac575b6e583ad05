import CISAL
import Synchronization

/// Systematic Reed-Solomon code RS(k, m) over GF(2^8), computed by Intel ISA-L.
///
/// Fragments `0..<k` are the data, `k..<k+m` the parity. The generator is
/// ISA-L's Cauchy matrix: every k×k submatrix of it is invertible for
/// k + m ≤ 256, so *any* k fragments rebuild the rest (a Vandermonde
/// generator does not guarantee this).
///
/// Fragments are raw pointers (arena memory, mapped files, Swift arrays alike)
/// of any equal length; there is no alignment requirement. Expanded GF tables
/// are built once per code and once per erasure pattern, then cached, so the
/// hot path allocates nothing on the heap: pointer lists live on the stack.
public final class ReedSolomon: Sendable {
    public static let maximumTotalFragments = 256
    /// ISA-L takes the fragment length as a C `int`.
    public static let maximumFragmentSizeBytes = Int(Int32.max)
    /// Bound on cached decode patterns; n ≤ 256 with m ≤ 4 already fits many times over.
    static let decodeCacheLimit = 512
    /// ISA-L expands each GF(2^8) coefficient into a 32-byte lookup table.
    static let tableBytesPerCoefficient = 32

    public let dataFragmentCount: Int
    public let parityFragmentCount: Int
    public var totalFragmentCount: Int { dataFragmentCount + parityFragmentCount }

    /// (k + m) × k generator, row-major; the top k rows are the identity.
    let encodeMatrix: [UInt8]
    let encodeTables: GFTables
    private let decodeCache = Mutex<[DecodePattern: GFTables]>([:])

    public init(dataFragmentCount k: Int, parityFragmentCount m: Int) throws(ErasureCodingError) {
        guard k >= 1 else { throw .invalidDataFragmentCount(k) }
        guard m >= 0 else { throw .invalidParityFragmentCount(m) }
        guard k + m <= Self.maximumTotalFragments else {
            throw .tooManyFragments(total: k + m, limit: Self.maximumTotalFragments)
        }
        dataFragmentCount = k
        parityFragmentCount = m
        var matrix = [UInt8](repeating: 0, count: (k + m) * k)
        // gf_gen_cauchy1_matrix's `m` is the total row count, k + m.
        gf_gen_cauchy1_matrix(&matrix, Int32(k + m), Int32(k))
        encodeMatrix = matrix
        encodeTables = GFTables(coefficients: Array(matrix[(k * k)...]), inputs: k, outputs: m)
    }

    // MARK: Encode

    /// Computes all m parity fragments from the k data fragments.
    public func encode(
        data: UnsafeBufferPointer<UnsafeRawPointer>,
        parity: UnsafeBufferPointer<UnsafeMutableRawPointer>,
        fragmentSizeBytes: Int
    ) throws(ErasureCodingError) {
        try checkFragmentSize(fragmentSizeBytes)
        guard data.count == dataFragmentCount else {
            throw .fragmentCountMismatch(expected: dataFragmentCount, actual: data.count)
        }
        guard parity.count == parityFragmentCount else {
            throw .fragmentCountMismatch(expected: parityFragmentCount, actual: parity.count)
        }
        guard parityFragmentCount > 0, fragmentSizeBytes > 0 else { return }
        withCPointers(data) { sources in
            withCPointers(parity) { outputs in
                ec_encode_data(
                    Int32(fragmentSizeBytes), Int32(dataFragmentCount), Int32(parityFragmentCount),
                    encodeTables.storage, sources, outputs)
            }
        }
    }

    /// Convenience over buffers; checks that every fragment has the same length.
    public func encode(data: [UnsafeRawBufferPointer], parity: [UnsafeMutableRawBufferPointer]) throws(ErasureCodingError) {
        let size = try commonLength(data.map(\.count) + parity.map(\.count))
        let dataPointers = data.map { $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)! }
        let parityPointers = parity.map { $0.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)! }
        try dataPointers.withUnsafeBufferPointer { (d) throws(ErasureCodingError) in
            try parityPointers.withUnsafeBufferPointer { (p) throws(ErasureCodingError) in
                try encode(data: d, parity: p, fragmentSizeBytes: size)
            }
        }
    }

    // MARK: Incremental encode

    /// Adds data fragment `dataIndex`'s contribution to parity rows
    /// `firstParityRow ..< firstParityRow + parity.count`.
    ///
    /// Parity buffers start as zeroes; once every data fragment has been
    /// accumulated exactly once (in any order) they equal ``encode``'s output.
    /// This lets a parity holder fold fragments in as they arrive without
    /// buffering all k of them.
    public func accumulate(
        dataIndex: Int,
        data: UnsafeRawPointer,
        intoParityRowsFrom firstParityRow: Int,
        parity: UnsafeBufferPointer<UnsafeMutableRawPointer>,
        fragmentSizeBytes: Int
    ) throws(ErasureCodingError) {
        try checkFragmentSize(fragmentSizeBytes)
        guard dataIndex >= 0, dataIndex < dataFragmentCount else {
            throw .indexOutOfRange(dataIndex, count: dataFragmentCount)
        }
        guard firstParityRow >= 0, firstParityRow + parity.count <= parityFragmentCount else {
            throw .indexOutOfRange(firstParityRow + parity.count - 1, count: parityFragmentCount)
        }
        guard !parity.isEmpty, fragmentSizeBytes > 0 else { return }
        let rowTables = encodeTables.storage + firstParityRow * dataFragmentCount * Self.tableBytesPerCoefficient
        withCPointers(parity) { outputs in
            ec_encode_data_update(
                Int32(fragmentSizeBytes), Int32(dataFragmentCount), Int32(parity.count), Int32(dataIndex),
                rowTables, UnsafeMutablePointer(mutating: data.assumingMemoryBound(to: UInt8.self)), outputs)
        }
    }

    /// Convenience over buffers: accumulate one data fragment into one parity row.
    public func accumulate(
        dataIndex: Int, data: UnsafeRawBufferPointer, parityRow: Int, parity: UnsafeMutableRawBufferPointer
    ) throws(ErasureCodingError) {
        let size = try commonLength([data.count, parity.count])
        guard size > 0 else { return }
        let parityPointers = [parity.baseAddress!]
        try parityPointers.withUnsafeBufferPointer { (p) throws(ErasureCodingError) in
            try accumulate(
                dataIndex: dataIndex, data: data.baseAddress!, intoParityRowsFrom: parityRow, parity: p,
                fragmentSizeBytes: size)
        }
    }

    // MARK: Reconstruct

    /// Rebuilds the fragments listed in `rebuilding` from k survivors.
    ///
    /// - Parameters:
    ///   - fragments: exactly k + m slots, slot i being fragment i. A `nil`
    ///     slot is unavailable. Each slot in `rebuilding` must be non-nil: it is
    ///     the output buffer. The first k other non-nil slots are the survivors.
    ///   - rebuilding: at most m distinct indices in `0..<k+m`.
    public func reconstruct(
        fragments: UnsafeBufferPointer<UnsafeMutableRawPointer?>,
        rebuilding: [Int],
        fragmentSizeBytes: Int
    ) throws(ErasureCodingError) {
        try checkFragmentSize(fragmentSizeBytes)
        let pattern = try decodePattern(fragments: fragments, rebuilding: rebuilding)
        guard !pattern.targets.isEmpty, fragmentSizeBytes > 0 else { return }
        let tables = try decodeTables(for: pattern)
        let k = dataFragmentCount
        let targetCount = pattern.targets.count
        withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<UInt8>?.self, capacity: k) { sources in
            withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<UInt8>?.self, capacity: targetCount) { outputs in
                var s = 0
                var t = 0
                for index in 0..<totalFragmentCount {
                    if pattern.survivors.contains(index) {
                        sources[s] = fragments[index]!.assumingMemoryBound(to: UInt8.self)
                        s += 1
                    } else if pattern.targets.contains(index) {
                        outputs[t] = fragments[index]!.assumingMemoryBound(to: UInt8.self)
                        t += 1
                    }
                }
                assert(s == k && t == targetCount)
                ec_encode_data(
                    Int32(fragmentSizeBytes), Int32(k), Int32(targetCount), tables.storage,
                    sources.baseAddress!, outputs.baseAddress!)
            }
        }
    }

    /// Convenience over buffers: `fragments[i] == nil` marks fragment i unavailable.
    public func reconstruct(fragments: [UnsafeMutableRawBufferPointer?], rebuilding: [Int]) throws(ErasureCodingError) {
        let size = try commonLength(fragments.compactMap { $0?.count })
        let pointers = fragments.map { $0.map { $0.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)! } }
        try pointers.withUnsafeBufferPointer { (p) throws(ErasureCodingError) in
            try reconstruct(fragments: p, rebuilding: rebuilding, fragmentSizeBytes: size)
        }
    }

    // MARK: Repair pipelining

    /// The coefficients that express fragment `target` as a linear
    /// combination of the k `survivors`: target = Σ cᵢ · fragment(survivorᵢ)
    /// over GF(2^8), in ascending survivor order.
    ///
    /// Decoding is linear, so the sum can be formed piecewise: each survivor
    /// adds its own term to a running partial and passes it on (repair
    /// pipelining). No node then receives more than one fragment's worth of
    /// bytes, where a rebuild that gathers k fragments at one node needs k×.
    public func repairCoefficients(survivors: FragmentSet, target: Int) throws(ErasureCodingError) -> [(index: Int, coefficient: UInt8)] {
        let n = totalFragmentCount
        guard target >= 0, target < n else { throw .indexOutOfRange(target, count: n) }
        guard survivors.count == dataFragmentCount, !survivors.contains(target), survivors.allSatisfy({ $0 < n }) else {
            throw .notEnoughSurvivors(available: survivors.filter { $0 < n && $0 != target }.count, required: dataFragmentCount)
        }
        let row = try decodeRows(DecodePattern(survivors: survivors, targets: FragmentSet([target])))
        return Array(zip(survivors, row).map { (index: $0, coefficient: $1) })
    }

    // MARK: Internals

    struct DecodePattern: Hashable {
        var survivors: FragmentSet
        var targets: FragmentSet
    }

    func decodePattern(
        fragments: UnsafeBufferPointer<UnsafeMutableRawPointer?>, rebuilding: [Int]
    ) throws(ErasureCodingError) -> DecodePattern {
        let n = totalFragmentCount
        guard fragments.count == n else { throw .fragmentCountMismatch(expected: n, actual: fragments.count) }
        guard rebuilding.count <= parityFragmentCount else {
            throw .tooManyLost(lost: rebuilding.count, tolerated: parityFragmentCount)
        }
        var targets = FragmentSet()
        for index in rebuilding {
            guard index >= 0, index < n else { throw .indexOutOfRange(index, count: n) }
            guard targets.insert(index) else { throw .duplicateIndex(index) }
            guard fragments[index] != nil else { throw .indexOutOfRange(index, count: n) }
        }
        var survivors = FragmentSet()
        for index in 0..<n where survivors.count < dataFragmentCount {
            if fragments[index] != nil, !targets.contains(index) { survivors.insert(index) }
        }
        guard survivors.count == dataFragmentCount else {
            throw .notEnoughSurvivors(available: survivors.count, required: dataFragmentCount)
        }
        return DecodePattern(survivors: survivors, targets: targets)
    }

    func decodeTables(for pattern: DecodePattern) throws(ErasureCodingError) -> GFTables {
        if let cached = decodeCache.withLock({ $0[pattern] }) { return cached }
        let tables = try buildDecodeTables(pattern)
        decodeCache.withLock { cache in
            if cache.count >= Self.decodeCacheLimit { cache.removeAll(keepingCapacity: true) }
            cache[pattern] = tables
        }
        return tables
    }

    private func buildDecodeTables(_ pattern: DecodePattern) throws(ErasureCodingError) -> GFTables {
        GFTables(coefficients: try decodeRows(pattern), inputs: dataFragmentCount, outputs: pattern.targets.count)
    }

    /// Decode row for a target t: row t of B⁻¹ for data, (generator row t)·B⁻¹
    /// for parity, where B is the generator restricted to the survivors' rows.
    private func decodeRows(_ pattern: DecodePattern) throws(ErasureCodingError) -> [UInt8] {
        let k = dataFragmentCount
        var survivorRows = [UInt8]()
        survivorRows.reserveCapacity(k * k)
        for index in pattern.survivors {
            survivorRows.append(contentsOf: encodeMatrix[(index * k)..<((index + 1) * k)])
        }
        var inverse = [UInt8](repeating: 0, count: k * k)
        guard gf_invert_matrix(&survivorRows, &inverse, Int32(k)) == 0 else { throw .singularMatrix }
        var decodeRows = [UInt8]()
        decodeRows.reserveCapacity(k * pattern.targets.count)
        for target in pattern.targets {
            if target < k {
                decodeRows.append(contentsOf: inverse[(target * k)..<((target + 1) * k)])
            } else {
                for column in 0..<k {
                    var sum: UInt8 = 0
                    for j in 0..<k { sum ^= gf_mul(encodeMatrix[target * k + j], inverse[j * k + column]) }
                    decodeRows.append(sum)
                }
            }
        }
        return decodeRows
    }

    private func checkFragmentSize(_ bytes: Int) throws(ErasureCodingError) {
        guard bytes >= 0 else { throw .invalidDataSize(bytes) }
        guard bytes <= Self.maximumFragmentSizeBytes else {
            throw .fragmentTooLarge(bytes: bytes, limit: Self.maximumFragmentSizeBytes)
        }
    }

    private func commonLength(_ lengths: [Int]) throws(ErasureCodingError) -> Int {
        guard let first = lengths.first else { return 0 }
        for (index, length) in lengths.enumerated() where length != first {
            throw .fragmentLengthMismatch(expected: first, actual: length, index: index)
        }
        return first
    }
}

/// ISA-L's expanded multiplication tables for a coefficient matrix
/// (`outputs` rows × `inputs` columns). Immutable once built.
final class GFTables: @unchecked Sendable {
    let storage: UnsafeMutablePointer<UInt8>
    let byteCount: Int

    init(coefficients: [UInt8], inputs: Int, outputs: Int) {
        precondition(coefficients.count == inputs * outputs)
        byteCount = max(1, ReedSolomon.tableBytesPerCoefficient * inputs * outputs)
        storage = .allocate(capacity: byteCount)
        storage.initialize(repeating: 0, count: byteCount)
        if outputs > 0 {
            var coefficients = coefficients
            ec_init_tables(Int32(inputs), Int32(outputs), &coefficients, storage)
        }
    }

    deinit { storage.deallocate() }
}

/// Presents Swift pointers as the `unsigned char **` ISA-L expects, on the stack.
@inline(__always)
func withCPointers(
    _ pointers: UnsafeBufferPointer<UnsafeRawPointer>, _ body: (UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>) -> Void
) {
    withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<UInt8>?.self, capacity: max(1, pointers.count)) { list in
        for index in pointers.indices {
            list[index] = UnsafeMutablePointer(mutating: pointers[index].assumingMemoryBound(to: UInt8.self))
        }
        body(list.baseAddress!)
    }
}

@inline(__always)
func withCPointers(
    _ pointers: UnsafeBufferPointer<UnsafeMutableRawPointer>,
    _ body: (UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>) -> Void
) {
    withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<UInt8>?.self, capacity: max(1, pointers.count)) { list in
        for index in pointers.indices {
            list[index] = pointers[index].assumingMemoryBound(to: UInt8.self)
        }
        body(list.baseAddress!)
    }
}
