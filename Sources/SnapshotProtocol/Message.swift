/// One decoded control message.
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

    public var type: MessageType {
        switch self {
        case .challenge: .challenge
        case .authenticate: .authenticate
        case .hello: .hello
        case .welcome: .welcome
        case .beginSave: .beginSave
        case .saveReady: .saveReady
        case .putTensor: .putTensor
        case .commitSave: .commitSave
        case .saveAccepted: .saveAccepted
        case .abortSave: .abortSave
        case .latestCommitted: .latestCommitted
        case .latestCommittedReply: .latestCommittedReply
        case .waitCommitted: .waitCommitted
        case .restore: .restore
        case .restoreReady: .restoreReady
        case .releaseRestore: .releaseRestore
        case .status: .status
        case .statusReply: .statusReply
        case .fragmentPut: .fragmentPut
        case .fragmentAck: .fragmentAck
        case .fragmentGet: .fragmentGet
        case .fragmentData: .fragmentData
        case .heartbeat: .heartbeat
        case .stepReady: .stepReady
        case .stepProtected: .stepProtected
        case .clusterStateRequest: .clusterStateRequest
        case .clusterStateReply: .clusterStateReply
        case .rebuildOrder: .rebuildOrder
        case .repairRequest: .repairRequest
        case .repairSlice: .repairSlice
        case .recover: .recover
        case .recoverReply: .recoverReply
        case .checkFree: .checkFree
        case .checkFreeReply: .checkFreeReply
        case .clusterStatus: .clusterStatus
        case .clusterStatusReply: .clusterStatusReply
        case .drain: .drain
        case .drainReply: .drainReply
        case .verify: .verify
        case .verifyReply: .verifyReply
        case .rebuildPlan: .rebuildPlan
        case .rebuildPlanReply: .rebuildPlanReply
        case .export: .export
        case .exportReply: .exportReply
        case .shardGet: .shardGet
        case .shardData: .shardData
        case .error: .error
        case .ok: .ok
        }
    }

    // MARK: Encoding

    public func encodedPayload() -> [UInt8] {
        var w = ByteWriter()
        switch self {
        case .challenge(let m): w.write(raw: m.nonce)
        case .authenticate(let m): w.write(raw: m.tag)
        case .hello(let m):
            w.write(m.role.rawValue)
            w.write(m.job != nil)
            if let job = m.job { w.write(job) }
            w.write(m.rank)
            w.write(m.world)
            w.write(m.topology)
            w.write(m.nodeID)
            w.write(m.localWorld)
        case .welcome(let m):
            w.write(m.nodeID)
            w.write(m.daemonVersion)
        case .beginSave(let m):
            w.write(m.step)
            w.write(m.transport.rawValue)
            w.write(m.tensors)
        case .saveReady(let m):
            w.write(m.step)
            w.write(m.segmentSizeBytes)
            w.writeOffsets(m.tensorOffsets)
        case .putTensor(let m):
            w.write(m.step)
            w.write(m.tensorIndex)
            w.write(m.offsetBytes)
        case .commitSave(let m):
            w.write(m.step)
            w.write(m.checksums != nil)
            if let checksums = m.checksums {
                w.writeCount(checksums.count)
                for c in checksums { w.write(c) }
            }
            w.writeOptional(m.gradientNorm?.bitPattern)
            w.write(blob: m.metadata)
        case .saveAccepted(let m):
            w.write(m.step)
            w.write(m.state.rawValue)
        case .abortSave(let m), .releaseRestore(let m): w.write(m.step)
        case .latestCommitted, .ok, .recover: break
        case .clusterStateRequest(let m):
            w.writeCount(m.known.count)
            for report in m.known {
                w.write(report.job)
                w.write(report.step)
                w.write(report.node)
            }
        case .latestCommittedReply(let m): w.writeOptional(m.step)
        case .waitCommitted(let m):
            w.write(m.step)
            w.write(m.timeoutMilliseconds)
        case .restore(let m):
            w.writeOptional(m.step)
            w.write(m.transport.rawValue)
        case .restoreReady(let m):
            w.write(m.step)
            w.writeCount(m.entries.count)
            for e in m.entries { w.write(e) }
            w.writeOffsets(m.tensorOffsets)
            w.write(m.segmentSizeBytes)
            w.writeOptional(m.gradientNorm?.bitPattern)
            w.write(blob: m.metadata)
            w.writeOptional(m.reconstruction)
            w.writeOptional(m.durableSource)
        case .status(let m):
            w.write(m.job != nil)
            if let job = m.job { w.write(job) }
        case .statusReply(let m): w.write(m)
        case .fragmentPut(let m):
            w.write(m.fragment)
            w.write(m.sourceNode)
            w.write(m.fragmentSizeBytes)
            w.write(m.crc32c)
        case .fragmentAck(let m):
            w.write(m.fragment)
            w.write(m.holderNode)
        case .fragmentGet(let m): w.write(m.fragment)
        case .fragmentData(let m):
            w.write(m.fragment)
            w.write(m.fragmentSizeBytes)
            w.write(m.crc32c)
        case .heartbeat(let m):
            w.write(m.nodeID)
            w.write(m.incarnation)
            w.writeCount(m.liveNodes.count)
            for node in m.liveNodes { w.write(node) }
            w.write(m.needsRebuild)
        case .stepReady(let m): w.write(m)
        case .repairRequest(let m):
            w.write(m.fragment)
            w.write(m.fragmentSizeBytes)
            w.write(m.sliceSizeBytes)
            w.writeCount(m.chain.count)
            for hop in m.chain {
                w.write(hop.nodeID)
                w.write(hop.index)
                w.write(hop.coefficient)
            }
        case .repairSlice(let m):
            w.write(m.offsetBytes)
            w.write(m.crc32c)
        case .stepProtected(let m):
            w.write(m.job)
            w.write(m.step)
            w.write(m.nodeID)
            w.write(m.stable)
        case .clusterStateReply(let m):
            w.writeCount(m.steps.count)
            for s in m.steps {
                w.write(s.job)
                w.write(s.step)
                w.write(s.committed)
                w.writeCount(s.ready.count)
                for r in s.ready { w.write(r) }
                w.writeCount(s.protectedNodes.count)
                for n in s.protectedNodes { w.write(n) }
                w.writeCount(s.stableNodes.count)
                for n in s.stableNodes { w.write(n) }
            }
            w.write(m.complete)
        case .rebuildOrder(let m):
            w.write(m.nodeID)
            w.write(m.incarnation)
            w.write(m.coordinator)
        case .recoverReply(let m):
            w.write(m.coordinator)
            w.writeCount(m.deadNodes.count)
            for n in m.deadNodes { w.write(n) }
            w.writeCount(m.rebuildingNodes.count)
            for n in m.rebuildingNodes { w.write(n) }
            w.writeCount(m.jobs.count)
            for j in m.jobs {
                w.write(j.job)
                w.writeOptional(j.latestCommitted)
                w.writeOptional(j.newestRestorable)
                w.writeCount(j.lostRanks.count)
                for r in j.lostRanks { w.write(r) }
                w.write(j.summary)
                w.write(j.checkFree)
                w.writeOptional(j.newestFlushed)
            }
        case .checkFree(let m):
            w.write(m.job)
            w.write(m.phase.rawValue)
            w.writeOptional(m.step)
            w.write(m.token)
        case .checkFreeReply(let m): w.write(m)
        case .clusterStatus: break
        case .clusterStatusReply(let m): w.write(m)
        case .drain(let m):
            w.write(m.node)
            w.write(m.cancel)
        case .drainReply(let m):
            w.write(m.node)
            w.write(m.draining)
            w.write(m.safeToStop)
            w.write(m.reason)
        case .verify(let m): w.write(m)
        case .verifyReply(let m): w.write(m)
        case .rebuildPlan(let m): w.write(m.node)
        case .rebuildPlanReply(let m): w.write(m)
        case .export(let m): w.write(m)
        case .exportReply(let m): w.write(m)
        case .shardGet(let m):
            w.write(m.job)
            w.write(m.step)
            w.write(m.rank)
        case .shardData(let m):
            w.write(m.job)
            w.write(m.step)
            w.write(m.rank)
            w.write(m.segmentSizeBytes)
        case .error(let m):
            w.write(m.code.rawValue)
            w.write(m.message)
        }
        return w.bytes
    }

    // MARK: Decoding

    /// Decodes and validates a control payload; every byte must be consumed.
    public init(type: MessageType, payload: [UInt8]) throws(ProtocolError) {
        var r = ByteReader(payload)
        self = try Self.decode(type, &r)
        try r.finish()
    }

    private static func decode(_ type: MessageType, _ r: inout ByteReader) throws(ProtocolError) -> Message {
        switch type {
        case .challenge:
            return .challenge(Challenge(nonce: try r.readRaw(count: ProtocolLimits.authenticationNonceBytes, "nonce")))
        case .authenticate:
            return .authenticate(Authenticate(tag: try r.readRaw(count: ProtocolLimits.authenticationTagBytes, "tag")))
        case .hello: return .hello(try r.readHello())
        case .welcome:
            return .welcome(Welcome(nodeID: try r.read(NodeID.self, "nodeID"), daemonVersion: try r.readString("daemonVersion", limitBytes: ProtocolLimits.maximumNameBytes)))
        case .beginSave:
            let step = try r.read(Step.self, "step")
            let transport = try r.readEnum(DataTransport.self, "transport")
            return .beginSave(BeginSave(step: step, transport: transport, tensors: try r.readTensorSpecs()))
        case .saveReady:
            let step = try r.read(Step.self, "step")
            let size = try r.read(UInt64.self, "segmentSizeBytes")
            return .saveReady(SaveReady(step: step, segmentSizeBytes: size, tensorOffsets: try r.readOffsets()))
        case .putTensor:
            return .putTensor(PutTensor(step: try r.read(Step.self, "step"), tensorIndex: try r.read(UInt32.self, "tensorIndex"), offsetBytes: try r.read(UInt64.self, "offsetBytes")))
        case .commitSave: return .commitSave(try r.readCommitSave())
        case .saveAccepted:
            return .saveAccepted(SaveAccepted(step: try r.read(Step.self, "step"), state: try r.readEnum(ShardState.self, "state")))
        case .abortSave: return .abortSave(StepRequest(step: try r.read(Step.self, "step")))
        case .releaseRestore: return .releaseRestore(StepRequest(step: try r.read(Step.self, "step")))
        case .latestCommitted: return .latestCommitted
        case .ok: return .ok
        case .latestCommittedReply: return .latestCommittedReply(LatestCommittedReply(step: try r.readOptional(Step.self, "step")))
        case .waitCommitted:
            return .waitCommitted(WaitCommitted(step: try r.read(Step.self, "step"), timeoutMilliseconds: try r.read(UInt32.self, "timeoutMilliseconds")))
        case .restore:
            return .restore(Restore(step: try r.readOptional(Step.self, "step"), transport: try r.readEnum(DataTransport.self, "transport")))
        case .restoreReady: return .restoreReady(try r.readRestoreReady())
        case .status: return .status(StatusRequest(job: try r.readBool("hasJob") ? try r.readJobID() : nil))
        case .statusReply: return .statusReply(try r.readStatusReply())
        case .fragmentPut:
            return .fragmentPut(FragmentPut(
                fragment: try r.readFragmentID(), sourceNode: try r.read(NodeID.self, "sourceNode"),
                fragmentSizeBytes: try r.read(UInt64.self, "fragmentSizeBytes"), crc32c: try r.read(UInt32.self, "crc32c")))
        case .fragmentAck:
            return .fragmentAck(FragmentAck(fragment: try r.readFragmentID(), holderNode: try r.read(NodeID.self, "holderNode")))
        case .fragmentGet: return .fragmentGet(FragmentGet(fragment: try r.readFragmentID()))
        case .fragmentData:
            return .fragmentData(FragmentData(
                fragment: try r.readFragmentID(), fragmentSizeBytes: try r.read(UInt64.self, "fragmentSizeBytes"),
                crc32c: try r.read(UInt32.self, "crc32c")))
        case .heartbeat:
            let node = try r.read(NodeID.self, "nodeID")
            let incarnation = try r.read(UInt64.self, "incarnation")
            let count = try r.readCount("liveNodes", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 4)
            var live: [NodeID] = []
            live.reserveCapacity(count)
            for _ in 0..<count { live.append(try r.read(NodeID.self, "liveNodes")) }
            return .heartbeat(Heartbeat(nodeID: node, incarnation: incarnation, liveNodes: live, needsRebuild: try r.readBool("needsRebuild")))
        case .stepReady: return .stepReady(try r.readStepReady())
        case .stepProtected:
            return .stepProtected(StepProtected(job: try r.readJobID(), step: try r.read(Step.self, "step"), nodeID: try r.read(NodeID.self, "nodeID"), stable: try r.readBool("stable")))
        case .clusterStateRequest:
            let count = try r.readCount("known", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 14)
            var known: [ReportID] = []
            known.reserveCapacity(count)
            for _ in 0..<count { known.append(ReportID(job: try r.readJobID(), step: try r.read(Step.self, "step"), node: try r.read(NodeID.self, "node"))) }
            return .clusterStateRequest(ClusterStateRequest(known: known))
        case .clusterStateReply: return .clusterStateReply(try r.readClusterState())
        case .rebuildOrder:
            return .rebuildOrder(RebuildOrder(nodeID: try r.read(NodeID.self, "nodeID"), incarnation: try r.read(UInt64.self, "incarnation"), coordinator: try r.read(NodeID.self, "coordinator")))
        case .repairRequest: return .repairRequest(try r.readRepairRequest())
        case .repairSlice:
            return .repairSlice(RepairSlice(offsetBytes: try r.read(UInt64.self, "offsetBytes"), crc32c: try r.read(UInt32.self, "crc32c")))
        case .recover: return .recover
        case .recoverReply: return .recoverReply(try r.readRecoverReply())
        case .checkFree:
            return .checkFree(CheckFreeRequest(
                job: try r.readJobID(), phase: try r.readEnum(CheckFreeRequest.Phase.self, "phase"), step: try r.readOptional(Step.self, "step"),
                token: try r.read(UInt64.self, "token")))
        case .checkFreeReply: return .checkFreeReply(try r.readCheckFreeReply())
        case .clusterStatus: return .clusterStatus
        case .clusterStatusReply: return .clusterStatusReply(try r.readClusterStatusReply())
        case .drain: return .drain(DrainRequest(node: try r.read(NodeID.self, "node"), cancel: try r.readBool("cancel")))
        case .drainReply:
            return .drainReply(DrainReply(
                node: try r.read(NodeID.self, "node"), draining: try r.readBool("draining"), safeToStop: try r.readBool("safeToStop"),
                reason: try r.readString("reason", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)))
        case .verify: return .verify(try r.readVerifyRequest())
        case .verifyReply: return .verifyReply(try r.readVerifyReply())
        case .rebuildPlan: return .rebuildPlan(RebuildPlanRequest(node: try r.read(NodeID.self, "node")))
        case .rebuildPlanReply: return .rebuildPlanReply(try r.readRebuildPlanReply())
        case .export: return .export(try r.readExportRequest())
        case .exportReply: return .exportReply(try r.readExportReply())
        case .shardGet:
            return .shardGet(ShardGet(job: try r.readJobID(), step: try r.read(Step.self, "step"), rank: try r.read(Rank.self, "rank")))
        case .shardData:
            return .shardData(ShardData(
                job: try r.readJobID(), step: try r.read(Step.self, "step"), rank: try r.read(Rank.self, "rank"),
                segmentSizeBytes: try r.read(UInt64.self, "segmentSizeBytes")))
        case .error:
            let code = try r.readEnum(ErrorCode.self, "code")
            return .error(ErrorReply(code: code, message: try r.readString("message", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)))
        }
    }
}

