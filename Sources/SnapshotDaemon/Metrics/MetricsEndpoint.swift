import Foundation
import Glibc
import SnapshotIO
import SnapshotCore

/// The little HTTP/1.1 the metrics endpoint speaks, as pure functions (bytes
/// in, decision or bytes out), apart from the socket loop that uses them.
/// One request per connection, answered with `Connection: close`: enough for
/// Prometheus, curl and promtool, and nothing a client can keep open.
enum MetricsHTTP {
    /// What the bytes read so far make of a request head.
    enum Head: Equatable {
        /// No blank line yet, and room for more.
        case incomplete
        case request(method: String, path: String)
        /// Not HTTP/1.x: answered 400.
        case malformed(String)
        /// No end of head within ``Limits/metricsRequestBytes``: answered 431.
        case tooLarge
    }

    /// Parses the head of a request from the bytes read so far. Headers are
    /// not needed (no keep-alive, no compression) and are not looked at; a
    /// body, which no GET has, is never read.
    static func parseHead(_ bytes: [UInt8], limitBytes: Int = Limits.metricsRequestBytes) -> Head {
        guard let end = endOfHead(bytes) else { return bytes.count >= limitBytes ? .tooLarge : .incomplete }
        guard end <= limitBytes else { return .tooLarge }
        let lineEnd = bytes.firstIndex(of: UInt8(ascii: "\n")) ?? end
        var line = bytes[..<lineEnd]
        if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
        guard let text = String(validating: line, as: UTF8.self) else { return .malformed("request line is not UTF-8") }
        let parts = text.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1."), !parts[0].isEmpty, parts[0].utf8.allSatisfy(isTokenByte),
            parts[1].hasPrefix("/")
        else { return .malformed("not an HTTP/1.x request line: \(text.prefix(80))") }
        let path = parts[1].split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)[0]
        return .request(method: String(parts[0]), path: String(path))
    }

    /// Where the blank line ending the head is (CRLF CRLF, or a bare LF LF
    /// from a lenient client), as the index just past it.
    static func endOfHead(_ bytes: [UInt8]) -> Int? {
        var index = bytes.startIndex
        while let newline = bytes[index...].firstIndex(of: UInt8(ascii: "\n")) {
            let next = newline + 1
            if next < bytes.endIndex, bytes[next] == UInt8(ascii: "\n") { return next + 1 }
            if next + 1 < bytes.endIndex, bytes[next] == UInt8(ascii: "\r"), bytes[next + 1] == UInt8(ascii: "\n") { return next + 2 }
            index = next
        }
        return nil
    }

    /// Method names are RFC 9110 tokens; upper-case letters are all anyone sends.
    private static func isTokenByte(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte) || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || byte == UInt8(ascii: "-")
    }

    /// What a request gets.
    enum Route: Equatable {
        case metrics
        case notFound
        case methodNotAllowed
        case badRequest
        case tooLarge
    }

    static func route(_ head: Head) -> Route? {
        switch head {
        case .incomplete: nil
        case .malformed: .badRequest
        case .tooLarge: .tooLarge
        case .request(_, let path) where path != "/metrics": .notFound
        case .request(let method, _) where method != "GET": .methodNotAllowed
        case .request: .metrics
        }
    }

    /// The whole response, head and body. `body` is the exposition for
    /// ``Route/metrics``; every other route has a one-line plain-text body.
    static func response(_ route: Route, body: String = "") -> [UInt8] {
        let (status, extra, text): (String, String, String) =
            switch route {
            case .metrics: ("200 OK", "", body)
            case .notFound: ("404 Not Found", "", "not found: the metrics are at /metrics\n")
            case .methodNotAllowed: ("405 Method Not Allowed", "Allow: GET\r\n", "method not allowed: use GET\n")
            case .badRequest: ("400 Bad Request", "", "bad request\n")
            case .tooLarge: ("431 Request Header Fields Too Large", "", "request head over \(Limits.metricsRequestBytes) bytes\n")
            }
        let contentType = route == .metrics ? MetricsExposition.contentType : "text/plain; charset=utf-8"
        let payload = Array(text.utf8)
        let head = "HTTP/1.1 \(status)\r\nContent-Type: \(contentType)\r\nContent-Length: \(payload.count)\r\n\(extra)Connection: close\r\n\r\n"
        return Array(head.utf8) + payload
    }
}

