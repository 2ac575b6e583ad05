import Foundation
import ErasureCoding
import SnapshotProtocol
import Testing

let job = try! JobID("llama-70b.run_3")
let weights = try! TensorSpec(name: "layers.0.attn.wq", dtype: .bfloat16, shape: [4096, 4096], kind: .parameter)
let moments = try! TensorSpec(name: "layers.0.attn.wq.exp_avg", dtype: .float32, shape: [4096, 4096], kind: .optimizer)
let rngState = try! TensorSpec.blob(name: "rng.cuda", byteCount: 816, kind: .rng)
let fragment = FragmentID(job: job, step: 1200, stripe: 3, index: 5)

/// One sample of every message type.
let samples: [Message] = [
    .challenge(Challenge(nonce: Array(0..<32))),
    .authenticate(Authenticate(tag: Array(repeating: 0xAB, count: 32))),
    .hello(Hello(role: .trainer, job: job, rank: 7, world: 16, topology: Topology(pipelineStage: 1, tensorParallelIndex: 3, dataParallelIndex: 0), nodeID: 0, localWorld: 8)),
    .hello(Hello(role: .peer, job: nil, nodeID: 4)),
    .welcome(Welcome(nodeID: 2)),
    .beginSave(BeginSave(step: 1200, transport: .sharedMemory, tensors: [weights, moments, rngState])),
    .saveReady(SaveReady(step: 1200, segmentSizeBytes: 1 << 30, tensorOffsets: [0, 33_554_432, 100_663_296])),
    .putTensor(PutTensor(step: 1200, tensorIndex: 2, offsetBytes: 512)),
    .commitSave(CommitSave(step: 1200, checksums: [1, 2, 3], gradientNorm: 0.731, metadata: Array("loader=5512".utf8))),
    .commitSave(CommitSave(step: 1201)),
    .saveAccepted(SaveAccepted(step: 1200)),
    .abortSave(StepRequest(step: 1201)),
    .latestCommitted,
    .latestCommittedReply(LatestCommittedReply(step: 1199)),
    .latestCommittedReply(LatestCommittedReply(step: nil)),
    .waitCommitted(WaitCommitted(step: 1200, timeoutMilliseconds: 30_000)),
    .restore(Restore(step: nil, transport: .stream)),
    .restore(Restore(step: 1199, transport: .sharedMemory)),
    .restoreReady(RestoreReady(
        step: 1199, entries: [ManifestEntry(spec: weights, crc32c: 0xDEAD_BEEF), ManifestEntry(spec: rngState, crc32c: 7)],
        tensorOffsets: [0, 33_554_432], segmentSizeBytes: 33_555_248, gradientNorm: nil, metadata: [])),
    .releaseRestore(StepRequest(step: 1199)),
    .status(StatusRequest(job: nil)),
    .status(StatusRequest(job: job)),
    .statusReply(StatusReply(
        nodeID: 3, daemonVersion: "0.1.0", budgetBytes: 1 << 40, usedBytes: 1 << 33,
        jobs: [JobStatus(job: job, world: 16, localRanks: 8, steps: [StepStatus(step: 1199, committed: true, completeRanks: 8, bytes: 1 << 32)])],
        counters: [StatusCounter(name: "peers_declared_dead", value: 3), StatusCounter(name: "connections_refused", value: 1 << 40)])),
    .fragmentPut(FragmentPut(fragment: fragment, sourceNode: 1, fragmentSizeBytes: 1 << 20, crc32c: 99)),
    .fragmentAck(FragmentAck(fragment: fragment)),
    .fragmentGet(FragmentGet(fragment: fragment)),
    .fragmentData(FragmentData(fragment: fragment, fragmentSizeBytes: 1 << 20, crc32c: 98)),
    .heartbeat(Heartbeat(nodeID: 0, incarnation: 0x1234_5678_9ABC, needsRebuild: true)),
    .stepReady(StepReady(job: job, step: 7, nodeID: 2, world: 12, dataSizeBytes: 1 << 30, manifests: [[1, 2, 3], []])),
    .stepProtected(StepProtected(job: job, step: 7, nodeID: 2)),
    .stepProtected(StepProtected(job: job, step: 7, nodeID: 2, stable: true)),
    .clusterStateRequest(ClusterStateRequest()),
    .clusterStateRequest(ClusterStateRequest(known: [ReportID(job: job, step: 7, node: 2), ReportID(job: job, step: 8, node: 0)])),
    .clusterStateReply(ClusterStateReply(steps: [ClusterStepState(
        job: job, step: 7, committed: true, ready: [StepReady(job: job, step: 7, nodeID: 1, world: 12, dataSizeBytes: 5, manifests: [[9]])],
        protectedNodes: [0, 1])])),
    .rebuildOrder(RebuildOrder(nodeID: 3, coordinator: 0)),
    .repairRequest(RepairRequest(
        fragment: fragment, fragmentSizeBytes: 64 << 20, sliceSizeBytes: 1 << 20,
        chain: [RepairHop(nodeID: 4, index: 0, coefficient: 0x8E), RepairHop(nodeID: 1, index: 4, coefficient: 1)])),
    .repairSlice(RepairSlice(offsetBytes: 3 << 20, crc32c: 0xC0FF_EE00)),
    .recover,
    .recoverReply(RecoverReply(coordinator: 1, deadNodes: [0, 4], rebuildingNodes: [2], jobs: [
        JobRecovery(job: job, latestCommitted: 9, newestRestorable: nil, lostRanks: [0, 1, 8, 9], summary: "3 nodes of group 0 lost, it tolerates 2"),
    ])),
    .recoverReply(RecoverReply(coordinator: 0, deadNodes: [], rebuildingNodes: [2, 3], jobs: [
        JobRecovery(job: job, latestCommitted: 9, newestRestorable: nil, lostRanks: [4, 5], summary: "beyond tolerance", checkFree: "CheckFree can rebuild step 9"),
    ])),
    .restoreReady(RestoreReady(
        step: 9, entries: [ManifestEntry(spec: weights, crc32c: 1)], tensorOffsets: [0], segmentSizeBytes: 33_554_432, gradientNorm: nil, metadata: [],
        reconstruction: checkFreeAverage)),
    .checkFree(CheckFreeRequest(job: job)),
    .checkFree(CheckFreeRequest(job: job, phase: .prepare, step: 9, token: 0xFEED_F00D)),
    .checkFreeReply(CheckFreeReply(job: job, step: 9, ranks: [
        RankReconstruction(rank: 4, stage: 2, node: 2, reconstruction: checkFreeAverage),
        RankReconstruction(rank: 0, stage: 0, node: 0, reconstruction: Reconstruction(method: .copiedNeighbour, sourceStages: [1], sourceRanks: [2], weights: [1], sourceStep: 9)),
    ], summary: "stage 2 rebuilt")),
    .statusReply(StatusReply(
        nodeID: 1, daemonVersion: "0.1.0", budgetBytes: 1 << 30, usedBytes: 1 << 20,
        jobs: [JobStatus(job: job, world: 4, localRanks: 2, steps: [
            StepStatus(step: 7, committed: false, completeRanks: 1, bytes: 1 << 20, phase: .sealing, ageSeconds: nil),
            StepStatus(step: 6, committed: true, completeRanks: 2, bytes: 1 << 20, phase: .committed, ageSeconds: 86_400),
        ], flushedSteps: [4, 6])])),
    .restoreReady(RestoreReady(
        step: 6, entries: [ManifestEntry(spec: weights, crc32c: 1)], tensorOffsets: [128], segmentSizeBytes: 33_554_560, gradientNorm: 0.5, metadata: [1],
        durableSource: "/mnt/checkpoints/llama/step-00000000000000000006/rank-00003.safetensors")),
    .recoverReply(RecoverReply(coordinator: 0, deadNodes: [1, 2], rebuildingNodes: [], jobs: [
        JobRecovery(job: job, latestCommitted: 9, newestRestorable: nil, lostRanks: [2, 3], summary: "beyond tolerance", newestFlushed: 8),
    ])),
    .export(ExportRequest(job: job, step: nil, directory: "/tmp/export")),
    .export(ExportRequest(job: job, step: 9, directory: "/tmp/export")),
    .exportReply(ExportReply(job: job, step: 9, directory: "/tmp/export/llama/step-00000000000000000009", ranks: 8, bytes: 1 << 34)),
    .clusterStatus,
    .clusterStatusReply(ClusterStatusReply(coordinator: 0, nodes: [
        NodeSummary(node: 0, state: .alive, isCoordinator: true, usedBytes: 1 << 30, budgetBytes: 1 << 36, quarantinedFiles: 0),
        NodeSummary(node: 1, state: .unreachable, isCoordinator: false, usedBytes: 0, budgetBytes: 0, quarantinedFiles: 0, note: "connect: refused"),
    ], groups: [GroupHealth(index: 0, nodes: [0, 1, 2], parity: 1, lost: [1])])),
    .drain(DrainRequest(node: 2)),
    .drain(DrainRequest(node: 2, cancel: true)),
    .drainReply(DrainReply(node: 2, draining: true, safeToStop: false, reason: "a save is in flight")),
    .verify(VerifyRequest()),
    .verify(VerifyRequest(job: job, step: 9, node: 3, local: true)),
    .verifyReply(VerifyReply(nodes: [
        NodeVerification(node: 0, answered: true, shards: 4, parityFragments: 2, parityReencoded: 2, bytes: 1 << 24, problems: ["node 0: bad"], notes: []),
        NodeVerification(node: 1, answered: false, notes: ["node 1 is dead"]),
    ])),
    .rebuildPlan(RebuildPlanRequest(node: 2)),
    .rebuildPlanReply(RebuildPlanReply(node: 2, state: .rebuilding, steps: [
        PlannedStep(job: job, step: 9, ranks: [4, 5], shardBytes: 1 << 20, parityBytes: 1 << 19, sources: [0, 1], fetchBytes: 3 << 20, held: false),
    ])),
    .shardGet(ShardGet(job: job, step: 9, rank: 3)),
    .shardData(ShardData(job: job, step: 9, rank: 3, segmentSizeBytes: 1 << 20)),
    .error(ErrorReply(code: .overBudget, message: "save needs 12 GiB, 3 GiB free")),
    .ok,
]

