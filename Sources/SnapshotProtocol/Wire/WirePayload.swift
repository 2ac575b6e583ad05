/// A value's wire form: how it is written, and how it is read back with every
/// check the reader applies (lengths and counts against their limits and
/// against the bytes left, known enum values, semantic rules). Payloads
/// conform, and so do the pieces they are made of.
public protocol WireCodable: Hashable, Sendable {
    func encode(into writer: inout ByteWriter)
    init(from reader: inout ByteReader) throws(ProtocolError)
}

/// The payload of one message type: the type code it travels under, declared
/// with its struct and its coding. ``Message`` wraps each in its case.
public protocol WirePayload: WireCodable {
    static var type: MessageType { get }
}

extension ByteWriter {
    public mutating func write<T: WireCodable>(_ value: T) { value.encode(into: &self) }

    /// A u32 count, then each element.
    public mutating func write<T: WireCodable>(list: [T]) {
        writeCount(list.count)
        for element in list { element.encode(into: &self) }
    }

    public mutating func write<T: FixedWidthInteger>(list: [T]) {
        writeCount(list.count)
        for element in list { write(element) }
    }

    public mutating func write(list: [String]) {
        writeCount(list.count)
        for element in list { write(element) }
    }

    public mutating func writeOptional(_ value: String?) {
        write(value != nil)
        if let value { write(value) }
    }
}

extension ByteReader {
    /// A count of at most `limit` elements (each taking at least
    /// `minimumElementBytes`, see ``readCount(_:limit:minimumElementBytes:)``), then the elements.
    public mutating func readList<T: WireCodable>(_ field: String, limit: Int, minimumElementBytes: Int) throws(ProtocolError) -> [T] {
        let count = try readCount(field, limit: limit, minimumElementBytes: minimumElementBytes)
        var list: [T] = []
        list.reserveCapacity(count)
        for _ in 0..<count { list.append(try T(from: &self)) }
        return list
    }

    /// A count of at most `limit` integers, then the integers.
    public mutating func readList<T: FixedWidthInteger>(of _: T.Type, _ field: String, limit: Int) throws(ProtocolError) -> [T] {
        let count = try readCount(field, limit: limit, minimumElementBytes: MemoryLayout<T>.size)
        var list: [T] = []
        list.reserveCapacity(count)
        for _ in 0..<count { list.append(try read(T.self, field)) }
        return list
    }

    /// Node ids: at most ``ProtocolLimits/maximumListEntries``.
    public mutating func readNodeList(_ field: String) throws(ProtocolError) -> [NodeID] {
        try readList(of: NodeID.self, field, limit: ProtocolLimits.maximumListEntries)
    }

    /// Human-readable lines (problems, notes): at most
    /// ``ProtocolLimits/maximumProblemsPerNode``, each up to
    /// ``ProtocolLimits/maximumMessageBytes``, empty allowed.
    public mutating func readStrings(_ field: String) throws(ProtocolError) -> [String] {
        let count = try readCount(field, limit: ProtocolLimits.maximumProblemsPerNode, minimumElementBytes: 2)  // a UInt16 length and no bytes: an empty string
        var strings: [String] = []
        for _ in 0..<count { strings.append(try readString(field, limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)) }
        return strings
    }

    public mutating func readOptionalString(_ field: String, limitBytes: Int) throws(ProtocolError) -> String? {
        try readBool(field) ? try readString(field, limitBytes: limitBytes) : nil
    }

    public mutating func readEnum<E: RawRepresentable>(_: E.Type, _ field: String) throws(ProtocolError) -> E where E.RawValue: FixedWidthInteger {
        let raw = try read(E.RawValue.self, field)
        guard let value = E(rawValue: raw) else { throw .invalidValue(field: field, reason: "unknown value \(raw)") }
        return value
    }
}
