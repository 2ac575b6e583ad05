import Glibc

/// A failed system call, with what was being done, for logs and callers.
public struct IOError: Error, Equatable, Sendable, CustomStringConvertible {
    public let operation: String
    public let errnoCode: Int32

    public init(_ operation: String, errno code: Int32 = Glibc.errno) {
        self.operation = operation
        self.errnoCode = code
    }

    /// The peer closed the connection (EOF in the middle of what we expected).
    public static func closed(_ operation: String) -> IOError { IOError(operation, errno: ECONNRESET) }
    public static func timedOut(_ operation: String) -> IOError { IOError(operation, errno: ETIMEDOUT) }

    public var description: String { "\(operation): \(String(cString: strerror(errnoCode)))" }
}
