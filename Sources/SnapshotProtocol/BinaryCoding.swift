/// Little-endian writer for control payloads.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(reservingCapacity capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func write(_ value: Bool) { write(UInt8(value ? 1 : 0)) }
    public mutating func write(_ value: Double) { write(value.bitPattern) }

    /// Length-prefixed (u16) UTF-8. Callers validate lengths against limits first.
    public mutating func write(_ value: String) {
        let utf8 = Array(value.utf8)
        precondition(utf8.count <= Int(UInt16.max))
        write(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    /// Length-prefixed (u32) opaque bytes.
    public mutating func write(blob: [UInt8]) {
        write(UInt32(blob.count))
        bytes.append(contentsOf: blob)
    }

    public mutating func write(raw: [UInt8]) { bytes.append(contentsOf: raw) }

    public mutating func writeOptional<T: FixedWidthInteger>(_ value: T?) {
        write(value != nil)
        if let value { write(value) }
    }

    public mutating func writeCount(_ count: Int) {
        precondition(count >= 0 && count <= Int(UInt32.max))
        write(UInt32(count))
    }
}

/// Bounds-checked little-endian reader. Never traps, never reads past the end,
/// and never reserves more than the remaining bytes could possibly encode.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var offset: Int = 0
    public var remaining: Int { bytes.count - offset }

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public mutating func read<T: FixedWidthInteger>(_: T.Type, _ field: String) throws(ProtocolError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .truncatedField(field) }
        var value: T = 0
        for i in 0..<size { value |= T(truncatingIfNeeded: bytes[offset + i]) << (8 * i) }
        offset += size
        return value
    }

    public mutating func readBool(_ field: String) throws(ProtocolError) -> Bool {
        switch try read(UInt8.self, field) {
        case 0: return false
        case 1: return true
        case let other: throw .invalidValue(field: field, reason: "boolean must be 0 or 1, got \(other)")
        }
    }

    public mutating func readDouble(_ field: String) throws(ProtocolError) -> Double {
        Double(bitPattern: try read(UInt64.self, field))
    }

    public mutating func readString(_ field: String, limitBytes: Int, allowEmpty: Bool = false) throws(ProtocolError) -> String {
        let length = Int(try read(UInt16.self, field))
        guard length <= limitBytes else { throw .tooLong(field: field, bytes: length, limitBytes: limitBytes) }
        guard length > 0 || allowEmpty else { throw .emptyField(field) }
        let raw = try readRaw(count: length, field)
        guard let string = String(validating: raw, as: UTF8.self) else { throw .invalidUTF8(field: field) }
        return string
    }

    public mutating func readBlob(_ field: String, limitBytes: Int) throws(ProtocolError) -> [UInt8] {
        let length = Int(try read(UInt32.self, field))
        guard length <= limitBytes else { throw .tooLong(field: field, bytes: length, limitBytes: limitBytes) }
        return try readRaw(count: length, field)
    }

    public mutating func readRaw(count: Int, _ field: String) throws(ProtocolError) -> [UInt8] {
        guard count >= 0, remaining >= count else { throw .truncatedField(field) }
        defer { offset += count }
        return Array(bytes[offset..<(offset + count)])
    }

    public mutating func readOptional<T: FixedWidthInteger>(_: T.Type, _ field: String) throws(ProtocolError) -> T? {
        try readBool(field) ? try read(T.self, field) : nil
    }

    /// Reads an element count and checks it against `limit` and against what
    /// the remaining bytes can hold at `minimumElementBytes` each, so a forged
    /// count cannot make the caller reserve a huge array.
    public mutating func readCount(_ field: String, limit: Int, minimumElementBytes: Int) throws(ProtocolError) -> Int {
        let count = Int(try read(UInt32.self, field))
        guard count <= limit else { throw .tooMany(field: field, count: count, limit: limit) }
        guard count * max(1, minimumElementBytes) <= remaining else { throw .truncatedField(field) }
        return count
    }

    public func finish() throws(ProtocolError) {
        guard remaining == 0 else { throw .trailingBytes(remaining) }
    }
}
