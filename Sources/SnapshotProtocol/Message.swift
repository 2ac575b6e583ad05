/// One decoded control message: what the daemon and its clients switch over.
/// Each payload's struct declares its type code and its coding together
/// (``WirePayload``, in Wire/); this enum only wraps them, and its coding is
/// a dispatch, one line a case. The four messages without a payload
/// (latestCommitted, recover, clusterStatus, ok) are bare cases; abortSave
/// and releaseRestore share ``StepRequest``.
public enum Message: Hashable, Sendable {
    case challenge(Challenge)
    case authenticate(Authenticate)
    case hello(Hello)
    case welcome(Welcome)
    case beginSave(BeginSave)
    case saveReady(SaveReady)
    case putTensor(PutTensor)
    case commitSave(CommitSave)
    case saveAccepted(SaveAccepted)
    case abortSave(StepRequest)
    case latestCommitted
    case latestCommittedReply(LatestCommittedReply)
    case waitCommitted(WaitCommitted)
    case restore(Restore)
    case restoreReady(RestoreReady)
    case releaseRestore(StepRequest)
    case status(StatusRequest)
    case statusReply(StatusReply)
    case fragmentPut(FragmentPut)
    case fragmentAck(FragmentAck)
    case fragmentGet(FragmentGet)
    case fragmentData(FragmentData)
    case heartbeat(Heartbeat)
    case stepReady(StepReady)
    case stepProtected(StepProtected)
    case clusterStateRequest(ClusterStateRequest)
    case clusterStateReply(ClusterStateReply)
    case rebuildOrder(RebuildOrder)
    case repairRequest(RepairRequest)
    case repairSlice(RepairSlice)
    case recover
    case recoverReply(RecoverReply)
    case checkFree(CheckFreeRequest)
    case checkFreeReply(CheckFreeReply)
    case clusterStatus
    case clusterStatusReply(ClusterStatusReply)
    case drain(DrainRequest)
    case drainReply(DrainReply)
    case verify(VerifyRequest)
    case verifyReply(VerifyReply)
    case rebuildPlan(RebuildPlanRequest)
    case rebuildPlanReply(RebuildPlanReply)
    case export(ExportRequest)
    case exportReply(ExportReply)
    case shardGet(ShardGet)
    case shardData(ShardData)
    case error(ErrorReply)
    case ok

    /// The message's type and payload, nil for the ones without.
    private var wire: (type: MessageType, payload: (any WireCodable)?) {
        switch self {
        case .challenge(let m): m.wire
        case .authenticate(let m): m.wire
        case .hello(let m): m.wire
        case .welcome(let m): m.wire
        case .beginSave(let m): m.wire
        case .saveReady(let m): m.wire
        case .putTensor(let m): m.wire
        case .commitSave(let m): m.wire
        case .saveAccepted(let m): m.wire
        case .abortSave(let m): (.abortSave, m)
        case .latestCommitted: (.latestCommitted, nil)
        case .latestCommittedReply(let m): m.wire
        case .waitCommitted(let m): m.wire
        case .restore(let m): m.wire
        case .restoreReady(let m): m.wire
        case .releaseRestore(let m): (.releaseRestore, m)
        case .status(let m): m.wire
        case .statusReply(let m): m.wire
        case .fragmentPut(let m): m.wire
        case .fragmentAck(let m): m.wire
        case .fragmentGet(let m): m.wire
        case .fragmentData(let m): m.wire
        case .heartbeat(let m): m.wire
        case .stepReady(let m): m.wire
        case .stepProtected(let m): m.wire
        case .clusterStateRequest(let m): m.wire
        case .clusterStateReply(let m): m.wire
        case .rebuildOrder(let m): m.wire
        case .repairRequest(let m): m.wire
        case .repairSlice(let m): m.wire
        case .recover: (.recover, nil)
        case .recoverReply(let m): m.wire
        case .checkFree(let m): m.wire
        case .checkFreeReply(let m): m.wire
        case .clusterStatus: (.clusterStatus, nil)
        case .clusterStatusReply(let m): m.wire
        case .drain(let m): m.wire
        case .drainReply(let m): m.wire
        case .verify(let m): m.wire
        case .verifyReply(let m): m.wire
        case .rebuildPlan(let m): m.wire
        case .rebuildPlanReply(let m): m.wire
        case .export(let m): m.wire
        case .exportReply(let m): m.wire
        case .shardGet(let m): m.wire
        case .shardData(let m): m.wire
        case .error(let m): m.wire
        case .ok: (.ok, nil)
        }
    }

