/// Protecting a step between daemons: each node sends its data fragments to
/// their parity holders (fragmentPut → fragmentAck), reports its share ready
/// (stepReady) and protected (stepProtected); a rebuild fetches fragments
/// back (fragmentGet → fragmentData).

/// Identifies one fragment of one stripe of a node's step data.
/// `index` is the RS fragment index: `0..<k` data slots, `k..<k+m` parity rows.
public struct FragmentID: WireCodable {
    public var job: JobID
    public var step: Step
    public var stripe: UInt16
    public var index: UInt16
    public init(job: JobID, step: Step, stripe: UInt16, index: UInt16) {
        self.job = job
        self.step = step
        self.stripe = stripe
        self.index = index
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(stripe)
        w.write(index)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        stripe = try r.read(UInt16.self, "stripe")
        index = try r.read(UInt16.self, "index")
    }
}

/// A data fragment on its way to a parity holder (bulk = the fragment).
public struct FragmentPut: WirePayload {
    public static let type = MessageType.fragmentPut
    public var fragment: FragmentID
    public var sourceNode: NodeID
    public var fragmentSizeBytes: UInt64
    public var crc32c: UInt32
    public init(fragment: FragmentID, sourceNode: NodeID, fragmentSizeBytes: UInt64, crc32c: UInt32) {
        self.fragment = fragment
        self.sourceNode = sourceNode
        self.fragmentSizeBytes = fragmentSizeBytes
        self.crc32c = crc32c
    }

    public func encode(into w: inout ByteWriter) {
        w.write(fragment)
        w.write(sourceNode)
        w.write(fragmentSizeBytes)
        w.write(crc32c)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        fragment = try FragmentID(from: &r)
        sourceNode = try r.read(NodeID.self, "sourceNode")
        fragmentSizeBytes = try r.read(UInt64.self, "fragmentSizeBytes")
        crc32c = try r.read(UInt32.self, "crc32c")
    }
}

/// A parity holder has folded `fragment` in (the reply to its fragmentPut).
public struct FragmentAck: WirePayload {
    public static let type = MessageType.fragmentAck
    public var fragment: FragmentID
    public init(fragment: FragmentID) { self.fragment = fragment }

    public func encode(into w: inout ByteWriter) { w.write(fragment) }

    public init(from r: inout ByteReader) throws(ProtocolError) { fragment = try FragmentID(from: &r) }
}

public struct FragmentGet: WirePayload {
    public static let type = MessageType.fragmentGet
    public var fragment: FragmentID
    public init(fragment: FragmentID) { self.fragment = fragment }

    public func encode(into w: inout ByteWriter) { w.write(fragment) }

    public init(from r: inout ByteReader) throws(ProtocolError) { fragment = try FragmentID(from: &r) }
}

/// A fragment served for a rebuild (bulk = the fragment).
public struct FragmentData: WirePayload {
    public static let type = MessageType.fragmentData
    public var fragment: FragmentID
    public var fragmentSizeBytes: UInt64
    public var crc32c: UInt32
    public init(fragment: FragmentID, fragmentSizeBytes: UInt64, crc32c: UInt32) {
        self.fragment = fragment
        self.fragmentSizeBytes = fragmentSizeBytes
        self.crc32c = crc32c
    }

    public func encode(into w: inout ByteWriter) {
        w.write(fragment)
        w.write(fragmentSizeBytes)
        w.write(crc32c)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        fragment = try FragmentID(from: &r)
        fragmentSizeBytes = try r.read(UInt64.self, "fragmentSizeBytes")
        crc32c = try r.read(UInt32.self, "crc32c")
    }
}

/// A node's share of a step is sealed: its size (the bytes it protects) and
/// its shards' manifests (self-checking blobs), so any peer can commit the
/// step and any survivor can tell a replacement what it held.
public struct StepReady: WirePayload {
    public static let type = MessageType.stepReady
    public var job: JobID
    public var step: Step
    public var nodeID: NodeID
    public var world: UInt32
    public var dataSizeBytes: UInt64
    public var manifests: [[UInt8]]
    public init(job: JobID, step: Step, nodeID: NodeID, world: UInt32, dataSizeBytes: UInt64, manifests: [[UInt8]]) {
        self.job = job
        self.step = step
        self.nodeID = nodeID
        self.world = world
        self.dataSizeBytes = dataSizeBytes
        self.manifests = manifests
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(nodeID)
        w.write(world)
        w.write(dataSizeBytes)
        w.writeCount(manifests.count)
        for blob in manifests { w.write(blob: blob) }
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        nodeID = try r.read(NodeID.self, "nodeID")
        world = try r.read(UInt32.self, "world")
        dataSizeBytes = try r.read(UInt64.self, "dataSizeBytes")
        let count = try r.readCount("manifests", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 4)
        manifests = []
        manifests.reserveCapacity(count)
        for _ in 0..<count { manifests.append(try r.readBlob("manifests", limitBytes: ProtocolLimits.maximumManifestBytes)) }
    }
}

/// Every fragment of a node's share of a step has been acknowledged by its
/// parity holders; with `stable`, the node also knows every node's protected
/// report for the step (a step commits only once every node is stable, so a
/// commit anywhere means every node knew it could: no node's death can take
/// the knowledge with it).
public struct StepProtected: WirePayload {
    public static let type = MessageType.stepProtected
    public var job: JobID
    public var step: Step
    public var nodeID: NodeID
    public var stable: Bool
    public init(job: JobID, step: Step, nodeID: NodeID, stable: Bool = false) {
        self.job = job
        self.step = step
        self.nodeID = nodeID
        self.stable = stable
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(nodeID)
        w.write(stable)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        nodeID = try r.read(NodeID.self, "nodeID")
        stable = try r.readBool("stable")
    }
}
