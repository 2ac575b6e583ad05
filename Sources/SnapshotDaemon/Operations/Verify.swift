import ErasureCoding
import Foundation
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// `snapshotctl verify`: every node re-checks what it holds (of one job or
/// step, if asked): each committed shard's tensors against their sealed
/// CRCs, each parity fragment against its CRC and against parity decoded
/// again from the other fragments of its stripe. Unlike the scrub it is
/// unpaced (an operator waits for it) and heals nothing: it names what is
/// wrong, so the operator decides.
extension SnapshotServer {
    /// Problems (and notes) one node reports in full; the rest are counted in one line.
    static let reportedProblemsPerNode = 64

    func verify(_ request: VerifyRequest) -> VerifyReply {
        if request.local { return VerifyReply(nodes: [verifyHere(request)]) }
        let all = clusterConfiguration?.nodeIDs ?? [configuration.nodeID]
        let targets = request.node.map { [$0] } ?? all
        let dead = Set(cluster?.recoverPicture().deadNodes ?? [])
        let nodes = concurrentMap(targets) { [self] node -> NodeVerification in
            guard all.contains(node) else { return NodeVerification(node: node, answered: false, notes: ["node \(node) is not in this cluster"]) }
            if node == configuration.nodeID { return verifyHere(request) }
            guard !dead.contains(node), let cluster else { return NodeVerification(node: node, answered: false, notes: ["node \(node) is dead: nothing on it was checked"]) }
            var asked = request
            asked.local = true
            // A connection of its own: a long unpaced check must not hold the
            // shared data channel that protection and rebuilds use.
            do {
                let connection = try cluster.mesh.openConnection(node, .data, timeoutMilliseconds: Limits.operatorPeerTimeoutMilliseconds)
                defer { connection.close() }
                try connection.send(.verify(asked), requestID: 1)
                let reply = try connection.receiveReply(
                    deadlineMilliseconds: monotonicMilliseconds() + Limits.verifyReplyTimeoutMilliseconds, maximumPayloadBytes: ProtocolLimits.maximumControlPayloadBytes
                ).message
                if case .error(let refusal) = reply { return NodeVerification(node: node, answered: false, notes: ["node \(node): \(refusal.message)"]) }
                guard case .verifyReply(let answer) = reply, let line = answer.nodes.first, line.node == node else {
                    throw PeerError(code: nil, message: "unexpected reply \(reply.type)")
                }
                return line
            } catch {
                return NodeVerification(node: node, answered: false, notes: ["node \(node) did not answer: \(error)"])
            }
        }
        return VerifyReply(nodes: nodes)
    }

    /// This node's own check; one at a time (a second is refused, not stacked).
    func verifyHere(_ request: VerifyRequest) -> NodeVerification {
        let node = configuration.nodeID
        guard verifying.withLock({ running in running ? false : { running = true; return true }() }) else {
            return NodeVerification(node: node, answered: false, notes: ["node \(node) is already verifying (one verify at a time)"])
        }
        defer { verifying.withLock { $0 = false } }
        var result = NodeVerification(node: node, answered: true)
        let items = state.withLock { Self.scrubItems($0) }.filter { item in
            let (job, step) = switch item {
            case .shard(let key, _, _): (key.job, key.step)
            case .parity(let key, _, _): (key.job, key.step)
            }
            return (request.job == nil || request.job == job) && (request.step == nil || request.step == step)
        }
        for item in items {
            switch item {
            case .shard(let key, let shard, let segment):
                result.shards += 1
                result.bytes += shard.specs.reduce(0) { $0 + $1.byteLength }
                let bad = corruptedTensors(shard, in: segment)
                if !bad.isEmpty, isStillHeld(item) {
                    counters.increment(.crcFailures)
                    result.problems.append("node \(node): \(key.job) step \(key.step) rank \(key.rank): tensor(s) \(bad.prefix(8).map { "'\($0)'" }.joined(separator: ", ")) fail their sealed CRCs")
                }
            case .parity(let key, let record, let segment):
                result.parityFragments += 1
                result.bytes += record.fragmentSizeBytes
                let crc = CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: 0, count: Int(record.fragmentSizeBytes))))
                if crc != record.crc32c, isStillHeld(item) {
                    counters.increment(.crcFailures)
                    result.problems.append("node \(node): \(key.job) step \(key.step) parity of stripe \(key.stripe) (row \(record.row)) fails its sealed CRC")
                    continue
                }
                guard let cluster else { continue }
                do {
                    if try cluster.parityMatchesReencoding(key, record: record, segment: segment) {
                        result.parityReencoded += 1
                    } else if isStillHeld(item) {
                        result.parityReencoded += 1
                        result.problems.append("node \(node): \(key.job) step \(key.step) parity of stripe \(key.stripe) (row \(record.row)) differs from parity re-encoded from the stripe's other fragments")
                    }
                } catch {
                    result.notes.append("node \(node): \(key.job) step \(key.step) parity of stripe \(key.stripe) not re-encoded: \(error)")
                }
            }
        }
        result.problems = Self.capped(result.problems)
        result.notes = Self.capped(result.notes)
        logger.notice("verified what this node holds", metadata: [
            "shards": "\(result.shards)", "parity": "\(result.parityFragments)", "reencoded": "\(result.parityReencoded)",
            "bytes": "\(result.bytes)", "problems": "\(result.problems.count)",
        ])
        for problem in result.problems { logger.error("verify: \(problem)") }
        return result
    }

    private static func capped(_ lines: [String]) -> [String] {
        lines.count <= reportedProblemsPerNode ? lines : Array(lines.prefix(reportedProblemsPerNode - 1)) + ["… and \(lines.count - reportedProblemsPerNode + 1) more"]
    }
}