// MARK: - Field helpers

extension ByteWriter {
    mutating func writeOffsets(_ offsets: [UInt64]) {
        writeCount(offsets.count)
        for o in offsets { write(o) }
    }

    mutating func write(_ id: FragmentID) {
        write(id.job)
        write(id.step)
        write(id.stripe)
        write(id.index)
    }

    mutating func write(_ m: StepReady) {
        write(m.job)
        write(m.step)
        write(m.nodeID)
        write(m.world)
        write(m.dataSizeBytes)
        writeCount(m.manifests.count)
        for blob in m.manifests { write(blob: blob) }
    }

    mutating func write(_ m: StatusReply) {
        write(m.nodeID)
        write(m.daemonVersion)
        write(m.budgetBytes)
        write(m.usedBytes)
        writeCount(m.jobs.count)
        for job in m.jobs {
            write(job.job)
            write(job.world)
            write(job.localRanks)
            writeCount(job.steps.count)
            for s in job.steps {
                write(s.step)
                write(s.committed)
                write(s.completeRanks)
                write(s.bytes)
                write(s.phase.rawValue)
                writeOptional(s.ageSeconds)
            }
            writeCount(job.flushedSteps.count)
            for step in job.flushedSteps { write(step) }
        }
        writeCount(m.counters.count)
        for counter in m.counters {
            write(counter.name)
            write(counter.value)
        }
    }
}

