import ErasureCoding

/// The fixed 40-byte frame header, little-endian:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic "SNPD" |
/// | 4 | 1 | version |
/// | 5 | 1 | message type |
/// | 6 | 2 | flags (none defined; must be 0) |
/// | 8 | 8 | request id (a reply echoes its request's) |
/// | 16 | 4 | control payload length |
/// | 20 | 4 | CRC-32C of the control payload |
/// | 24 | 8 | bulk length: raw bytes following the payload (tensor/fragment data) |
/// | 32 | 4 | reserved, 0 |
/// | 36 | 4 | CRC-32C of bytes 0..<36 |
///
/// Bulk bytes are not covered by the frame checksums: they are received
/// straight into arena memory and verified against the CRC-32C that the
/// message itself declares for them (tensor or fragment checksum).
public struct FrameHeader: Hashable, Sendable {
    public static let sizeBytes = 40
    public static let magic: UInt32 = 0x4450_4E53  // "SNPD" read as little-endian

    public var type: MessageType
    public var requestID: UInt64
    public var payloadLength: UInt32
    public var payloadChecksum: UInt32
    public var bulkLength: UInt64

    public init(type: MessageType, requestID: UInt64, payloadLength: UInt32, payloadChecksum: UInt32, bulkLength: UInt64) {
        self.type = type
        self.requestID = requestID
        self.payloadLength = payloadLength
        self.payloadChecksum = payloadChecksum
        self.bulkLength = bulkLength
    }

    public func encoded() -> [UInt8] {
        var writer = ByteWriter(reservingCapacity: Self.sizeBytes)
        writer.write(Self.magic)
        writer.write(ProtocolLimits.version)
        writer.write(type.rawValue)
        writer.write(UInt16(0))
        writer.write(requestID)
        writer.write(payloadLength)
        writer.write(payloadChecksum)
        writer.write(bulkLength)
        writer.write(UInt32(0))
        writer.write(CRC32C.checksum(writer.bytes))
        assert(writer.bytes.count == Self.sizeBytes)
        return writer.bytes
    }

    /// Validates everything the header alone can tell: magic, version, type,
    /// flags, checksum and the size limits, before any payload is read.
    public init(decoding bytes: [UInt8]) throws(ProtocolError) {
        guard bytes.count >= Self.sizeBytes else { throw .truncatedHeader(haveBytes: bytes.count, needBytes: Self.sizeBytes) }
        var reader = ByteReader(Array(bytes.prefix(Self.sizeBytes)))
        let magic = try reader.read(UInt32.self, "magic")
        guard magic == Self.magic else { throw .badMagic(magic) }
        let version = try reader.read(UInt8.self, "version")
        guard version == ProtocolLimits.version else { throw .unsupportedVersion(version) }
        let rawType = try reader.read(UInt8.self, "type")
        let flags = try reader.read(UInt16.self, "flags")
        let requestID = try reader.read(UInt64.self, "requestID")
        let payloadLength = try reader.read(UInt32.self, "payloadLength")
        let payloadChecksum = try reader.read(UInt32.self, "payloadChecksum")
        let bulkLength = try reader.read(UInt64.self, "bulkLength")
        let reserved = try reader.read(UInt32.self, "reserved")
        let headerChecksum = try reader.read(UInt32.self, "headerChecksum")
        let computed = CRC32C.checksum(Array(bytes[0..<36]))
        // Checksum first: a corrupted header must not be misreported as, say, an unknown type.
        guard headerChecksum == computed else { throw .headerChecksumMismatch(expected: headerChecksum, actual: computed) }
        guard let type = MessageType(rawValue: rawType) else { throw .unknownMessageType(rawType) }
        // (The payload limit depends on the type, so it is checked after it.)
        guard flags == 0 else { throw .unknownFlags(flags) }
        guard reserved == 0 else { throw .nonZeroReserved }
        guard payloadLength <= type.maximumPayloadBytes else {
            throw .payloadTooLarge(claimedBytes: UInt64(payloadLength), limitBytes: UInt64(type.maximumPayloadBytes))
        }
        guard bulkLength <= ProtocolLimits.maximumBulkBytes else {
            throw .bulkTooLarge(claimedBytes: bulkLength, limitBytes: ProtocolLimits.maximumBulkBytes)
        }
        guard bulkLength == 0 || type.carriesBulk else { throw .unexpectedBulk(type: type, bytes: bulkLength) }
        self.init(type: type, requestID: requestID, payloadLength: payloadLength, payloadChecksum: payloadChecksum, bulkLength: bulkLength)
    }

    public func validatePayload(_ payload: [UInt8]) throws(ProtocolError) {
        guard payload.count == Int(payloadLength) else {
            throw .truncatedPayload(haveBytes: payload.count, needBytes: Int(payloadLength))
        }
        let computed = CRC32C.checksum(payload)
        guard computed == payloadChecksum else { throw .payloadChecksumMismatch(expected: payloadChecksum, actual: computed) }
    }
}

/// Encoding and decoding of whole frames (header + control payload; bulk bytes
/// are written and read by the transport).
public enum Frame {
    /// Throws ``ProtocolError/payloadTooLarge(claimedBytes:limitBytes:)`` for
    /// a message over its type's limit: the sender fails that one message
    /// (and says so) instead of trapping.
    public static func encode(_ message: Message, requestID: UInt64, bulkLength: UInt64 = 0) throws(ProtocolError) -> [UInt8] {
        let type = message.type
        precondition(bulkLength == 0 || type.carriesBulk, "\(type) carries no bulk bytes")
        let payload = message.encodedPayload()
        guard payload.count <= type.maximumPayloadBytes else {
            throw .payloadTooLarge(claimedBytes: UInt64(payload.count), limitBytes: UInt64(type.maximumPayloadBytes))
        }
        let header = FrameHeader(
            type: type, requestID: requestID, payloadLength: UInt32(payload.count),
            payloadChecksum: CRC32C.checksum(payload), bulkLength: bulkLength)
        return header.encoded() + payload
    }

    /// Parses one frame from the front of `bytes` (which must hold at least the
    /// header and payload). Returns the bytes consumed, not counting bulk.
    public static func decode(_ bytes: [UInt8]) throws(ProtocolError) -> (header: FrameHeader, message: Message, consumedBytes: Int) {
        let header = try FrameHeader(decoding: bytes)
        let end = FrameHeader.sizeBytes + Int(header.payloadLength)
        guard bytes.count >= end else { throw .truncatedPayload(haveBytes: bytes.count - FrameHeader.sizeBytes, needBytes: Int(header.payloadLength)) }
        let payload = Array(bytes[FrameHeader.sizeBytes..<end])
        try header.validatePayload(payload)
        return (header, try Message(type: header.type, payload: payload), end)
    }
}