let checkFreeAverage = Reconstruction(method: .averagedNeighbours, sourceStages: [1, 3], sourceRanks: [2, 6], weights: [0.25, 0.75], sourceStep: 9)

@Suite("Wire protocol")
struct ProtocolRoundTripTests {
    @Test func samplesCoverEveryMessageType() {
        #expect(Set(samples.map(\.type)) == Set(MessageType.allCases))
    }

    @Test(arguments: samples)
    func roundTrip(message: Message) throws {
        let bulk: UInt64 = message.type.carriesBulk ? 4096 : 0
        let bytes = try Frame.encode(message, requestID: 42, bulkLength: bulk)
        let (header, decoded, consumed) = try Frame.decode(bytes)
        #expect(decoded == message)
        #expect(header.requestID == 42)
        #expect(header.bulkLength == bulk)
        #expect(consumed == bytes.count)
    }

    @Test func frameDecodingIgnoresFollowingBytes() throws {
        let first = try Frame.encode(.latestCommitted, requestID: 1)
        let second = try Frame.encode(.ok, requestID: 2)
        let (_, message, consumed) = try Frame.decode(first + second)
        #expect(message == .latestCommitted)
        #expect(consumed == first.count)
    }

    @Test func reconstructionsWithImpossibleValuesAreRefused() throws {
        for bad in [
            Reconstruction(method: .averagedNeighbours, sourceStages: [1, 3], sourceRanks: [2, 6], weights: [0.25, .nan], sourceStep: 9),
            Reconstruction(method: .averagedNeighbours, sourceStages: [1, 3], sourceRanks: [2, 6], weights: [1.5, -0.5], sourceStep: 9),
            Reconstruction(method: .averagedNeighbours, sourceStages: [1, 3], sourceRanks: [2], weights: [0.5, 0.5], sourceStep: 9),
            Reconstruction(method: .copiedNeighbour, sourceStages: [], sourceRanks: [], weights: [], sourceStep: 9),
            Reconstruction(method: .copiedNeighbour, sourceStages: [1], sourceRanks: [2], weights: [1], sourceStep: 9, learningRateFactor: .infinity),
        ] {
            var writer = ByteWriter()
            writer.write(bad)
            var reader = ByteReader(writer.bytes)
            #expect(throws: ProtocolError.self, "\(bad)") { try reader.readReconstruction() }
        }
    }

