/// The generic replies: an error (this payload) or ok (none).
public struct ErrorReply: WirePayload, Error, CustomStringConvertible {
    public static let type = MessageType.error
    public var code: ErrorCode
    public var message: String
    public init(code: ErrorCode, message: String) {
        self.code = code
        // Truncate on a character boundary so the message always fits the protocol limit.
        var bounded = ""
        for character in message {
            if bounded.utf8.count + character.utf8.count > ProtocolLimits.maximumMessageBytes { break }
            bounded.append(character)
        }
        self.message = bounded
    }

    public var description: String { "\(code): \(message)" }

    public func encode(into w: inout ByteWriter) {
        w.write(code.rawValue)
        w.write(message)
    }

    /// Through ``init(code:message:)``: the reader's limit and the bound are the same.
    public init(from r: inout ByteReader) throws(ProtocolError) {
        let code = try r.readEnum(ErrorCode.self, "code")
        self.init(code: code, message: try r.readString("message", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true))
    }
}
