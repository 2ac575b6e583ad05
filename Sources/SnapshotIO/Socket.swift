import CSocketShim
import Glibc

/// A blocking stream socket (Unix or TCP). A value: copying it does not dup
/// the descriptor; exactly one owner calls ``close()``.
public struct Socket: Sendable {
    public let fd: Int32
    /// Bound on descriptors one message may carry (mirrors the C shim).
    public static let maximumPassedDescriptors = 16

    public init(fd: Int32) { self.fd = fd }

    public func close() { _ = Glibc.close(fd) }

    // MARK: Connecting and listening

    public static func connectUnix(path: String) throws -> Socket {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError("socket(AF_UNIX)") }
        var address = try unixAddress(path)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else {
            let error = IOError("connect(\(path))")
            _ = Glibc.close(fd)
            throw error
        }
        return Socket(fd: fd)
    }

    /// - Parameter timeoutMilliseconds: bound on the connect itself (a dead host
    ///   on a real network would otherwise hold the caller for minutes).
    public static func connectTCP(host: String, port: UInt16, timeoutMilliseconds: Int64? = nil) throws -> Socket {
        var (address, length) = try inetAddress(host: host, port: port)
        let fd = socket(Int32(address.ss_family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError("socket(\(address.ss_family == AF_INET6 ? "AF_INET6" : "AF_INET"))") }
        if let timeoutMilliseconds {
            // Linux applies SO_SNDTIMEO to connect(2).
            var timeout = timeval(tv_sec: Int(timeoutMilliseconds / 1000), tv_usec: Int(timeoutMilliseconds % 1000) * 1000)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        }
        defer {
            var none = timeval()
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) }
        }
        guard result == 0 else {
            let error = IOError("connect(\(host):\(port))")
            _ = Glibc.close(fd)
            throw error
        }
        let socket = Socket(fd: fd)
        socket.tuneForBulkTransfer()
        return socket
    }

    /// Listens on a Unix socket path with the given file mode (permissions are
    /// the access control for local clients). A stale socket file is replaced.
    /// The socket is bound under a temporary name and renamed into place once
    /// listening, so a client that sees the path can always connect.
    public static func listenUnix(path: String, mode: mode_t, backlog: Int32 = 128) throws -> Socket {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError("socket(AF_UNIX)") }
        let temporary = path + ".binding"
        var address = try unixAddress(temporary)
        unlink(temporary)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, chmod(temporary, mode) == 0, listen(fd, backlog) == 0, rename(temporary, path) == 0 else {
            let error = IOError("listen(\(path))")
            _ = Glibc.close(fd)
            unlink(temporary)
            throw error
        }
        return Socket(fd: fd)
    }

    public static func listenTCP(host: String, port: UInt16, backlog: Int32 = 128) throws -> Socket {
        var (address, length) = try inetAddress(host: host, port: port)
        let fd = socket(Int32(address.ss_family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError("socket(\(address.ss_family == AF_INET6 ? "AF_INET6" : "AF_INET"))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0, listen(fd, backlog) == 0 else {
            let error = IOError("listen(\(host):\(port))")
            _ = Glibc.close(fd)
            throw error
        }
        return Socket(fd: fd)
    }

    /// The bound TCP port (useful after listening on port 0).
    public func localPort() -> UInt16? {
        var address = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard result == 0 else { return nil }
        // The port sits at the same offset in sockaddr_in and sockaddr_in6.
        return withUnsafeBytes(of: &address) { UInt16(bigEndian: $0.load(fromByteOffset: MemoryLayout.offset(of: \sockaddr_in.sin_port)!, as: UInt16.self)) }
    }

    public func accept() throws -> Socket {
        while true {
            let client = Glibc.accept(fd, nil, nil)
            if client >= 0 {
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                return Socket(fd: client)
            }
            if errno == EINTR || errno == ECONNABORTED { continue }
            throw IOError("accept")
        }
    }

    /// Unblocks a thread sitting in accept() or read() on this socket.
    public func shutdownBoth() { _ = shutdown(fd, Int32(SHUT_RDWR)) }

    /// Whether the peer is gone: it closed or reset the connection (a process
    /// that exits, `kill -9` included, closes its sockets), or shut down its
    /// sending side, after which it can never send another request. Never
    /// blocks (poll with timeout 0) and reads nothing. Bytes the peer sent that
    /// are still waiting to be read do not count: a live client is not closed.
    /// For a thread that sits on something other than this socket (a condition
    /// variable) and must notice when its client is no longer there.
    public func peerHasClosed() -> Bool {
        let gone = Int16(POLLHUP) | Int16(POLLERR) | Int16(POLLNVAL) | Self.pollReadHangUp
        var poller = pollfd(fd: fd, events: Int16(POLLIN) | Self.pollReadHangUp, revents: 0)
        var ready = poll(&poller, 1, 0)
        while ready < 0 && errno == EINTR { ready = poll(&poller, 1, 0) }
        // poll failing otherwise (ENOMEM) says nothing about the peer: not closed.
        return ready > 0 && poller.revents & gone != 0
    }

    /// POLLRDHUP (Linux ≥ 2.6.17): the peer closed the connection or shut down
    /// writing, reported even while unread bytes are waiting (POLLHUP alone is
    /// not raised for a TCP FIN). `<poll.h>` defines it only under _GNU_SOURCE,
    /// so Glibc does not export it to Swift; the value is the same on every
    /// Linux architecture this builds for (x86_64, aarch64).
    private static let pollReadHangUp: Int16 = 0x2000

    /// Big buffers for multi-megabyte payloads; no Nagle delay for small replies.
    public func tuneForBulkTransfer() {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    // MARK: Reading and writing

    /// Reads exactly `count` bytes. With a deadline (monotonic ms), a peer that
    /// stalls mid-message is cut off instead of holding the session forever.
    public func readExact(into buffer: UnsafeMutableRawPointer, count: Int, deadlineMilliseconds: Int64? = nil) throws {
        var done = 0
        while done < count {
            if let deadline = deadlineMilliseconds { try waitReadable(until: deadline) }
            let n = Glibc.read(fd, buffer + done, min(count - done, 1 << 30))
            if n > 0 {
                done += n
            } else if n == 0 {
                throw IOError.closed("read")
            } else if errno != EINTR {
                throw IOError("read")
            }
        }
    }

    /// Reads exactly `count` bytes into a new array that grows only as bytes
    /// arrive (in chunks of ``readChunkBytes``): a peer that claims a large
    /// length and then sends nothing costs one chunk, not the claim.
    public func readExact(count: Int, deadlineMilliseconds: Int64? = nil) throws -> [UInt8] {
        if count <= Self.readChunkBytes {
            var bytes = [UInt8](repeating: 0, count: count)
            try bytes.withUnsafeMutableBytes { (b) throws in
                if count > 0 { try readExact(into: b.baseAddress!, count: count, deadlineMilliseconds: deadlineMilliseconds) }
            }
            return bytes
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: Self.readChunkBytes)
        while bytes.count < count {
            let length = min(count - bytes.count, Self.readChunkBytes)
            try chunk.withUnsafeMutableBytes { (b) throws in
                try readExact(into: b.baseAddress!, count: length, deadlineMilliseconds: deadlineMilliseconds)
            }
            bytes.append(contentsOf: chunk[..<length])  // a memcpy; the array doubles as bytes arrive
        }
        return bytes
    }

    public static let readChunkBytes = 64 << 10

    /// One read of up to `count` bytes (waiting without limit): how many
    /// arrived, 0 when the peer has closed.
    public func readSome(into buffer: UnsafeMutableRawPointer, count: Int) throws -> Int {
        while true {
            let n = Glibc.read(fd, buffer, count)
            if n >= 0 { return n }
            if errno != EINTR { throw IOError("read") }
        }
    }

    /// Reads and throws away `count` bytes.
    public func discard(count: UInt64, deadlineMilliseconds: Int64? = nil) throws {
        var left = count
        var scratch = [UInt8](repeating: 0, count: 64 << 10)
        try scratch.withUnsafeMutableBytes { (b) throws in
            while left > 0 {
                let chunk = Int(min(left, UInt64(b.count)))
                try readExact(into: b.baseAddress!, count: chunk, deadlineMilliseconds: deadlineMilliseconds)
                left -= UInt64(chunk)
            }
        }
    }

    /// Writes all `count` bytes by `deadlineMilliseconds` (monotonic): a
    /// reader that stops reading is cut off at the deadline instead of
    /// pinning this thread, and whatever it holds, forever.
    public func writeAll(_ buffer: UnsafeRawPointer, count: Int, deadlineMilliseconds: Int64) throws {
        var done = 0
        while done < count {
            let n = send(fd, buffer + done, min(count - done, 1 << 30), Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n > 0 {
                done += n
            } else if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                try waitWritable(until: deadlineMilliseconds)
            } else if n < 0 && errno != EINTR {
                throw IOError("write")
            }
        }
    }

    public func writeAll(_ bytes: [UInt8], deadlineMilliseconds: Int64) throws {
        try bytes.withUnsafeBytes { (b) throws in
            if !b.isEmpty { try writeAll(b.baseAddress!, count: b.count, deadlineMilliseconds: deadlineMilliseconds) }
        }
    }

    /// Writes `bytes` with file descriptors attached to the first byte.
    public func writeAll(_ bytes: [UInt8], passing descriptors: [Int32], deadlineMilliseconds: Int64) throws {
        guard !descriptors.isEmpty else { return try writeAll(bytes, deadlineMilliseconds: deadlineMilliseconds) }
        precondition(!bytes.isEmpty && descriptors.count <= Self.maximumPassedDescriptors)
        while true {
            try waitWritable(until: deadlineMilliseconds)
            let sent = bytes.withUnsafeBytes { b in
                descriptors.withUnsafeBufferPointer { d in
                    snapshotd_send_with_fds(fd, b.baseAddress!, b.count, d.baseAddress!, Int32(d.count))
                }
            }
            if sent > 0 {
                if sent < bytes.count { try writeAll(Array(bytes[sent...]), deadlineMilliseconds: deadlineMilliseconds) }
                return
            }
            guard errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR else { throw IOError("sendmsg(SCM_RIGHTS)") }
        }
    }

    /// Reads exactly `count` bytes, collecting any descriptors that arrive with them.
    public func readExact(count: Int, collecting descriptors: inout [Int32]) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        var received = [Int32](repeating: -1, count: Self.maximumPassedDescriptors)
        while done < count {
            var fdCount: Int32 = 0
            let n = bytes.withUnsafeMutableBytes { b in
                received.withUnsafeMutableBufferPointer { r in
                    snapshotd_recv_with_fds(fd, b.baseAddress! + done, count - done, r.baseAddress!, Int32(r.count), &fdCount)
                }
            }
            descriptors.append(contentsOf: received.prefix(Int(fdCount)))
            if n > 0 {
                done += n
            } else if n == 0 {
                throw IOError.closed("recvmsg")
            } else {
                throw IOError("recvmsg")
            }
        }
        return bytes
    }

    // MARK: Helpers

    /// Waits until a byte can be read, or throws ``IOError/timedOut(_:)`` at the deadline.
    public func waitReadable(until deadlineMilliseconds: Int64) throws {
        try wait(for: Int16(POLLIN), until: deadlineMilliseconds, "read")
    }

    private func waitWritable(until deadlineMilliseconds: Int64) throws {
        try wait(for: Int16(POLLOUT), until: deadlineMilliseconds, "write")
    }

    private func wait(for events: Int16, until deadlineMilliseconds: Int64, _ operation: String) throws {
        while true {
            let left = deadlineMilliseconds - monotonicMilliseconds()
            guard left > 0 else { throw IOError.timedOut(operation) }
            var poller = pollfd(fd: fd, events: events, revents: 0)
            let ready = poll(&poller, 1, Int32(min(left, Int64(Int32.max))))
            if ready > 0 { return }
            if ready < 0 && errno != EINTR { throw IOError("poll") }
        }
    }

    private static func unixAddress(_ path: String) throws -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw IOError("socket path too long (\(bytes.count) bytes)", errno: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// A numeric IPv4 or IPv6 address (`localhost` is 127.0.0.1; no name
    /// lookups: a lookup could block without a deadline).
    private static func inetAddress(host: String, port: UInt16) throws -> (sockaddr_storage, socklen_t) {
        let resolved = host == "localhost" ? "127.0.0.1" : host
        if resolved.contains(":") {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = port.bigEndian
            guard inet_pton(AF_INET6, resolved, &address.sin6_addr) == 1 else {
                throw IOError("'\(host)' is not an IPv6 address", errno: EINVAL)
            }
            return stored(address)
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, resolved, &address.sin_addr) == 1 else {
            throw IOError("'\(host)' is not an IPv4 or IPv6 address", errno: EINVAL)
        }
        return stored(address)
    }

    /// `address` (a sockaddr_in or sockaddr_in6) in storage that fits either, and its length.
    private static func stored<Address>(_ address: Address) -> (sockaddr_storage, socklen_t) {
        var storage = sockaddr_storage()
        withUnsafeBytes(of: address) { source in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: source) } }
        return (storage, socklen_t(MemoryLayout<Address>.size))
    }
}

/// Monotonic clock in milliseconds, for deadlines.
public func monotonicMilliseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}
