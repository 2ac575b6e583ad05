import Foundation
import Glibc
import RDMATransport
import SnapshotIO
public import SnapshotProtocol
import Synchronization

/// One authenticated connection to a daemon with request/reply plumbing,
/// shared by the trainer client and the operator client. Calls are
/// serialized: each holds the channel's ``Turn`` from its request to its reply.
final class DaemonChannel: Sendable {
    let endpoint: Endpoint
    let connection: FramedConnection
    /// The right to talk on the connection, held for a whole request and its
    /// reply so the stream stays in step. Request IDs come from it, so only
    /// its holder can send a request or read a reply.
    struct Turn: Sendable {
        private var nextRequestID: UInt64 = 1

        mutating func takeRequestID() -> UInt64 {
            defer { nextRequestID += 1 }
            return nextRequestID
        }
    }
    private let turn = Mutex(Turn())
    /// How long a reply may take to start, unless a call says otherwise.
    let replyTimeoutMilliseconds: Int64
    static let defaultReplyTimeoutMilliseconds: Int64 = 60_000

    var usesSharedMemory: Bool {
        if case .unix = endpoint { return true }
        return false
    }

    /// Connects and, over TCP, answers the daemon's challenge before anything else.
    init(endpoint: Endpoint, replyTimeoutMilliseconds: Int64 = DaemonChannel.defaultReplyTimeoutMilliseconds) throws {
        self.endpoint = endpoint
        self.replyTimeoutMilliseconds = replyTimeoutMilliseconds
        switch endpoint {
        case .unix(let path):
            connection = FramedConnection(stream: try Socket.connectUnix(path: path))
        case .tcp(let host, let port, let secret):
            connection = FramedConnection(stream: try Socket.connectTCP(host: host, port: port, timeoutMilliseconds: replyTimeoutMilliseconds))
            try answerChallenge(secret: secret)
        case .rdma(let host, let port, let secret, let source):
            do {
                connection = FramedConnection(
                    stream: try RDMAStream.connect(from: source, to: host, port: port, timeoutMilliseconds: Int32(clamping: replyTimeoutMilliseconds)))
            } catch {
                throw SnapshotClientError(code: nil, message: "cannot connect to snapshotd at \(host):\(port) over RDMA: \(error)")
            }
            try answerChallenge(secret: secret)
        }
    }

