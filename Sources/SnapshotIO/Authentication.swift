import Crypto
import SnapshotProtocol

/// Shared-secret challenge/response for TCP sessions: the daemon sends a random
/// nonce, the client answers HMAC-SHA256(secret, nonce). The secret never
/// crosses the wire and a recorded answer is useless for the next nonce.
public enum Authentication {
    /// The secret in a secret file: its UTF-8 text without surrounding
    /// whitespace (a trailing newline is not part of it). nil when unreadable.
    public static func secret(fromFile path: String) -> [UInt8]? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        return Array(text.trimmingCharacters(in: .whitespacesAndNewlines).utf8)
    }

    public static func makeNonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<ProtocolLimits.authenticationNonceBytes).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    public static func tag(secret: [UInt8], nonce: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: nonce, using: SymmetricKey(data: secret)))
    }

    /// Constant-time check of a client's answer.
    public static func verify(tag: [UInt8], secret: [UInt8], nonce: [UInt8]) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(tag, authenticating: nonce, using: SymmetricKey(data: secret))
    }
}
