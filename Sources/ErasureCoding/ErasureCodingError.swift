/// Every way a Reed-Solomon or layout call can be misused. Returned as typed
/// errors, never a trap: these values come from configuration and the network.
public enum ErasureCodingError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidDataFragmentCount(Int)
    case invalidParityFragmentCount(Int)
    case tooManyFragments(total: Int, limit: Int)
    case fragmentLengthMismatch(expected: Int, actual: Int, index: Int)
    case fragmentTooLarge(bytes: Int, limit: Int)
    case tooManyLost(lost: Int, tolerated: Int)
    case notEnoughSurvivors(available: Int, required: Int)
    case duplicateIndex(Int)
    case indexOutOfRange(Int, count: Int)
    case fragmentCountMismatch(expected: Int, actual: Int)
    case singularMatrix
    case invalidGroupSize(Int)
    case invalidNodeIndex(Int, groupSize: Int)
    case invalidStripeIndex(Int, groupSize: Int)
    case invalidDataSize(Int)

    public var description: String {
        switch self {
        case .invalidDataFragmentCount(let k): "data fragment count k must be at least 1, got \(k)"
        case .invalidParityFragmentCount(let m): "parity fragment count m must be at least 0, got \(m)"
        case .tooManyFragments(let total, let limit): "k + m = \(total) exceeds the GF(2^8) limit of \(limit)"
        case .fragmentLengthMismatch(let expected, let actual, let index):
            "fragment \(index) is \(actual) bytes, expected \(expected) like the others"
        case .fragmentTooLarge(let bytes, let limit): "fragment of \(bytes) bytes exceeds the limit of \(limit)"
        case .tooManyLost(let lost, let tolerated): "\(lost) fragments lost, this code tolerates \(tolerated)"
        case .notEnoughSurvivors(let available, let required):
            "only \(available) surviving fragments, \(required) are needed"
        case .duplicateIndex(let index): "fragment index \(index) given twice"
        case .indexOutOfRange(let index, let count): "fragment index \(index) is outside 0..<\(count)"
        case .fragmentCountMismatch(let expected, let actual): "expected \(expected) fragment slots, got \(actual)"
        case .singularMatrix: "decode matrix is singular (cannot happen with a Cauchy generator)"
        case .invalidGroupSize(let n): "protection group size must be at least 1, got \(n)"
        case .invalidNodeIndex(let node, let n): "node index \(node) is outside the group 0..<\(n)"
        case .invalidStripeIndex(let stripe, let n): "stripe index \(stripe) is outside 0..<\(n)"
        case .invalidDataSize(let bytes): "data size must not be negative, got \(bytes)"
        }
    }
}
