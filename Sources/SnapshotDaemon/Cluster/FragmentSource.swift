import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Serving fragments for a rebuild: a range of this node's data of a step it
/// committed (its tensors checked against their sealed CRCs first), or a
/// sealed parity fragment with the CRC it was sealed with.
extension ClusterNode {
    static let shareVerificationValidMilliseconds: Int64 = 60_000

    /// Sends a data fragment of this node, or a parity fragment it holds, whole.
    func serveFragment(_ request: FragmentGet, requestID: UInt64, connection: FramedConnection) throws {
        let local = try localFragment(request.fragment)
        let crc = local.storedCRC32C ?? local.checksum()
        try connection.send(.fragmentData(FragmentData(fragment: request.fragment, fragmentSizeBytes: UInt64(local.sizeBytes), crc32c: crc)), requestID: requestID, bulkLength: UInt64(local.sizeBytes))
        try local.bytes.write(offset: local.offsetBytes, count: local.sizeBytes, to: connection)
    }

    /// Fragment `id` as this node holds it: a range of its step data (zero
    /// padded), or a complete parity fragment with the CRC it was stored with.
    func localFragment(_ id: FragmentID) throws -> LocalFragment {
        let stripe = Int(id.stripe)
        let index = Int(id.index)
        let k = layout.dataFragmentCount
        guard stripe < layout.stripeCount, index < layout.groupSize else {
            throw StoreError(.invalidRequest, "fragment \(index) of stripe \(stripe) is outside the layout")
        }
        if index < k {
            guard try layout.dataSource(stripe: stripe, slot: index) == position,
                case .data(_, let fragment) = try layout.role(node: position, stripe: stripe)
            else { throw StoreError(.invalidRequest, "data slot \(index) of stripe \(stripe) is not on node \(selfID)") }
            return try localDataFragment(id, fragment: fragment)
        }
        let key = ParityKey(job: id.job, step: id.step, stripe: stripe)
        let found: LocalFragment? = withClusterState { cluster, state in
            guard cluster.discovered, let record = state.store.parity(key), record.isComplete, record.row == index - k,
                let segment = state.paritySegments[key]
            else { return nil }
            return LocalFragment(bytes: NodeStepData(segments: [segment]), offsetBytes: 0, sizeBytes: Int(record.fragmentSizeBytes), storedCRC32C: record.crc32c)
        }
        guard let found else { throw StoreError(.unavailable, "node \(selfID) holds no complete parity for \(key)") }
        return found
    }

    /// Data fragment `fragment` of this node's share, once its tensors pass
    /// their sealed CRCs (checked once per share per minute: a rebuild asks
    /// for every fragment of it). Bad bytes are refused, never decoded into a
    /// replacement's parity.
    private func localDataFragment(_ id: FragmentID, fragment: Int) throws -> LocalFragment {
        let share = ProtectionMachine.StepID(job: id.job, step: id.step)
        let now = monotonicMilliseconds()
        let held: (LocalFragment, [(ShardRecord, MappedSegment)], verified: Bool)? = withClusterState { cluster, state in
            guard cluster.discovered, state.store.isCommitted(job: id.job, step: id.step),
                let size = cluster.protection.ledger.fragmentSizeBytes(job: id.job, step: id.step, group: group)
            else { return nil }
            let shards = state.store.localShards(job: id.job, step: id.step)
            // A share CheckFree rebuilt is no longer what the group's parity encodes.
            guard !shards.contains(where: { $0.shard.reconstruction != nil }) else { return nil }
            let segments = shards.compactMap { state.segments[ShardKey(job: id.job, step: id.step, rank: $0.rank)] }
            guard segments.count == shards.count else { return nil }
            let local = LocalFragment(bytes: NodeStepData(segments: segments), offsetBytes: fragment * Int(size), sizeBytes: Int(size), storedCRC32C: nil)
            let verified = cluster.verifiedShares[share].map { now - $0 < Self.shareVerificationValidMilliseconds } ?? false
            return (local, Array(zip(shards.map(\.shard), segments)), verified)
        }
        guard let (local, shards, verified) = held else { throw StoreError(.unavailable, "node \(selfID) does not hold step \(id.step) of \(id.job)") }
        if !verified {
            let corrupted = corruptedTensors(of: shards, overlapping: 0..<local.bytes.totalBytes)
            guard corrupted.isEmpty else {
                counters.increment(.crcFailures)
                logger.error("refusing to serve a data fragment: tensors fail their sealed CRCs", metadata: ["fragment": "\(id)", "tensors": "\(corrupted)"])
                throw StoreError(.checksumMismatch, "node \(selfID): data fragment \(id) covers tensor(s) \(corrupted) that fail their sealed CRCs")
            }
            withClusterState { cluster, _ in
                cluster.verifiedShares = cluster.verifiedShares.filter { now - $0.value < Self.shareVerificationValidMilliseconds }
                cluster.verifiedShares[share] = now
            }
        }
        return local
    }
}

/// A fragment in place: `sizeBytes` of `bytes` from `offsetBytes`. Parity
/// carries the CRC computed when it was completed; data fragments are
/// checksummed as they are read (their tensors' own CRCs are checked first).
struct LocalFragment {
    let bytes: NodeStepData
    let offsetBytes: Int
    let sizeBytes: Int
    let storedCRC32C: UInt32?

    func checksum() -> UInt32 { bytes.checksum(offset: offsetBytes, count: sizeBytes) }
}
