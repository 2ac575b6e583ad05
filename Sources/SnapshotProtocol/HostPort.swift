/// A TCP endpoint as operators write it: `host:port`, with an IPv6 address
/// in brackets (`[::1]:7000`, as in URLs). The one parser of such text in
/// the project: configuration, cluster files, `snapshotctl --tcp`, the
/// trainer tool and the local cluster all go through it.
public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    /// The host without brackets: an IPv4 or IPv6 address, or a name.
    public let host: String
    public let port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses `host:port` or `[ipv6]:port`. An IPv6 address without brackets
    /// is refused: `::1:7000` could be the address `::1:7000` with no port.
    public init(parsing text: String) throws(HostPortError) {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw HostPortError(text, "an IPv6 address in brackets needs its closing ']'") }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw HostPortError(text, "a port must follow ']' as ':port'") }
            portText = rest.dropFirst()
            guard host.isEmpty || host.contains(":") else { throw HostPortError(text, "brackets are for IPv6 addresses only") }
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw HostPortError(text, "the port is missing") }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard !host.contains(":") else { throw HostPortError(text, "write an IPv6 address in brackets, e.g. [::1]:7000") }
        }
        guard !host.isEmpty else { throw HostPortError(text, "the host is missing") }
        guard !host.contains(where: { $0.isWhitespace || $0 == "[" || $0 == "]" || $0 == "/" }) else {
            throw HostPortError(text, "the host has characters no host has")
        }
        guard !portText.isEmpty, portText.allSatisfy(\.isASCII), portText.allSatisfy(\.isNumber), let port = UInt16(portText) else {
            throw HostPortError(text, "the port must be a number from 0 to 65535")
        }
        self.host = String(host)
        self.port = port
    }

    /// Whether `host` is written as an IPv6 address.
    public var isIPv6: Bool { host.contains(":") }

    /// `host:port`, or `[host]:port` for IPv6: what ``init(parsing:)`` reads back.
    public var description: String { isIPv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

public struct HostPortError: Error, Equatable, Sendable, CustomStringConvertible {
    public let text: String
    public let reason: String

    init(_ text: String, _ reason: String) {
        self.text = text
        self.reason = reason
    }

    public var description: String { "'\(text)' is not host:port: \(reason)" }
}
