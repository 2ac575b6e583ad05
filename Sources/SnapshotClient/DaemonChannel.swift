import Foundation
import Glibc
import SnapshotIO
public import SnapshotProtocol

/// One authenticated connection to a daemon with request/reply plumbing,
/// shared by the trainer client and the operator client. Calls are serialized.
final class DaemonChannel: @unchecked Sendable {
    let endpoint: Endpoint
    let connection: FramedConnection
    let lock = NSLock()
    private var nextRequestID: UInt64 = 1

    var usesSharedMemory: Bool {
        if case .unix = endpoint { return true }
        return false
    }

    /// Connects and, over TCP, answers the daemon's challenge before anything else.
    init(endpoint: Endpoint) throws {
        self.endpoint = endpoint
        switch endpoint {
        case .unix(let path):
            connection = FramedConnection(socket: try Socket.connectUnix(path: path))
        case .tcp(let host, let port, let secret):
            connection = FramedConnection(socket: try Socket.connectTCP(host: host, port: port))
            do {
                let (_, challenge) = try receiveFrame()
                guard case .challenge(let c) = challenge else { throw unexpected(challenge) }
                let reply = try call(.authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: c.nonce))))
                guard case .ok = reply else { throw unexpected(reply) }
            } catch {
                connection.close()
                throw error
            }
        }
    }

    deinit { connection.close() }

    func takeRequestID() -> UInt64 {
        defer { nextRequestID += 1 }
        return nextRequestID
    }

    func call(_ message: Message) throws -> Message {
        try lock.withLock {
            var descriptors: [Int32] = []
            let reply = try callLocked(message, collecting: &descriptors)
            descriptors.forEach { _ = close($0) }
            return reply
        }
    }

    /// With `lock` held: sends a request and returns its reply.
    func callLocked(_ message: Message, collecting descriptors: inout [Int32]) throws -> Message {
        try connection.send(message, requestID: takeRequestID())
        return try receiveReply(collecting: &descriptors).message
    }

    /// The next reply; an error reply (possibly for an earlier put) is thrown.
    func receiveReply(collecting descriptors: inout [Int32]) throws -> (header: FrameHeader, message: Message) {
        let (header, message) = try receiveFrame(collecting: &descriptors)
        if case .error(let e) = message {
            descriptors.forEach { _ = close($0) }
            descriptors = []
            throw SnapshotClientError(code: e.code, message: e.message)
        }
        return (header, message)
    }

    private func receiveFrame() throws -> (header: FrameHeader, message: Message) {
        var descriptors: [Int32] = []
        let frame = try receiveFrame(collecting: &descriptors)
        descriptors.forEach { _ = close($0) }
        return frame
    }

    private func receiveFrame(collecting descriptors: inout [Int32]) throws -> (header: FrameHeader, message: Message) {
        do {
            return try connection.receive(collecting: &descriptors, acceptDescriptors: usesSharedMemory)
        } catch {
            switch error {
            case .io(let e): throw SnapshotClientError(code: nil, message: "connection to snapshotd lost: \(e)")
            case .malformed(let e, _, _): throw SnapshotClientError(code: .malformedFrame, message: "bad frame from snapshotd: \(e)")
            }
        }
    }
}

func unexpected(_ message: Message) -> SnapshotClientError {
    SnapshotClientError(code: nil, message: "unexpected reply \(message.type) from snapshotd")
}

/// An operator's session (snapshotctl): sees every job on the daemon.
public final class OperatorClient: @unchecked Sendable {
    let channel: DaemonChannel
    public private(set) var daemonNodeID: NodeID = 0

    public init(endpoint: Endpoint) throws {
        channel = try DaemonChannel(endpoint: endpoint)
        let welcome = try channel.call(.hello(Hello(role: .operatorTool, job: nil)))
        guard case .welcome(let w) = welcome else { throw unexpected(welcome) }
        daemonNodeID = w.nodeID
    }

    public func status(job: JobID? = nil) throws -> StatusReply {
        let reply = try channel.call(.status(StatusRequest(job: job)))
        guard case .statusReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    /// The recovery picture as this daemon sees the cluster: dead and
    /// rebuilding nodes, and per job what is lost and what can be restored.
    public func recover() throws -> RecoverReply {
        let reply = try channel.call(.recover)
        guard case .recoverReply(let r) = reply else { throw unexpected(reply) }
        return r
    }
}
