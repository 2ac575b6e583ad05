/// Every message on the wire. Values are part of the protocol: never reuse one.
public enum MessageType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    // Session set-up.
    case challenge = 1
    case authenticate = 2
    case hello = 3
    case welcome = 4
    // Saving a shard.
    case beginSave = 10
    case saveReady = 11
    case putTensor = 12
    case commitSave = 13
    case saveAccepted = 14
    case abortSave = 15
    // Commit state.
    case latestCommitted = 20
    case latestCommittedReply = 21
    case waitCommitted = 22
    // Restoring a shard.
    case restore = 30
    case restoreReady = 31
    case releaseRestore = 32
    // Operators.
    case status = 40
    case statusReply = 41
    // Between daemons: fragments and liveness.
    case fragmentPut = 50
    case fragmentAck = 51
    case fragmentGet = 52
    case fragmentData = 53
    case heartbeat = 54
    case stepReady = 55
    case stepProtected = 56
    case clusterStateRequest = 57
    case clusterStateReply = 58
    case rebuildOrder = 59
    // Between daemons: pipelined repair.
    case repairRequest = 62
    case repairSlice = 63
    // Generic replies.
    case error = 60
    case ok = 61
    // Operators: recovery.
    case recover = 42
    case recoverReply = 43
    case clusterStatus = 44
    case clusterStatusReply = 45
    case checkFree = 46
    case checkFreeReply = 47
    case export = 48
    case exportReply = 49
    // Daemons: one rank's shard for a CheckFree rebuild.
    case shardGet = 64
    case shardData = 65
    case drain = 66
    case drainReply = 67
    case verify = 68
    case verifyReply = 69
    case rebuildPlan = 70
    case rebuildPlanReply = 71

    /// Types that may be followed by bulk bytes (tensor or fragment data).
    public var carriesBulk: Bool {
        switch self {
        case .putTensor, .restoreReady, .fragmentPut, .fragmentData, .repairSlice, .shardData: true
        default: false
        }
    }

    /// The most control payload a frame of this type may carry. Messages
    /// between daemons that carry whole manifests (a node's readiness
    /// report, the cluster's state) scale with the job: at 8 ranks × 16,384
    /// tensors with long names a report alone is ~32 MiB. They may reach
    /// ``ProtocolLimits/maximumLargeControlPayloadBytes``; receivers accept
    /// that much only from authenticated peers. Everything else stays under
    /// ``ProtocolLimits/maximumControlPayloadBytes``.
    public var maximumPayloadBytes: Int {
        switch self {
        case .stepReady, .clusterStateReply: ProtocolLimits.maximumLargeControlPayloadBytes
        default: ProtocolLimits.maximumControlPayloadBytes
        }
    }

    public var description: String { "\(name)(\(rawValue))" }

    private var name: String {
        switch self {
        case .challenge: "challenge"
        case .authenticate: "authenticate"
        case .hello: "hello"
        case .welcome: "welcome"
        case .beginSave: "beginSave"
        case .saveReady: "saveReady"
        case .putTensor: "putTensor"
        case .commitSave: "commitSave"
        case .saveAccepted: "saveAccepted"
        case .abortSave: "abortSave"
        case .latestCommitted: "latestCommitted"
        case .latestCommittedReply: "latestCommittedReply"
        case .waitCommitted: "waitCommitted"
        case .restore: "restore"
        case .restoreReady: "restoreReady"
        case .releaseRestore: "releaseRestore"
        case .status: "status"
        case .statusReply: "statusReply"
        case .fragmentPut: "fragmentPut"
        case .fragmentAck: "fragmentAck"
        case .fragmentGet: "fragmentGet"
        case .fragmentData: "fragmentData"
        case .heartbeat: "heartbeat"
        case .stepReady: "stepReady"
        case .stepProtected: "stepProtected"
        case .clusterStateRequest: "clusterStateRequest"
        case .clusterStateReply: "clusterStateReply"
        case .rebuildOrder: "rebuildOrder"
        case .repairRequest: "repairRequest"
        case .repairSlice: "repairSlice"
        case .recover: "recover"
        case .recoverReply: "recoverReply"
        case .checkFree: "checkFree"
        case .checkFreeReply: "checkFreeReply"
        case .clusterStatus: "clusterStatus"
        case .clusterStatusReply: "clusterStatusReply"
        case .drain: "drain"
        case .drainReply: "drainReply"
        case .verify: "verify"
        case .verifyReply: "verifyReply"
        case .rebuildPlan: "rebuildPlan"
        case .rebuildPlanReply: "rebuildPlanReply"
        case .export: "export"
        case .exportReply: "exportReply"
        case .shardGet: "shardGet"
        case .shardData: "shardData"
        case .error: "error"
        case .ok: "ok"
        }
    }
}

/// Error codes carried by `error` replies, so clients can react without parsing text.
public enum ErrorCode: UInt16, Sendable, CaseIterable {
    case malformedFrame = 1
    case unauthenticated = 2
    case helloRequired = 3
    case invalidRequest = 4
    case wrongJob = 5
    case duplicateRank = 6
    case unknownStep = 7
    case overBudget = 8
    case checksumMismatch = 9
    case notCommitted = 10
    case saveInProgress = 11
    case tooManyConnections = 12
    case timeout = 13
    case unrecoverable = 14
    case shuttingDown = 15
    case internalError = 16
    case unavailable = 17
}

/// How tensor bytes travel: through arena file descriptors passed over the
/// Unix socket (zero copy), or as bulk bytes on the stream (TCP).
public enum DataTransport: UInt8, Sendable, CaseIterable {
    case sharedMemory = 0
    case stream = 1
}

/// Who is on the other end of a session.
public enum PeerRole: UInt8, Sendable, CaseIterable {
    case trainer = 0
    case peer = 1
    case operatorTool = 2
}

/// Life of a rank's shard on a node (docs/architecture.md, "Data model"): receiving → local-complete → protected.
public enum ShardState: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case receiving = 0
    case sealing = 1
    case localComplete = 2
    case protected = 3
    case corrupted = 4

    public var description: String {
        switch self {
        case .receiving: "receiving"
        case .sealing: "sealing"
        case .localComplete: "local-complete"
        case .protected: "protected"
        case .corrupted: "corrupted"
        }
    }
}