    @Test func errorMessagesAreBoundedOnACharacterBoundary() {
        let long = String(repeating: "é", count: 5000)
        let reply = ErrorReply(code: .invalidRequest, message: long)
        #expect(reply.message.utf8.count <= ProtocolLimits.maximumMessageBytes)
        #expect(reply.message.utf8.count == ProtocolLimits.maximumMessageBytes)
    }
}

// MARK: - Malformed input

/// Rewrites a header field and re-seals the header checksum, so the test
/// reaches the check behind the checksum.
func resealed(_ frame: [UInt8], _ edit: (inout [UInt8]) -> Void) -> [UInt8] {
    var bytes = frame
    edit(&bytes)
    let crc = CRC32C.checksum(Array(bytes[0..<36]))
    withUnsafeBytes(of: crc.littleEndian) { bytes.replaceSubrange(36..<40, with: $0) }
    return bytes
}

/// A frame with a handcrafted payload (valid header and payload checksums).
func frame(_ type: MessageType, payload: [UInt8], bulk: UInt64 = 0) -> [UInt8] {
    FrameHeader(type: type, requestID: 9, payloadLength: UInt32(payload.count), payloadChecksum: CRC32C.checksum(payload), bulkLength: bulk).encoded() + payload
}

func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
    withUnsafeBytes(of: value.littleEndian) { bytes.replaceSubrange(offset..<(offset + MemoryLayout<T>.size), with: $0) }
}

