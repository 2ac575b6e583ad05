import Foundation
import Glibc
import Logging
import RDMATransport
import SnapshotIO
import SnapshotProtocol
import Synchronization
import SnapshotCore

/// Outbound connections from this daemon to its peers: TCP or RDMA
/// (``use(_:)``), authenticated with the shared secret like any client, then
/// introduced as a peer. One
/// connection per (peer, purpose) so heartbeats never queue behind a bulk
/// fragment transfer. A failed exchange drops the connection; the next one
/// reconnects.
final class PeerMesh: Sendable {
    enum Purpose: Hashable {
        case heartbeat, control, data
    }

    struct Key: Hashable {
        let node: NodeID
        let purpose: Purpose
    }

    /// One shared connection. `exchange` serializes its users and is held
    /// across their I/O; `connection` has its own lock so ``closeAll()`` can
    /// shut a socket down (waking a blocked exchange) without waiting for it.
    final class Channel: Sendable {
        let exchange = Mutex<Void>(())
        private let current = Mutex<FramedConnection?>(nil)

        var connection: FramedConnection? {
            get { current.withLock { $0 } }
            set { current.withLock { $0 = newValue } }
        }
    }

    let selfID: NodeID
    let cluster: ClusterConfiguration
    let secret: [UInt8]
    let logger: Logger
    /// One channel per (peer, purpose), all made up front: the set never
    /// changes, so finding one takes no lock.
    private let channels: [Key: Channel]
    /// How peers are reached, as start decided (``TransportSelection``): TCP
    /// until then. With `rdma` or `auto`, every peer over RDMA unless its
    /// `[[node]]` entry says `transport = "tcp"`; with `auto` (and a peer
    /// not pinned to `rdma`), one that does not answer over RDMA over TCP.
    private let transport = Mutex<TransportMode>(.tcp)
    /// Peers reached over TCP because they did not answer over RDMA, and
    /// when: RDMA is tried again only after ``Limits/rdmaRetryMilliseconds`` (a peer
    /// without RDMA must not cost a connect timeout on every reconnect).
    /// Logged once each way.
    private let fellBackToTCP = Mutex<[NodeID: Int64]>([:])

    init(selfID: NodeID, cluster: ClusterConfiguration, secret: [UInt8], logger: Logger) {
        self.selfID = selfID
        self.cluster = cluster
        self.secret = secret
        self.logger = logger
        var channels: [Key: Channel] = [:]
        for node in cluster.nodeIDs where node != selfID {
            for purpose in [Purpose.heartbeat, .control, .data] { channels[Key(node: node, purpose: purpose)] = Channel() }
        }
        self.channels = channels
    }

    var peers: [NodeID] { cluster.nodeIDs.filter { $0 != selfID } }

    /// Sets how peers are reached; connections open from now on follow it.
    func use(_ mode: TransportMode) { transport.withLock { $0 = mode } }

    /// A byte stream to `peer`: over RDMA when this node and the peer's
    /// entry allow it, else (or, under `auto`, when RDMA does not answer) TCP.
    private func openStream(to peer: ClusterConfiguration.Node, timeoutMilliseconds: Int64) throws -> any ByteStream {
        let mode = transport.withLock { $0 }
        let started = monotonicMilliseconds()
        let backingOff = mode == .auto && peer.transport == .auto
            && fellBackToTCP.withLock { $0[peer.id].map { started - $0 < Limits.rdmaRetryMilliseconds } ?? false }
        if mode != .tcp, peer.transport != .tcp, !backingOff, let source = cluster.node(selfID)?.host {
            do {
                let stream = try RDMAStream.connect(from: source, to: peer.host, port: peer.port, timeoutMilliseconds: Int32(clamping: timeoutMilliseconds))
                if monotonicMilliseconds() - started > 1000 {
                    logger.notice("RDMA connection to a peer was slow to establish", metadata: ["peer": "\(peer.id)", "milliseconds": "\(monotonicMilliseconds() - started)"])
                }
                if fellBackToTCP.withLock({ $0.removeValue(forKey: peer.id) }) != nil {
                    logger.notice("peer answers over RDMA again", metadata: ["peer": "\(peer.id)", "address": "\(peer.address)"])
                }
                return stream
            } catch {
                guard mode == .auto, peer.transport == .auto else {
                    throw PeerError(code: nil, message: "node \(peer.id) at \(peer.address) does not answer over RDMA (transport = \"rdma\"): \(error)")
                }
                // A peer that is down answers neither way: only one that answers over TCP has fallen back.
                let left = max(1, timeoutMilliseconds - (monotonicMilliseconds() - started))
                let socket = try Socket.connectTCP(host: peer.host, port: peer.port, timeoutMilliseconds: left)
                if fellBackToTCP.withLock({ $0.updateValue(started, forKey: peer.id) }) == nil {
                    logger.warning("peer does not answer over RDMA: falling back to TCP (transport = \"auto\")", metadata: [
                        "peer": "\(peer.id)", "address": "\(peer.address)", "error": "\(error)",
                    ])
                }
                return socket
            }
        }
        return try Socket.connectTCP(host: peer.host, port: peer.port, timeoutMilliseconds: timeoutMilliseconds)
    }

