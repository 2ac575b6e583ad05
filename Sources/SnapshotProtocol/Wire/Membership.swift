/// Who is alive and what the cluster holds: heartbeats both ways, and a
/// node's pull of a peer's view of the steps (clusterStateRequest →
/// clusterStateReply, page by page).

public struct Heartbeat: WirePayload {
    public static let type = MessageType.heartbeat
    public var nodeID: NodeID
    /// Incarnation of the sender: changes on every daemon start, so a node that
    /// came back is told apart from one that never left.
    public var incarnation: UInt64
    /// The sender holds less than the cluster committed for it (a replacement
    /// or a node restarted on an empty arena) and waits for a rebuild order.
    public var needsRebuild: Bool
    public init(nodeID: NodeID, incarnation: UInt64, needsRebuild: Bool = false) {
        self.nodeID = nodeID
        self.incarnation = incarnation
        self.needsRebuild = needsRebuild
    }

    public func encode(into w: inout ByteWriter) {
        w.write(nodeID)
        w.write(incarnation)
        w.write(needsRebuild)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nodeID = try r.read(NodeID.self, "nodeID")
        incarnation = try r.read(UInt64.self, "incarnation")
        needsRebuild = try r.readBool("needsRebuild")
    }
}

/// One node's readiness report of one step.
public struct ReportID: WireCodable {
    public var job: JobID
    public var step: Step
    public var node: NodeID
    public init(job: JobID, step: Step, node: NodeID) {
        self.job = job
        self.step = step
        self.node = node
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(node)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        node = try r.read(NodeID.self, "node")
    }
}

/// A request for the peer's view of the cluster's steps. `known` lists the
/// readiness reports the requester already holds: the reply leaves them out,
/// so a state pull (every tick while a step waits) carries only what is new
/// instead of every node's manifests again (tens of MiB at LLM scale).
public struct ClusterStateRequest: WirePayload {
    public static let type = MessageType.clusterStateRequest
    public var known: [ReportID]
    public init(known: [ReportID] = []) { self.known = known }

    public func encode(into w: inout ByteWriter) { w.write(list: known) }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        known = try r.readList("known", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 14)
    }
}

/// What a node knows of the cluster's steps: the readiness and protection
/// reports it holds. A replacement learns from this what to rebuild.
/// One page of a node's view: what the requester lacks, in step order, up
/// to a page size. `complete` is false when more is left; the requester asks
/// again, naming what it now knows, until a page is complete.
public struct ClusterStateReply: WirePayload {
    public static let type = MessageType.clusterStateReply
    public var steps: [ClusterStepState]
    public var complete: Bool
    public init(steps: [ClusterStepState], complete: Bool = true) {
        self.steps = steps
        self.complete = complete
    }

    public func encode(into w: inout ByteWriter) {
        w.write(list: steps)
        w.write(complete)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        steps = try r.readList("steps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 18)
        complete = try r.readBool("complete")
    }
}

public struct ClusterStepState: WireCodable {
    public var job: JobID
    public var step: Step
    public var committed: Bool
    public var ready: [StepReady]
    public var protectedNodes: [NodeID]
    /// Nodes known to hold every node's protected report.
    public var stableNodes: [NodeID]
    public init(job: JobID, step: Step, committed: Bool, ready: [StepReady], protectedNodes: [NodeID], stableNodes: [NodeID] = []) {
        self.job = job
        self.step = step
        self.committed = committed
        self.ready = ready
        self.protectedNodes = protectedNodes
        self.stableNodes = stableNodes
    }

    public func encode(into w: inout ByteWriter) {
        w.write(job)
        w.write(step)
        w.write(committed)
        w.write(list: ready)
        w.write(list: protectedNodes)
        w.write(list: stableNodes)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        job = try r.readJobID()
        step = try r.read(Step.self, "step")
        committed = try r.readBool("committed")
        ready = try r.readList("ready", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 27)
        protectedNodes = try r.readNodeList("protectedNodes")
        stableNodes = try r.readNodeList("stableNodes")
    }
}