    /// A remote daemon's challenge, answered before anything else.
    private func answerChallenge(secret: [UInt8]) throws {
        do {
            try serialized { turn in
                try connection.stream.waitReadable(until: monotonicMilliseconds() + replyTimeoutMilliseconds)
                let (_, challenge) = try receiveFrame()
                guard case .challenge(let c) = challenge else { throw unexpected(challenge) }
                var descriptors: [Int32] = []
                let reply = try call(.authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: c.nonce))), in: &turn, collecting: &descriptors)
                descriptors.forEach { _ = close($0) }
                guard case .ok = reply else { throw unexpected(reply) }
            }
        } catch {
            connection.close()
            throw error
        }
    }

    deinit { connection.close() }

    /// Runs `body` holding the channel's turn: calls from several threads run one at a time.
    func serialized<Result>(_ body: (inout Turn) throws -> Result) rethrows -> Result {
        try turn.withLock { turn in try body(&turn) }
    }

    func call(_ message: Message) throws -> Message {
        try serialized { turn in
            var descriptors: [Int32] = []
            let reply = try call(message, in: &turn, collecting: &descriptors)
            descriptors.forEach { _ = close($0) }
            return reply
        }
    }

    /// Sends a request and returns its reply.
    func call(_ message: Message, in turn: inout Turn, collecting descriptors: inout [Int32], timeoutMilliseconds: Int64? = nil) throws -> Message {
        let requestID = try send(message, in: &turn)
        return try receiveReply(to: requestID, in: &turn, collecting: &descriptors, timeoutMilliseconds: timeoutMilliseconds).message
    }

    /// Sends a request (its bulk bytes, if any, follow); returns its request ID.
    @discardableResult
    func send(_ message: Message, in turn: inout Turn, bulkLength: UInt64 = 0) throws -> UInt64 {
        let requestID = turn.takeRequestID()
        do {
            try connection.send(message, requestID: requestID, bulkLength: bulkLength)
        } catch {
            connection.close()
            throw SnapshotClientError(code: nil, message: "connection to snapshotd lost while sending \(message.type): \(error)")
        }
        return requestID
    }

    /// The reply to `requestID`, which must start within `timeoutMilliseconds`
    /// (default ``replyTimeoutMilliseconds``). Error replies to earlier
    /// requests that had none of their own (a refused put) are read on the
    /// way: the first is thrown once this request's reply is in, so the
    /// stream stays in step. A timeout or a reply to a request never made
    /// closes the connection: it can no longer be trusted to be in step.
    func receiveReply(
        to requestID: UInt64, in turn: inout Turn, collecting descriptors: inout [Int32], timeoutMilliseconds: Int64? = nil
    ) throws -> (header: FrameHeader, message: Message) {
        let deadline = monotonicMilliseconds() + (timeoutMilliseconds ?? replyTimeoutMilliseconds)
        var earlierRefusal: SnapshotClientError?
        while true {
            do {
                try connection.stream.waitReadable(until: deadline)
            } catch let error as IOError where error.errnoCode != ETIMEDOUT {
                // Over RDMA the wait itself sees the peer leave.
                connection.close()
                throw SnapshotClientError(code: nil, message: "connection to snapshotd lost while waiting for the reply to request \(requestID): \(error)")
            } catch {
                connection.close()
                throw SnapshotClientError(code: .timeout, message: "snapshotd did not answer request \(requestID) within \(timeoutMilliseconds ?? replyTimeoutMilliseconds) ms; connection closed")
            }
            let (header, message) = try receiveFrame(collecting: &descriptors)
            if header.requestID == requestID {
                let refusal: SnapshotClientError? = if case .error(let e) = message { SnapshotClientError(code: e.code, message: e.message) } else { nil }
                if let failure = earlierRefusal ?? refusal {
                    descriptors.forEach { _ = close($0) }
                    descriptors = []
                    throw failure
                }
                return (header, message)
            }
            guard header.requestID < requestID, case .error(let e) = message else {
                connection.close()
                throw SnapshotClientError(code: .malformedFrame, message: "snapshotd answered request \(header.requestID) while request \(requestID) was waiting; connection closed")
            }
            descriptors.forEach { _ = close($0) }
            descriptors = []
            earlierRefusal = earlierRefusal ?? SnapshotClientError(code: e.code, message: "an earlier request (\(header.requestID)) was refused: \(e.message)")
        }
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
public final class OperatorClient: Sendable {
    let channel: DaemonChannel
    public let daemonNodeID: NodeID

    /// - Parameter replyTimeoutMilliseconds: how long a reply may take to
    ///   start before the call fails with ``ErrorCode/timeout``.
    public init(endpoint: Endpoint, replyTimeoutMilliseconds: Int64 = 60_000) throws {
        let channel = try DaemonChannel(endpoint: endpoint, replyTimeoutMilliseconds: replyTimeoutMilliseconds)
        self.channel = channel
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

    /// Rebuilds `job`'s lost pipeline stages approximately from their
    /// neighbours (CheckFree) at the newest step where that is possible.
    /// Fails with ``ErrorCode/unrecoverable`` and the reason when CheckFree
    /// cannot help, ``ErrorCode/invalidRequest`` when nothing is lost.
    public func checkFree(job: JobID) throws -> CheckFreeReply {
        let reply = try channel.call(.checkFree(CheckFreeRequest(job: job)))
        guard case .checkFreeReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    /// Every node (asked concurrently by this daemon) and every group's health.
    public func clusterStatus() throws -> ClusterStatusReply {
        let reply = try channel.call(.clusterStatus)
        guard case .clusterStatusReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    /// Sets (or with `cancel` clears) `node`'s drain; says whether it may stop now.
    public func drain(node: NodeID, cancel: Bool = false) throws -> DrainReply {
        let reply = try channel.call(.drain(DrainRequest(node: node, cancel: cancel)))
        guard case .drainReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    /// Re-checks CRCs and parity on every node (or `node`), of `job` and `step` if given.
    public func verify(job: JobID? = nil, step: Step? = nil, node: NodeID? = nil) throws -> VerifyReply {
        let reply = try channel.call(.verify(VerifyRequest(job: job, step: step, node: node)))
        guard case .verifyReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    /// What rebuilding `node` takes, and how much of it is done.
    public func rebuildPlan(node: NodeID) throws -> RebuildPlanReply {
        let reply = try channel.call(.rebuildPlan(RebuildPlanRequest(node: node)))
        guard case .rebuildPlanReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    /// Has the daemon write a committed step of `job` (the newest when
    /// `step` is nil) to `directory` on its machine, in the export format:
    /// one safetensors file per rank and a JSON manifest.
    public func export(job: JobID, step: Step?, directory: String) throws -> ExportReply {
        let reply = try channel.call(.export(ExportRequest(job: job, step: step, directory: directory)))
        guard case .exportReply(let r) = reply else { throw unexpected(reply) }
        return r
    }
}
