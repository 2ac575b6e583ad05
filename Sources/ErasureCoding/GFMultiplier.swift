import CISAL

/// Multiply-and-add by one GF(2^8) constant over a byte range:
/// `destination ^= coefficient · source`, with ISA-L's vector kernels.
///
/// This is one hop of a pipelined repair (see
/// ``ReedSolomon/repairCoefficients(survivors:target:)``): a survivor folds
/// its own fragment, scaled by its coefficient, into the partial sum it passes
/// on. Ranges may have any length and alignment and may be fed piecewise.
public struct GFMultiplier: Sendable {
    public let coefficient: UInt8
    private let tables: GFTables

    public init(coefficient: UInt8) {
        self.coefficient = coefficient
        tables = GFTables(coefficients: [coefficient], inputs: 1, outputs: 1)
    }

    public func multiplyAdd(from source: UnsafeRawPointer, into destination: UnsafeMutableRawPointer, count: Int) {
        precondition(count >= 0 && count <= ReedSolomon.maximumFragmentSizeBytes)
        guard count > 0, coefficient != 0 else { return }
        var output: UnsafeMutablePointer<UInt8>? = destination.assumingMemoryBound(to: UInt8.self)
        // A single-source, single-output incremental encode is exactly dest ^= c·src,
        // and unlike gf_vect_mad it accepts lengths below the vector width.
        ec_encode_data_update(
            Int32(count), 1, 1, 0, tables.storage,
            UnsafeMutablePointer(mutating: source.assumingMemoryBound(to: UInt8.self)), &output)
    }
}
