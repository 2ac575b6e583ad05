import SnapshotProtocol
import Testing

@Suite("host:port, the one parser")
struct HostPortTests {
    @Test(arguments: [
        ("127.0.0.1:7000", "127.0.0.1", UInt16(7000)),
        ("localhost:0", "localhost", 0),
        ("node-3.cluster.local:65535", "node-3.cluster.local", 65535),
        ("[::1]:7000", "::1", 7000),
        ("[fe80::1%eth0]:9", "fe80::1%eth0", 9),
        ("[2001:db8::42]:443", "2001:db8::42", 443),
    ])
    func parses(text: String, host: String, port: UInt16) throws {
        let parsed = try HostPort(parsing: text)
        #expect(parsed.host == host && parsed.port == port)
        #expect(try HostPort(parsing: parsed.description) == parsed, "description reads back: \(parsed)")
        #expect(parsed.description == text)
    }

    @Test(arguments: [
        ("127.0.0.1", "the port is missing"),
        ("::1:7000", "write an IPv6 address in brackets, e.g. [::1]:7000"),
        ("[::1]", "a port must follow ']' as ':port'"),
        ("[::1:7000", "an IPv6 address in brackets needs its closing ']'"),
        ("[127.0.0.1]:7000", "brackets are for IPv6 addresses only"),
        (":7000", "the host is missing"),
        ("[]:7000", "the host is missing"),
        ("host:", "the port must be a number from 0 to 65535"),
        ("host:65536", "the port must be a number from 0 to 65535"),
        ("host:-1", "the port must be a number from 0 to 65535"),
        ("host:+80", "the port must be a number from 0 to 65535"),
        ("host:８０", "the port must be a number from 0 to 65535"),
        ("two words:80", "the host has characters no host has"),
        ("", "the port is missing"),
    ])
    func refuses(text: String, reason: String) {
        #expect(throws: HostPortError.self) { try HostPort(parsing: text) }
        do {
            _ = try HostPort(parsing: text)
        } catch {
            #expect(error.reason == reason, "\(text): \(error)")
            #expect(error.description.hasPrefix("'\(text)' is not host:port"))
        }
    }
}