func specBytes(name: [UInt8], dtype: DType = .float32, shape: [Int64], byteLength: UInt64) -> [UInt8] {
    var w = ByteWriter()
    w.write(step: 1)
    w.write(DataTransport.stream.rawValue)
    w.write(UInt32(1))
    w.write(UInt16(name.count))
    w.write(raw: name)
    w.write(dtype.rawValue)
    w.write(TensorKind.parameter.rawValue)
    w.write(UInt8(shape.count))
    for s in shape { w.write(s) }
    w.write(byteLength)
    return w.bytes
}

extension ByteWriter {
    mutating func write(step: UInt64) { write(step as UInt64) }
}

@Suite("Malformed frames each get their specific error")
struct MalformedInputTests {
    let valid = try! Frame.encode(.beginSave(BeginSave(step: 5, transport: .stream, tensors: [weights, rngState])), requestID: 1)

    @Test func truncatedHeader() {
        #expect(throws: ProtocolError.truncatedHeader(haveBytes: 39, needBytes: 40)) { try Frame.decode(Array(valid.prefix(39))) }
        #expect(throws: ProtocolError.truncatedHeader(haveBytes: 0, needBytes: 40)) { try Frame.decode([]) }
    }

    @Test func truncatedPayload() {
        let payloadBytes = valid.count - 40
        #expect(throws: ProtocolError.truncatedPayload(haveBytes: payloadBytes - 1, needBytes: payloadBytes)) { try Frame.decode(Array(valid.dropLast())) }
    }

    @Test func oversizeLengthClaims() throws {
        let huge = resealed(valid) { put(UInt32.max, at: 16, in: &$0) }
        #expect(throws: ProtocolError.payloadTooLarge(claimedBytes: UInt64(UInt32.max), limitBytes: UInt64(ProtocolLimits.maximumControlPayloadBytes))) { try Frame.decode(huge) }
        let bulk = resealed(try Frame.encode(.putTensor(PutTensor(step: 1, tensorIndex: 0, offsetBytes: 0)), requestID: 1)) { put(UInt64.max, at: 24, in: &$0) }
        #expect(throws: ProtocolError.bulkTooLarge(claimedBytes: UInt64.max, limitBytes: ProtocolLimits.maximumBulkBytes)) { try Frame.decode(bulk) }
        let unexpected = resealed(try Frame.encode(.ok, requestID: 1)) { put(UInt64(10), at: 24, in: &$0) }
        #expect(throws: ProtocolError.unexpectedBulk(type: .ok, bytes: 10)) { try Frame.decode(unexpected) }
    }

    @Test func badMagic() {
        var bytes = valid
        bytes[0] = UInt8(ascii: "H")  // e.g. an HTTP client on the wrong port
        #expect(throws: ProtocolError.badMagic(0x4450_4E48)) { try Frame.decode(bytes) }
    }

