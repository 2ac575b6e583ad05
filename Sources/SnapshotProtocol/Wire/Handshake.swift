/// Session set-up: the daemon's challenge, the client's answer, then hello
/// (who the client is) and welcome (who the daemon is).

public struct Challenge: WirePayload {
    public static let type = MessageType.challenge
    public var nonce: [UInt8]
    public init(nonce: [UInt8]) { self.nonce = nonce }

    public func encode(into w: inout ByteWriter) { w.write(raw: nonce) }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nonce = try r.readRaw(count: ProtocolLimits.authenticationNonceBytes, "nonce")
    }
}

public struct Authenticate: WirePayload {
    public static let type = MessageType.authenticate
    /// HMAC-SHA256(secret, nonce).
    public var tag: [UInt8]
    public init(tag: [UInt8]) { self.tag = tag }

    public func encode(into w: inout ByteWriter) { w.write(raw: tag) }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        tag = try r.readRaw(count: ProtocolLimits.authenticationTagBytes, "tag")
    }
}

public struct Hello: WirePayload {
    public static let type = MessageType.hello
    public var role: PeerRole
    /// Required for trainers: the only job this session may touch.
    public var job: JobID?
    public var rank: Rank
    public var world: UInt32
    public var topology: Topology
    /// For peers: the sending daemon's node id.
    public var nodeID: NodeID
    /// Trainers: how many of the job's ranks use this node's daemon (torchrun's
    /// LOCAL_WORLD_SIZE). The node's share of a step is complete when that many
    /// shards are sealed. 0 means all `world` ranks are local (single node).
    public var localWorld: UInt32

    public init(role: PeerRole, job: JobID?, rank: Rank = 0, world: UInt32 = 0, topology: Topology = Topology(), nodeID: NodeID = 0, localWorld: UInt32 = 0) {
        self.role = role
        self.job = job
        self.rank = rank
        self.world = world
        self.topology = topology
        self.nodeID = nodeID
        self.localWorld = localWorld
    }

    public func encode(into w: inout ByteWriter) {
        w.write(role.rawValue)
        w.writeOptional(job)
        w.write(rank)
        w.write(world)
        w.write(topology)
        w.write(nodeID)
        w.write(localWorld)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        let role = try r.readEnum(PeerRole.self, "role")
        let job = try r.readOptionalJobID()
        let rank = try r.read(Rank.self, "rank")
        let world = try r.read(UInt32.self, "world")
        let topology = try r.readTopology()
        let node = try r.read(NodeID.self, "nodeID")
        let localWorld = try r.read(UInt32.self, "localWorld")
        if role == .trainer {
            guard job != nil else { throw .emptyField("job") }
            guard world >= 1, world <= ProtocolLimits.maximumWorldSize else {
                throw .invalidValue(field: "world", reason: "must be 1...\(ProtocolLimits.maximumWorldSize), got \(world)")
            }
            guard rank < world else { throw .invalidValue(field: "rank", reason: "rank \(rank) is not below world \(world)") }
            guard localWorld <= world else { throw .invalidValue(field: "localWorld", reason: "\(localWorld) local ranks exceed world \(world)") }
        }
        self.init(role: role, job: job, rank: rank, world: world, topology: topology, nodeID: node, localWorld: localWorld)
    }
}

/// The daemon's node id (a peer checks it is the node it dialled). Its
/// version is in ``StatusReply``.
public struct Welcome: WirePayload {
    public static let type = MessageType.welcome
    public var nodeID: NodeID
    public init(nodeID: NodeID) { self.nodeID = nodeID }

    public func encode(into w: inout ByteWriter) { w.write(nodeID) }

    public init(from r: inout ByteReader) throws(ProtocolError) { nodeID = try r.read(NodeID.self, "nodeID") }
}