    public var type: MessageType { wire.type }

    /// The payload's struct, nil for the messages without one.
    public var payload: (any WireCodable)? { wire.payload }

    public func encodedPayload() -> [UInt8] {
        var writer = ByteWriter()
        wire.payload?.encode(into: &writer)
        return writer.bytes
    }

    /// Decodes and validates a control payload; every byte must be consumed.
    public init(type: MessageType, payload: [UInt8]) throws(ProtocolError) {
        var reader = ByteReader(payload)
        self = try Self.decode(type, &reader)
        try reader.finish()
    }

    private static func decode(_ type: MessageType, _ r: inout ByteReader) throws(ProtocolError) -> Message {
        switch type {
        case .challenge: .challenge(try .init(from: &r))
        case .authenticate: .authenticate(try .init(from: &r))
        case .hello: .hello(try .init(from: &r))
        case .welcome: .welcome(try .init(from: &r))
        case .beginSave: .beginSave(try .init(from: &r))
        case .saveReady: .saveReady(try .init(from: &r))
        case .putTensor: .putTensor(try .init(from: &r))
        case .commitSave: .commitSave(try .init(from: &r))
        case .saveAccepted: .saveAccepted(try .init(from: &r))
        case .abortSave: .abortSave(try .init(from: &r))
        case .latestCommitted: .latestCommitted
        case .latestCommittedReply: .latestCommittedReply(try .init(from: &r))
        case .waitCommitted: .waitCommitted(try .init(from: &r))
        case .restore: .restore(try .init(from: &r))
        case .restoreReady: .restoreReady(try .init(from: &r))
        case .releaseRestore: .releaseRestore(try .init(from: &r))
        case .status: .status(try .init(from: &r))
        case .statusReply: .statusReply(try .init(from: &r))
        case .fragmentPut: .fragmentPut(try .init(from: &r))
        case .fragmentAck: .fragmentAck(try .init(from: &r))
        case .fragmentGet: .fragmentGet(try .init(from: &r))
        case .fragmentData: .fragmentData(try .init(from: &r))
        case .heartbeat: .heartbeat(try .init(from: &r))
        case .stepReady: .stepReady(try .init(from: &r))
        case .stepProtected: .stepProtected(try .init(from: &r))
        case .clusterStateRequest: .clusterStateRequest(try .init(from: &r))
        case .clusterStateReply: .clusterStateReply(try .init(from: &r))
        case .rebuildOrder: .rebuildOrder(try .init(from: &r))
        case .repairRequest: .repairRequest(try .init(from: &r))
        case .repairSlice: .repairSlice(try .init(from: &r))
        case .recover: .recover
        case .recoverReply: .recoverReply(try .init(from: &r))
        case .checkFree: .checkFree(try .init(from: &r))
        case .checkFreeReply: .checkFreeReply(try .init(from: &r))
        case .clusterStatus: .clusterStatus
        case .clusterStatusReply: .clusterStatusReply(try .init(from: &r))
        case .drain: .drain(try .init(from: &r))
        case .drainReply: .drainReply(try .init(from: &r))
        case .verify: .verify(try .init(from: &r))
        case .verifyReply: .verifyReply(try .init(from: &r))
        case .rebuildPlan: .rebuildPlan(try .init(from: &r))
        case .rebuildPlanReply: .rebuildPlanReply(try .init(from: &r))
        case .export: .export(try .init(from: &r))
        case .exportReply: .exportReply(try .init(from: &r))
        case .shardGet: .shardGet(try .init(from: &r))
        case .shardData: .shardData(try .init(from: &r))
        case .error: .error(try .init(from: &r))
        case .ok: .ok
        }
    }
}

extension WirePayload {
    fileprivate var wire: (type: MessageType, payload: (any WireCodable)?) { (Self.type, self) }
}