    @Test func unknownVersionTypeFlagsReserved() {
        #expect(throws: ProtocolError.unsupportedVersion(1)) { try Frame.decode(resealed(valid) { $0[4] = 1 }) }  // before CheckFree
        #expect(throws: ProtocolError.unsupportedVersion(2)) { try Frame.decode(resealed(valid) { $0[4] = 2 }) }  // before the durable tier
        #expect(throws: ProtocolError.unsupportedVersion(3)) { try Frame.decode(resealed(valid) { $0[4] = 3 }) }  // before the dead fields went
        #expect(throws: ProtocolError.unsupportedVersion(5)) { try Frame.decode(resealed(valid) { $0[4] = 5 }) }
        #expect(throws: ProtocolError.unknownMessageType(200)) { try Frame.decode(resealed(valid) { $0[5] = 200 }) }
        #expect(throws: ProtocolError.unknownFlags(0x8000)) { try Frame.decode(resealed(valid) { put(UInt16(0x8000), at: 6, in: &$0) }) }
        #expect(throws: ProtocolError.nonZeroReserved) { try Frame.decode(resealed(valid) { $0[33] = 1 }) }
    }

    @Test func badChecksums() throws {
        var header = valid
        header[12] ^= 0x01  // request id bit flip, not resealed
        #expect(throws: ProtocolError.headerChecksumMismatch(expected: try crc(valid, at: 36), actual: CRC32C.checksum(Array(header[0..<36])))) { try Frame.decode(header) }
        var payload = valid
        payload[45] ^= 0x40
        #expect(throws: ProtocolError.payloadChecksumMismatch(expected: try crc(valid, at: 20), actual: CRC32C.checksum(Array(payload[40...])))) { try Frame.decode(payload) }
    }

    @Test func invalidNames() {
        let nonUTF8 = frame(.beginSave, payload: specBytes(name: [0x6C, 0xFF, 0xFE], shape: [1], byteLength: 4))
        #expect(throws: ProtocolError.invalidUTF8(field: "tensor.name")) { try Frame.decode(nonUTF8) }
        let overLong = frame(.beginSave, payload: specBytes(name: Array(repeating: 0x61, count: 257), shape: [1], byteLength: 4))
        #expect(throws: ProtocolError.tooLong(field: "tensor.name", bytes: 257, limitBytes: 256)) { try Frame.decode(overLong) }
        let empty = frame(.beginSave, payload: specBytes(name: [], shape: [1], byteLength: 4))
        #expect(throws: ProtocolError.emptyField("tensor.name")) { try Frame.decode(empty) }
        var w = ByteWriter()
        w.write(PeerRole.trainer.rawValue)
        w.write(true)
        w.write("../etc")
        let badJob = frame(.hello, payload: w.bytes + [UInt8](repeating: 0, count: 24))
        #expect(throws: ProtocolError.invalidValue(field: "job", reason: "'../etc' must be [A-Za-z0-9._-] and not start with '.'")) { try Frame.decode(badJob) }
    }

    @Test func invalidShapes() {
        let negative = frame(.beginSave, payload: specBytes(name: Array("w".utf8), shape: [4, -2], byteLength: 0))
        #expect(throws: ProtocolError.negativeDimension(tensor: "w", dimension: 1, value: -2)) { try Frame.decode(negative) }
        let overflow = frame(.beginSave, payload: specBytes(name: Array("w".utf8), shape: [Int64.max, Int64.max], byteLength: 0))
        #expect(throws: ProtocolError.shapeOverflow(tensor: "w")) { try Frame.decode(overflow) }
        let bytesOverflow = frame(.beginSave, payload: specBytes(name: Array("w".utf8), dtype: .float64, shape: [1 << 62], byteLength: 0))
        #expect(throws: ProtocolError.shapeOverflow(tensor: "w")) { try Frame.decode(bytesOverflow) }
        let mismatch = frame(.beginSave, payload: specBytes(name: Array("w".utf8), shape: [3, 3], byteLength: 35))
        #expect(throws: ProtocolError.byteLengthMismatch(tensor: "w", shapeBytes: 36, declaredBytes: 35)) { try Frame.decode(mismatch) }
        let deep = frame(.beginSave, payload: specBytes(name: Array("w".utf8), shape: [Int64](repeating: 1, count: 17), byteLength: 4))
        #expect(throws: ProtocolError.tooMany(field: "tensor.shape", count: 17, limit: 16)) { try Frame.decode(deep) }
    }

