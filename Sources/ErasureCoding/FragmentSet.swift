/// A set of fragment indices in `0..<256` (the GF(2^8) limit on k + m),
/// as a fixed 256-bit value: hashing and copying it never allocates, so it can
/// key the decode-table cache on the hot path.
public struct FragmentSet: Hashable, Sendable, Sequence, CustomStringConvertible {
    public typealias Element = Int
    public static let capacity = 256
    private var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)

    public init() {}

    public init(_ indices: some Sequence<Int>) {
        for index in indices { insert(index) }
    }

    public var count: Int {
        words.0.nonzeroBitCount + words.1.nonzeroBitCount + words.2.nonzeroBitCount + words.3.nonzeroBitCount
    }

    public var isEmpty: Bool { count == 0 }

    public func contains(_ index: Int) -> Bool {
        guard index >= 0, index < Self.capacity else { return false }
        return word(index >> 6) & (1 << UInt64(index & 63)) != 0
    }

    /// Returns false when the index was already present.
    @discardableResult
    public mutating func insert(_ index: Int) -> Bool {
        precondition(index >= 0 && index < Self.capacity, "fragment index \(index) outside 0..<256")
        let bit: UInt64 = 1 << UInt64(index & 63)
        let old = word(index >> 6)
        setWord(index >> 6, old | bit)
        return old & bit == 0
    }

    public struct Iterator: IteratorProtocol {
        let set: FragmentSet
        var candidate = 0

        public mutating func next() -> Int? {
            while candidate < FragmentSet.capacity {
                defer { candidate += 1 }
                if set.contains(candidate) { return candidate }
            }
            return nil
        }
    }

    public func makeIterator() -> Iterator { Iterator(set: self) }

    public var description: String { "{" + map { String($0) }.joined(separator: ",") + "}" }

    public static func == (lhs: FragmentSet, rhs: FragmentSet) -> Bool {
        lhs.words.0 == rhs.words.0 && lhs.words.1 == rhs.words.1
            && lhs.words.2 == rhs.words.2 && lhs.words.3 == rhs.words.3
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(words.0)
        hasher.combine(words.1)
        hasher.combine(words.2)
        hasher.combine(words.3)
    }

    private func word(_ i: Int) -> UInt64 {
        switch i {
        case 0: words.0
        case 1: words.1
        case 2: words.2
        default: words.3
        }
    }

    private mutating func setWord(_ i: Int, _ value: UInt64) {
        switch i {
        case 0: words.0 = value
        case 1: words.1 = value
        case 2: words.2 = value
        default: words.3 = value
        }
    }
}
