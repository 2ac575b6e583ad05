/// Rebuilding what a node lost: the coordinator's order (rebuildOrder → ok),
/// pipelined repair along a chain of survivors (repairRequest → repairSlice…)
/// and whole shards for a CheckFree rebuild or an export (shardGet → shardData).

/// The coordinator tells a node to rebuild what it lost.
public struct RebuildOrder: WirePayload {
    public static let type = MessageType.rebuildOrder
    public var nodeID: NodeID
    public var coordinator: NodeID
    public init(nodeID: NodeID, coordinator: NodeID) {
        self.nodeID = nodeID
        self.coordinator = coordinator
    }

    public func encode(into w: inout ByteWriter) {
        w.write(nodeID)
        w.write(coordinator)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nodeID = try r.read(NodeID.self, "nodeID")
        coordinator = try r.read(NodeID.self, "coordinator")
    }
}

/// One survivor of a pipelined repair: its node, the fragment index it holds
/// in the stripe, and the GF(2^8) coefficient of that fragment in the sum
/// that rebuilds the target.
public struct RepairHop: WireCodable {
    public var nodeID: NodeID
    public var index: UInt16
    public var coefficient: UInt8
    public init(nodeID: NodeID, index: UInt16, coefficient: UInt8) {
        self.nodeID = nodeID
        self.index = index
        self.coefficient = coefficient
    }

    public func encode(into w: inout ByteWriter) {
        w.write(nodeID)
        w.write(index)
        w.write(coefficient)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nodeID = try r.read(NodeID.self, "nodeID")
        index = try r.read(UInt16.self, "index")
        coefficient = try r.read(UInt8.self, "coefficient")
    }
}

/// Asks `chain.last` for the partial repair sum Σ coefficient · fragment over
/// the whole chain, for rebuilding `fragment` (its `index` is the target). The
/// receiver asks `chain.dropLast()` of the hop before it the same way, adds
/// its own term and streams the result back, one ``RepairSlice`` per
/// `sliceSizeBytes` (the last may be shorter).
public struct RepairRequest: WirePayload {
    public static let type = MessageType.repairRequest
    public var fragment: FragmentID
    public var fragmentSizeBytes: UInt64
    public var sliceSizeBytes: UInt32
    public var chain: [RepairHop]
    public init(fragment: FragmentID, fragmentSizeBytes: UInt64, sliceSizeBytes: UInt32, chain: [RepairHop]) {
        self.fragment = fragment
        self.fragmentSizeBytes = fragmentSizeBytes
        self.sliceSizeBytes = sliceSizeBytes
        self.chain = chain
    }

    /// Slices in the stream: at least one, even for an empty fragment.
    public var sliceCount: Int { max(1, Int((fragmentSizeBytes + UInt64(sliceSizeBytes) - 1) / UInt64(sliceSizeBytes))) }

    /// Byte range of slice `number` within the fragment.
    public func slice(_ number: Int) -> (offsetBytes: UInt64, countBytes: Int) {
        let offset = UInt64(number) * UInt64(sliceSizeBytes)
        return (offset, Int(min(UInt64(sliceSizeBytes), fragmentSizeBytes - min(offset, fragmentSizeBytes))))
    }

    public func encode(into w: inout ByteWriter) {
        w.write(fragment)
        w.write(fragmentSizeBytes)
        w.write(sliceSizeBytes)
        w.write(list: chain)
    }

    /// A bounded slice size and fragment size, and a non-empty chain of distinct nodes.
    public init(from r: inout ByteReader) throws(ProtocolError) {
        fragment = try FragmentID(from: &r)
        fragmentSizeBytes = try r.read(UInt64.self, "fragmentSizeBytes")
        sliceSizeBytes = try r.read(UInt32.self, "sliceSizeBytes")
        guard ProtocolLimits.repairSliceBytesRange.contains(sliceSizeBytes) else {
            throw .invalidValue(field: "sliceSizeBytes", reason: "\(sliceSizeBytes) is outside \(ProtocolLimits.repairSliceBytesRange)")
        }
        guard fragmentSizeBytes <= ProtocolLimits.maximumBulkBytes else {
            throw .invalidValue(field: "fragmentSizeBytes", reason: "\(fragmentSizeBytes) exceeds the bulk limit")
        }
        chain = try r.readList("chain", limit: ProtocolLimits.maximumRepairChainHops, minimumElementBytes: 7)
        guard !chain.isEmpty else { throw .emptyField("chain") }
        guard Set(chain.map(\.nodeID)).count == chain.count else { throw .invalidValue(field: "chain", reason: "a node appears twice") }
    }
}

/// One slice of a partial repair sum (bulk = the slice).
public struct RepairSlice: WirePayload {
    public static let type = MessageType.repairSlice
    public var offsetBytes: UInt64
    public var crc32c: UInt32
    public init(offsetBytes: UInt64, crc32c: UInt32) {
        self.offsetBytes = offsetBytes
        self.crc32c = crc32c
    }

    public func encode(into w: inout ByteWriter) {
        w.write(offsetBytes)
        w.write(crc32c)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        offsetBytes = try r.read(UInt64.self, "offsetBytes")
        crc32c = try r.read(UInt32.self, "crc32c")
    }
}

/// A peer asks for one rank's committed shard (bulk reply: ``ShardData``).
public struct ShardGet: WirePayload {
    public static let type = MessageType.shardGet
    public var job: JobID
    public var step: Step
    public var rank: Rank
    public init(job: JobID, step: Step, rank: Rank) {
        self.job = job
        self.step = step
        self.rank = rank
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(rank)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        rank = try r.read(Rank.self, "rank")
    }
}

/// A shard's segment, served whole (bulk = `segmentSizeBytes`). The asker
/// knows its manifest from the cluster's reports and checks every tensor's CRC.
public struct ShardData: WirePayload {
    public static let type = MessageType.shardData
    public var job: JobID
    public var step: Step
    public var rank: Rank
    public var segmentSizeBytes: UInt64
    public init(job: JobID, step: Step, rank: Rank, segmentSizeBytes: UInt64) {
        self.job = job
        self.step = step
        self.rank = rank
        self.segmentSizeBytes = segmentSizeBytes
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(rank)
        w.write(segmentSizeBytes)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        rank = try r.read(Rank.self, "rank")
        segmentSizeBytes = try r.read(UInt64.self, "segmentSizeBytes")
    }
}