    @Test func forgedCountsAreRefusedBeforeAllocating() {
        var w = ByteWriter()
        w.write(UInt64(1))
        w.write(DataTransport.stream.rawValue)
        w.write(UInt32(16_000))  // claims 16,000 tensors in a 13-byte payload
        #expect(throws: ProtocolError.truncatedField("tensors")) { try Frame.decode(frame(.beginSave, payload: w.bytes)) }
        var tooMany = ByteWriter()
        tooMany.write(UInt64(1))
        tooMany.write(DataTransport.stream.rawValue)
        tooMany.write(UInt32(1_000_000))
        #expect(throws: ProtocolError.tooMany(field: "tensors", count: 1_000_000, limit: ProtocolLimits.maximumTensorsPerShard)) { try Frame.decode(frame(.beginSave, payload: tooMany.bytes)) }
    }

    @Test func semanticChecks() {
        var w = ByteWriter()
        w.write(PeerRole.trainer.rawValue)
        w.write(true)
        w.write(job)
        w.write(UInt32(16))  // rank
        w.write(UInt32(16))  // world
        w.write(raw: [UInt8](repeating: 0, count: 20))  // topology, node id, local world
        #expect(throws: ProtocolError.invalidValue(field: "rank", reason: "rank 16 is not below world 16")) { try Frame.decode(frame(.hello, payload: w.bytes)) }
        #expect(throws: ProtocolError.trailingBytes(1)) { try Frame.decode(frame(.ok, payload: [0])) }
        #expect(throws: ProtocolError.invalidValue(field: "hasJob", reason: "boolean must be 0 or 1, got 7")) { try Frame.decode(frame(.status, payload: [7])) }
        var duplicate = ByteWriter()
        duplicate.write(UInt64(1))
        duplicate.write(DataTransport.stream.rawValue)
        duplicate.write([rngState, rngState])
        #expect(throws: ProtocolError.invalidValue(field: "tensors", reason: "tensor name 'rng.cuda' appears twice")) { try Frame.decode(frame(.beginSave, payload: duplicate.bytes)) }
        var nan = ByteWriter()
        nan.write(UInt64(1))
        nan.write(false)
        nan.writeOptional(Double.nan.bitPattern)
        nan.write(blob: [])
        #expect(throws: ProtocolError.invalidValue(field: "gradientNorm", reason: "must be finite and ≥ 0, got nan")) { try Frame.decode(frame(.commitSave, payload: nan.bytes)) }
    }

    /// A repair request names a bounded slice size and a non-empty chain of distinct nodes.
    @Test func repairRequestsAreChecked() {
        let hop = RepairHop(nodeID: 2, index: 1, coefficient: 9)
        func request(slice: UInt32, chain: [RepairHop]) -> [UInt8] {
            let payload = Message.repairRequest(RepairRequest(fragment: fragment, fragmentSizeBytes: 1 << 20, sliceSizeBytes: slice, chain: chain)).encodedPayload()
            return frame(.repairRequest, payload: payload)
        }
        #expect(throws: ProtocolError.invalidValue(field: "sliceSizeBytes", reason: "4095 is outside 4096...16777216")) { try Frame.decode(request(slice: 4095, chain: [hop])) }
        #expect(throws: ProtocolError.invalidValue(field: "sliceSizeBytes", reason: "16777217 is outside 4096...16777216")) {
            try Frame.decode(request(slice: (16 << 20) + 1, chain: [hop]))
        }
        #expect(throws: ProtocolError.emptyField("chain")) { try Frame.decode(request(slice: 1 << 20, chain: [])) }
        #expect(throws: ProtocolError.invalidValue(field: "chain", reason: "a node appears twice")) { try Frame.decode(request(slice: 1 << 20, chain: [hop, hop])) }
        let sliced = RepairRequest(fragment: fragment, fragmentSizeBytes: 10_000, sliceSizeBytes: 4096, chain: [hop])
        #expect(sliced.sliceCount == 3)
        #expect(sliced.slice(2) == (8192, 1808))
        #expect(RepairRequest(fragment: fragment, fragmentSizeBytes: 0, sliceSizeBytes: 4096, chain: [hop]).sliceCount == 1)
    }

    private func crc(_ bytes: [UInt8], at offset: Int) throws -> UInt32 {
        var reader = ByteReader(Array(bytes[offset..<(offset + 4)]))
        return try reader.read(UInt32.self, "crc")
    }
}

