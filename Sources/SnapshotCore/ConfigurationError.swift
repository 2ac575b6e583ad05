/// A configuration value that cannot be used, with a message naming the
/// setting and what it must be. Thrown at start or when a cluster map is
/// built; never for input from a session.
public struct ConfigurationError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