extension ByteReader {
    mutating func readEnum<E: RawRepresentable>(_: E.Type, _ field: String) throws(ProtocolError) -> E where E.RawValue: FixedWidthInteger {
        let raw = try read(E.RawValue.self, field)
        guard let value = E(rawValue: raw) else { throw .invalidValue(field: field, reason: "unknown value \(raw)") }
        return value
    }

    mutating func readOffsets() throws(ProtocolError) -> [UInt64] {
        let count = try readCount("tensorOffsets", limit: ProtocolLimits.maximumTensorsPerShard, minimumElementBytes: 8)
        var offsets: [UInt64] = []
        offsets.reserveCapacity(count)
        for _ in 0..<count { offsets.append(try read(UInt64.self, "tensorOffsets")) }
        return offsets
    }

    mutating func readRepairRequest() throws(ProtocolError) -> RepairRequest {
        let fragment = try readFragmentID()
        let size = try read(UInt64.self, "fragmentSizeBytes")
        let slice = try read(UInt32.self, "sliceSizeBytes")
        guard ProtocolLimits.repairSliceBytesRange.contains(slice) else {
            throw .invalidValue(field: "sliceSizeBytes", reason: "\(slice) is outside \(ProtocolLimits.repairSliceBytesRange)")
        }
        guard size <= ProtocolLimits.maximumBulkBytes else { throw .invalidValue(field: "fragmentSizeBytes", reason: "\(size) exceeds the bulk limit") }
        let count = try readCount("chain", limit: ProtocolLimits.maximumRepairChainHops, minimumElementBytes: 7)
        guard count > 0 else { throw .emptyField("chain") }
        var chain: [RepairHop] = []
        chain.reserveCapacity(count)
        for _ in 0..<count {
            chain.append(RepairHop(nodeID: try read(NodeID.self, "nodeID"), index: try read(UInt16.self, "index"), coefficient: try read(UInt8.self, "coefficient")))
        }
        guard Set(chain.map(\.nodeID)).count == count else { throw .invalidValue(field: "chain", reason: "a node appears twice") }
        return RepairRequest(fragment: fragment, fragmentSizeBytes: size, sliceSizeBytes: slice, chain: chain)
    }