    private func channel(_ key: Key) throws -> Channel {
        guard let channel = channels[key] else { throw PeerError(code: nil, message: "node \(key.node) is not a peer of node \(selfID)") }
        return channel
    }

    /// Runs `body` with an established connection to `node`, serialized with
    /// other users of the same channel. Errors drop the connection. When a
    /// reused connection fails, `body` runs once more on a fresh one: the peer
    /// may have been replaced since (same address, new process), which is
    /// exactly when the message matters.
    func withConnection<T: Sendable>(_ node: NodeID, _ purpose: Purpose, timeoutMilliseconds: Int64, _ body: (FramedConnection) throws -> T) throws -> T {
        let channel = try channel(Key(node: node, purpose: purpose))
        return try channel.exchange.withLock { _ in
            let reused = channel.connection != nil
            do {
                return try attempt(channel, node, purpose, timeoutMilliseconds, body)
            } catch where reused {
                return try attempt(channel, node, purpose, timeoutMilliseconds, body)
            }
        }
    }

    private func attempt<T: Sendable>(_ channel: Channel, _ node: NodeID, _ purpose: Purpose, _ timeoutMilliseconds: Int64, _ body: (FramedConnection) throws -> T) throws -> T {
        do {
            let connection = try channel.connection ?? connect(node, purpose, timeoutMilliseconds: timeoutMilliseconds)
            channel.connection = connection
            return try body(connection)
        } catch {
            channel.connection?.close()
            channel.connection = nil
            throw error
        }
    }

    /// A connection of its own, outside the shared channels, for one
    /// long-running exchange; the caller closes it. A repair chain needs this:
    /// its hops wait on each other, and waiting while holding a shared channel
    /// could deadlock with a chain running the other way.
    func openConnection(_ node: NodeID, _ purpose: Purpose, timeoutMilliseconds: Int64) throws -> FramedConnection {
        try connect(node, purpose, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// A request and its reply (an error reply is thrown as ``PeerError``).
    func request(_ node: NodeID, _ purpose: Purpose, _ message: Message, timeoutMilliseconds: Int64) throws -> Message {
        try withConnection(node, purpose, timeoutMilliseconds: timeoutMilliseconds) { connection in
            try connection.send(message, requestID: 1)
            return try Self.reply(connection)
        }
    }

    /// The peer's reply, which must start within the connection's frame timeout.
    static func reply(_ connection: FramedConnection) throws -> Message {
        do {
            // Replies come from authenticated peers: manifests-carrying ones may be large.
            let message = try connection.receiveReply(deadlineMilliseconds: connection.deadline(), maximumPayloadBytes: ProtocolLimits.maximumLargeControlPayloadBytes).message
            if case .error(let e) = message { throw PeerError(code: e.code, message: e.message) }
            return message
        } catch let error as ConnectionError {
            throw PeerError(code: nil, message: "\(error)")
        }
    }

    /// How long a reply may take to start, by purpose (``Limits``).
    static func replyTimeoutMilliseconds(_ purpose: Purpose, connectTimeoutMilliseconds: Int64) -> Int64 {
        switch purpose {
        case .heartbeat: max(connectTimeoutMilliseconds, Limits.heartbeatReplyTimeoutMilliseconds)
        case .control: Limits.controlReplyTimeoutMilliseconds
        case .data: Limits.dataReplyTimeoutMilliseconds
        }
    }

    private func connect(_ node: NodeID, _ purpose: Purpose, timeoutMilliseconds: Int64) throws -> FramedConnection {
        guard let peer = cluster.node(node) else { throw PeerError(code: nil, message: "node \(node) is not in the cluster file") }
        let connection = FramedConnection(
            stream: try openStream(to: peer, timeoutMilliseconds: timeoutMilliseconds), frameTimeoutMilliseconds: Self.replyTimeoutMilliseconds(purpose, connectTimeoutMilliseconds: timeoutMilliseconds))
        do {
            guard case .challenge(let challenge) = try connection.receiveReply(deadlineMilliseconds: connection.deadline()).message else {
                throw PeerError(code: nil, message: "node \(node) did not send an authentication challenge")
            }
            try connection.send(.authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: challenge.nonce))), requestID: 0)
            guard case .ok = try Self.reply(connection) else { throw PeerError(code: nil, message: "node \(node) refused authentication") }
            try connection.send(.hello(Hello(role: .peer, job: nil, nodeID: selfID)), requestID: 0)
            guard case .welcome(let welcome) = try Self.reply(connection), welcome.nodeID == node else {
                throw PeerError(code: nil, message: "the daemon at \(peer.address) is not node \(node)")
            }
            return connection
        } catch {
            connection.close()
            throw error
        }
    }

    func closeAll() {
        for channel in channels.values { channel.connection?.stream.shutdownBoth() }
    }
}

struct PeerError: Error, CustomStringConvertible {
    let code: ErrorCode?
    let message: String
    var description: String { code.map { "\($0): \(message)" } ?? message }
}