/// The endpoint's socket loop: one thread, one connection at a time, each
/// cut at ``Limits/metricsRequestTimeoutMilliseconds`` to send its request and
/// ``Limits/metricsResponseTimeoutMilliseconds`` to take the answer. A bad,
/// slow or vanished client costs at most those and is then closed; it never
/// stops the endpoint, and the endpoint never takes a lock a save waits on
/// for longer than one pass over the state's bookkeeping.
extension SnapshotServer {
    /// The exposition as it stands: gauges read from the state under its
    /// lock, rendered after it is released.
    func metricsText() -> String {
        let gauges = state.withLock { NodeGauges(state: $0) }
        return MetricsExposition.render(metrics.families(gauges: gauges, counters: counters.all, version: Self.version))
    }

    /// Runs until the daemon stops (``stop()`` shuts the listener down).
    func serveMetrics(on listener: Socket) {
        while true {
            let connection: Socket
            do {
                connection = try listener.accept()
            } catch {
                if state.withLock({ $0.stopping }) { return }
                logger.warning("metrics: accept failed", metadata: ["error": "\(error)"])
                usleep(useconds_t(Limits.acceptRetryPauseMilliseconds * 1000))
                continue
            }
            answerScrape(connection)
            closeLingering(connection)
        }
    }

    /// Half-closes, then reads what the client still sends (a body, a second
    /// request) until it closes, for at most ``Limits/metricsLingerMilliseconds``:
    /// closing with unread bytes would reset the connection, which can
    /// destroy the response before the client has read it.
    private func closeLingering(_ connection: Socket) {
        defer { connection.close() }
        shutdown(connection.fd, Int32(SHUT_WR))
        let deadline = monotonicMilliseconds() + Limits.metricsLingerMilliseconds
        var chunk = [UInt8](repeating: 0, count: 1024)
        while (try? connection.waitReadable(until: deadline)) != nil {
            let count = (try? chunk.withUnsafeMutableBytes { try connection.readSome(into: $0.baseAddress!, count: $0.count) }) ?? 0
            if count == 0 { return }
        }
    }

    private func answerScrape(_ connection: Socket) {
        let deadline = monotonicMilliseconds() + Limits.metricsRequestTimeoutMilliseconds
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1024)
        var route: MetricsHTTP.Route?
        do {
            while true {
                route = MetricsHTTP.route(MetricsHTTP.parseHead(received))
                if route != nil { break }
                try connection.waitReadable(until: deadline)
                let room = Limits.metricsRequestBytes - received.count  // > 0: a full buffer parses as tooLarge
                let count = try chunk.withUnsafeMutableBytes { try connection.readSome(into: $0.baseAddress!, count: min($0.count, room)) }
                guard count > 0 else { return }  // the client left before finishing its request
                received += chunk[..<count]
            }
        } catch {
            logger.debug("metrics: request not received", metadata: ["error": "\(error)", "bytes": "\(received.count)"])
            return
        }
        guard let route else { return }
        if route != .metrics {
            logger.debug("metrics: request refused", metadata: ["route": "\(route)", "head": "\(String(decoding: received.prefix(80), as: UTF8.self))"])
        }
        let response = MetricsHTTP.response(route, body: route == .metrics ? metricsText() : "")
        do {
            try connection.writeAll(response, deadlineMilliseconds: monotonicMilliseconds() + Limits.metricsResponseTimeoutMilliseconds)
        } catch {
            logger.debug("metrics: response not delivered", metadata: ["error": "\(error)"])
        }
    }
}