    mutating func readFragmentID() throws(ProtocolError) -> FragmentID {
        FragmentID(job: try readJobID(), step: try read(Step.self, "step"), stripe: try read(UInt16.self, "stripe"), index: try read(UInt16.self, "index"))
    }

    mutating func readNodeList(_ field: String) throws(ProtocolError) -> [NodeID] {
        let count = try readCount(field, limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 4)
        var nodes: [NodeID] = []
        nodes.reserveCapacity(count)
        for _ in 0..<count { nodes.append(try read(NodeID.self, field)) }
        return nodes
    }

    mutating func readStepReady() throws(ProtocolError) -> StepReady {
        let job = try readJobID()
        let step = try read(Step.self, "step")
        let node = try read(NodeID.self, "nodeID")
        let world = try read(UInt32.self, "world")
        let size = try read(UInt64.self, "dataSizeBytes")
        let count = try readCount("manifests", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 4)
        var manifests: [[UInt8]] = []
        manifests.reserveCapacity(count)
        for _ in 0..<count { manifests.append(try readBlob("manifests", limitBytes: ProtocolLimits.maximumManifestBytes)) }
        return StepReady(job: job, step: step, nodeID: node, world: world, dataSizeBytes: size, manifests: manifests)
    }

    mutating func readClusterState() throws(ProtocolError) -> ClusterStateReply {
        let count = try readCount("steps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 18)
        var steps: [ClusterStepState] = []
        for _ in 0..<count {
            let job = try readJobID()
            let step = try read(Step.self, "step")
            let committed = try readBool("committed")
            let readyCount = try readCount("ready", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 27)
            var ready: [StepReady] = []
            for _ in 0..<readyCount { ready.append(try readStepReady()) }
            let protectedNodes = try readNodeList("protectedNodes")
            steps.append(ClusterStepState(job: job, step: step, committed: committed, ready: ready, protectedNodes: protectedNodes, stableNodes: try readNodeList("stableNodes")))
        }
        return ClusterStateReply(steps: steps, complete: try readBool("complete"))
    }

    mutating func readRecoverReply() throws(ProtocolError) -> RecoverReply {
        let coordinator = try read(NodeID.self, "coordinator")
        let dead = try readNodeList("deadNodes")
        let rebuilding = try readNodeList("rebuildingNodes")
        let count = try readCount("jobs", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 12)
        var jobs: [JobRecovery] = []
        for _ in 0..<count {
            let job = try readJobID()
            let latest = try readOptional(Step.self, "latestCommitted")
            let restorable = try readOptional(Step.self, "newestRestorable")
            let rankCount = try readCount("lostRanks", limit: Int(ProtocolLimits.maximumWorldSize), minimumElementBytes: 4)
            var ranks: [Rank] = []
            for _ in 0..<rankCount { ranks.append(try read(Rank.self, "lostRanks")) }
            let summary = try readString("summary", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
            let checkFree = try readString("checkFree", limitBytes: ProtocolLimits.maximumMessageBytes, allowEmpty: true)
            jobs.append(JobRecovery(
                job: job, latestCommitted: latest, newestRestorable: restorable, lostRanks: ranks, summary: summary, checkFree: checkFree,
                newestFlushed: try readOptional(Step.self, "newestFlushed")))
        }
        return RecoverReply(coordinator: coordinator, deadNodes: dead, rebuildingNodes: rebuilding, jobs: jobs)
    }

    mutating func readHello() throws(ProtocolError) -> Hello {
        let role = try readEnum(PeerRole.self, "role")
        let job = try readBool("hasJob") ? try readJobID() : nil
        let rank = try read(Rank.self, "rank")
        let world = try read(UInt32.self, "world")
        let topology = try readTopology()
        let node = try read(NodeID.self, "nodeID")
        let localWorld = try read(UInt32.self, "localWorld")
        if role == .trainer {
            guard job != nil else { throw .emptyField("job") }
            guard world >= 1, world <= ProtocolLimits.maximumWorldSize else {
                throw .invalidValue(field: "world", reason: "must be 1...\(ProtocolLimits.maximumWorldSize), got \(world)")
            }
            guard rank < world else { throw .invalidValue(field: "rank", reason: "rank \(rank) is not below world \(world)") }
            guard localWorld <= world else { throw .invalidValue(field: "localWorld", reason: "\(localWorld) local ranks exceed world \(world)") }
        }
        return Hello(role: role, job: job, rank: rank, world: world, topology: topology, nodeID: node, localWorld: localWorld)
    }

    mutating func readCommitSave() throws(ProtocolError) -> CommitSave {
        let step = try read(Step.self, "step")
        var checksums: [UInt32]?
        if try readBool("hasChecksums") {
            let count = try readCount("checksums", limit: ProtocolLimits.maximumTensorsPerShard, minimumElementBytes: 4)
            var values: [UInt32] = []
            values.reserveCapacity(count)
            for _ in 0..<count { values.append(try read(UInt32.self, "checksums")) }
            checksums = values
        }
        let norm = try readGradientNorm()
        let metadata = try readBlob("metadata", limitBytes: ProtocolLimits.maximumMetadataBytes)
        return CommitSave(step: step, checksums: checksums, gradientNorm: norm, metadata: metadata)
    }

    public mutating func readGradientNorm() throws(ProtocolError) -> Double? {
        guard let bits = try readOptional(UInt64.self, "gradientNorm") else { return nil }
        let norm = Double(bitPattern: bits)
        guard norm.isFinite, norm >= 0 else { throw .invalidValue(field: "gradientNorm", reason: "must be finite and ≥ 0, got \(norm)") }
        return norm
    }

    mutating func readRestoreReady() throws(ProtocolError) -> RestoreReady {
        let step = try read(Step.self, "step")
        let count = try readCount("entries", limit: ProtocolLimits.maximumTensorsPerShard, minimumElementBytes: Self.minimumSpecBytes + 4)
        var entries: [ManifestEntry] = []
        entries.reserveCapacity(count)
        for _ in 0..<count { entries.append(try readManifestEntry()) }
        let offsets = try readOffsets()
        guard offsets.count == entries.count else {
            throw .invalidValue(field: "tensorOffsets", reason: "\(offsets.count) offsets for \(entries.count) tensors")
        }
        let size = try read(UInt64.self, "segmentSizeBytes")
        let norm = try readGradientNorm()
        let metadata = try readBlob("metadata", limitBytes: ProtocolLimits.maximumMetadataBytes)
        return RestoreReady(
            step: step, entries: entries, tensorOffsets: offsets, segmentSizeBytes: size, gradientNorm: norm, metadata: metadata,
            reconstruction: try readOptionalReconstruction(),
            durableSource: try readOptionalString("durableSource", limitBytes: ProtocolLimits.maximumPathBytes))
    }

    mutating func readStatusReply() throws(ProtocolError) -> StatusReply {
        let node = try read(NodeID.self, "nodeID")
        let version = try readString("daemonVersion", limitBytes: ProtocolLimits.maximumNameBytes)
        let budget = try read(UInt64.self, "budgetBytes")
        let used = try read(UInt64.self, "usedBytes")
        let jobCount = try readCount("jobs", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 15)
        var jobs: [JobStatus] = []
        jobs.reserveCapacity(jobCount)
        for _ in 0..<jobCount {
            let job = try readJobID()
            let world = try read(UInt32.self, "world")
            let local = try read(UInt32.self, "localRanks")
            let stepCount = try readCount("steps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 21)
            var steps: [StepStatus] = []
            steps.reserveCapacity(stepCount)
            for _ in 0..<stepCount {
                steps.append(StepStatus(
                    step: try read(Step.self, "step"), committed: try readBool("committed"),
                    completeRanks: try read(UInt32.self, "completeRanks"), bytes: try read(UInt64.self, "bytes"),
                    phase: try readEnum(StepStatus.Phase.self, "phase"), ageSeconds: try readOptional(UInt64.self, "ageSeconds")))
            }
            let flushedCount = try readCount("flushedSteps", limit: ProtocolLimits.maximumListEntries, minimumElementBytes: 8)
            var flushed: [Step] = []
            for _ in 0..<flushedCount { flushed.append(try read(Step.self, "flushedSteps")) }
            jobs.append(JobStatus(job: job, world: world, localRanks: local, steps: steps, flushedSteps: flushed))
        }
        let counterCount = try readCount("counters", limit: ProtocolLimits.maximumCounters, minimumElementBytes: 10)
        var counters: [StatusCounter] = []
        counters.reserveCapacity(counterCount)
        for _ in 0..<counterCount {
            counters.append(StatusCounter(name: try readString("counter.name", limitBytes: ProtocolLimits.maximumNameBytes), value: try read(UInt64.self, "counter.value")))
        }
        return StatusReply(nodeID: node, daemonVersion: version, budgetBytes: budget, usedBytes: used, jobs: jobs, counters: counters)
    }
}
