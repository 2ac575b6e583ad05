/// Why a frame or message could not be decoded. Each case names what was wrong
/// so the daemon can tell the sender and log it.
public enum ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncatedHeader(haveBytes: Int, needBytes: Int)
    case truncatedPayload(haveBytes: Int, needBytes: Int)
    case badMagic(UInt32)
    case unsupportedVersion(UInt8)
    case unknownMessageType(UInt8)
    case unknownFlags(UInt16)
    case nonZeroReserved
    case headerChecksumMismatch(expected: UInt32, actual: UInt32)
    case payloadChecksumMismatch(expected: UInt32, actual: UInt32)
    case payloadTooLarge(claimedBytes: UInt64, limitBytes: UInt64)
    case bulkTooLarge(claimedBytes: UInt64, limitBytes: UInt64)
    case unexpectedBulk(type: MessageType, bytes: UInt64)
    case truncatedField(String)
    case trailingBytes(Int)
    case invalidUTF8(field: String)
    case tooLong(field: String, bytes: Int, limitBytes: Int)
    case emptyField(String)
    case tooMany(field: String, count: Int, limit: Int)
    case invalidValue(field: String, reason: String)
    case negativeDimension(tensor: String, dimension: Int, value: Int64)
    case shapeOverflow(tensor: String)
    case byteLengthMismatch(tensor: String, shapeBytes: UInt64, declaredBytes: UInt64)

    public var description: String {
        switch self {
        case .truncatedHeader(let have, let need): "truncated frame header: \(have) of \(need) bytes"
        case .truncatedPayload(let have, let need): "truncated frame payload: \(have) of \(need) bytes"
        case .badMagic(let magic): "bad frame magic 0x\(String(magic, radix: 16)), not a snapshotd peer"
        case .unsupportedVersion(let v): "unsupported protocol version \(v), this build speaks \(ProtocolLimits.version)"
        case .unknownMessageType(let t): "unknown message type \(t)"
        case .unknownFlags(let f): "unknown frame flags 0x\(String(f, radix: 16))"
        case .nonZeroReserved: "reserved header field is not zero"
        case .headerChecksumMismatch(let e, let a): "frame header checksum mismatch (header says \(e), computed \(a))"
        case .payloadChecksumMismatch(let e, let a): "frame payload checksum mismatch (header says \(e), computed \(a))"
        case .payloadTooLarge(let c, let l): "frame claims a \(c)-byte payload, limit is \(l)"
        case .bulkTooLarge(let c, let l): "frame claims \(c) bulk bytes, limit is \(l)"
        case .unexpectedBulk(let type, let bytes): "\(type) frames carry no bulk bytes, got \(bytes)"
        case .truncatedField(let f): "payload ends inside field '\(f)'"
        case .trailingBytes(let n): "\(n) unexpected bytes after the message"
        case .invalidUTF8(let f): "field '\(f)' is not valid UTF-8"
        case .tooLong(let f, let b, let l): "field '\(f)' is \(b) bytes, limit is \(l)"
        case .emptyField(let f): "field '\(f)' must not be empty"
        case .tooMany(let f, let c, let l): "\(c) entries in '\(f)', limit is \(l)"
        case .invalidValue(let f, let r): "field '\(f)': \(r)"
        case .negativeDimension(let t, let d, let v): "tensor '\(t)' has negative dimension \(d) = \(v)"
        case .shapeOverflow(let t): "tensor '\(t)' shape overflows 64 bits"
        case .byteLengthMismatch(let t, let s, let d): "tensor '\(t)': shape and dtype give \(s) bytes, declared \(d)"
        }
    }
}