@Suite("Randomized input never traps")
struct RandomizedInputTests {

    /// Pure noise: nearly always rejected at the header, must never trap.
    @Test func randomByteStrings() {
        var rng = SplitMix64(seed: 1)
        var decoded = 0
        for _ in 0..<20_000 {
            let length = Int.random(in: 0..<200, using: &rng)
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if (try? Frame.decode(bytes)) != nil { decoded += 1 }
        }
        #expect(decoded == 0, "noise should not pass the magic and header checksum")
    }

    /// Valid frames with random payload mutations, re-sealed so the message
    /// decoder itself (not just the checksums) sees hostile bytes.
    @Test func mutatedPayloadsBehindValidChecksums() {
        var rng = SplitMix64(seed: 2)
        var rejected = 0
        var accepted = 0
        for round in 0..<30_000 {
            let sample = samples[round % samples.count]
            var payload = sample.encodedPayload()
            switch Int.random(in: 0..<4, using: &rng) {
            case 0 where !payload.isEmpty:  // flip bytes
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    payload[Int.random(in: 0..<payload.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            case 1:  // truncate
                payload = Array(payload.prefix(Int.random(in: 0...payload.count, using: &rng)))
            case 2:  // append garbage
                payload += (0..<Int.random(in: 1...16, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            default:  // replace with noise
                payload = (0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            do {
                let (_, message, _) = try Frame.decode(frame(sample.type, payload: payload))
                // Whatever decodes must re-encode to the same bytes: no silent reinterpretation.
                #expect(message.encodedPayload() == payload)
                accepted += 1
            } catch {
                rejected += 1
            }
        }
        #expect(rejected > 10_000)
        #expect(accepted + rejected == 30_000)
    }
}

/// Writes the fuzz target's seed corpus (fuzz/corpus): every sample message
/// as a whole frame and as type byte + payload, the two shapes
/// fuzz/FuzzFrames.swift reads. Runs only when asked:
/// `SNAPSHOTD_WRITE_FUZZ_CORPUS=fuzz/corpus swift test --filter writeFuzzCorpus`.
@Test func writeFuzzCorpus() throws {
    guard let directory = ProcessInfo.processInfo.environment["SNAPSHOTD_WRITE_FUZZ_CORPUS"] else { return }
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    for (index, message) in samples.enumerated() {
        let frame = try Frame.encode(message, requestID: UInt64(index))
        try Data(frame).write(to: URL(fileURLWithPath: "\(directory)/frame-\(index)-\(message.type.rawValue)"))
        try Data([message.type.rawValue] + message.encodedPayload()).write(to: URL(fileURLWithPath: "\(directory)/payload-\(index)-\(message.type.rawValue)"))
    }
}

/// The smallest valid encodings decode: a list's minimum element size is what
/// its element takes when every variable part is empty, never more (a larger
/// minimum refused real replies: a node with an empty note, a verify note "").
@Suite("Smallest valid messages")
struct SmallestValidMessageTests {
    @Test(arguments: [
        Message.clusterStatusReply(ClusterStatusReply(coordinator: 0, nodes: (0..<3).map {
            NodeSummary(node: $0, state: .alive, isCoordinator: $0 == 0, usedBytes: 0, budgetBytes: 0, quarantinedFiles: 0, note: "")
        }, groups: [])),
        Message.verifyReply(VerifyReply(nodes: [NodeVerification(node: 1, answered: true, problems: [""], notes: ["", ""])])),
    ])
    func roundTrips(message: Message) throws {
        let bytes = try Frame.encode(message, requestID: 7)
        let (_, decoded, consumed) = try Frame.decode(bytes)
        #expect(decoded == message)
        #expect(consumed == bytes.count)
    }
}
