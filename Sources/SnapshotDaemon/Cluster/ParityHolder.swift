import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Protection, holder side: parity buffers created zeroed, data fragments
/// checked and folded in (each slot once, as the machine admits them), parity
/// sealed with its CRC when every fragment that belongs in it is folded.
extension ClusterNode {
    /// Creates this node's parity buffers of the step (zeroed) and seals the
    /// complete ones (a stripe whose sources are all padding completes with
    /// no fragment arriving). Returns the machine's follow-up actions.
    func holdParity(job: JobID, step: Step, fragmentSizeBytes size: UInt64) -> [ProtectionMachine.Action] {
        var complete: [ParityKey] = []
        do {
            for (stripe, row) in try layout.parityStripes(node: position) {
                let key = ParityKey(job: job, step: step, stripe: stripe)
                guard try ensureParity(key, row: row, fragmentSizeBytes: size, unlessCommitted: true) != nil else { return [] }
                let isComplete = withClusterState { cluster, state -> Bool in
                    guard let record = state.store.parity(key), !record.isComplete else { return false }
                    return cluster.protection.isParityComplete(job: job, step: step, stripe: stripe, record: record)
                }
                if isComplete { complete.append(key) }
            }
        } catch {
            logger.error("cannot hold parity for the step", metadata: ["job": "\(job)", "step": "\(step)", "error": "\(error)"])
            return [.log(.error, "this node cannot hold its parity of the step; it cannot commit here", job: job, step: step)]
        }
        return complete.flatMap(seal)
    }

    /// Computes a complete parity fragment's CRC (outside the lock: its bytes
    /// no longer change) and records it.
    private func seal(_ key: ParityKey) -> [ProtectionMachine.Action] {
        guard let (segment, size) = state.withLock({ state -> (MappedSegment, Int)? in
            guard let record = state.store.parity(key), !record.isComplete, let segment = state.paritySegments[key] else { return nil }
            return (segment, Int(record.fragmentSizeBytes))
        }) else { return [] }
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(segment.bytes(offset: 0, count: size)))
        return withClusterState { cluster, state in
            state.store.updateParity(key) { $0.crc32c = crc }
            return cluster.protection.paritySealed(job: key.job, step: key.step, store: state.store)
        }
    }

    /// The parity buffer for `key`, created zeroed on first use (nil when
    /// `unlessCommitted` and the step is already committed here). The store
    /// reserves its bytes under the state lock; the file is created outside
    /// it, by the key's owner, and installed if the reservation still stands
    /// (retention may have dropped the step meanwhile); a failure anywhere
    /// gives back the reservation and the file.
    private func ensureParity(_ key: ParityKey, row: Int, fragmentSizeBytes: UInt64, unlessCommitted: Bool = false) throws -> (ParityRecord, MappedSegment)? {
        try parityOwners.withExclusive(key) {
            let reserved = try withClusterState { cluster, state throws -> (ParityRecord, MappedSegment?)? in
                if unlessCommitted, state.store.isCommitted(job: key.job, step: key.step) { return nil }
                if let record = state.store.parity(key) {
                    guard record.fragmentSizeBytes == fragmentSizeBytes else {
                        throw StoreError(.invalidRequest, "\(key) uses \(record.fragmentSizeBytes)-byte fragments, got \(fragmentSizeBytes)")
                    }
                    if let segment = state.paritySegments[key] { return (record, segment) }
                }
                // The job's world comes from the step's reports (or the job this node
                // already knows); it is never guessed: a store job created with a
                // wrong world would refuse the job's trainers (`wrongJob`) for good.
                guard let world = cluster.protection.ledger.entry(job: key.job, step: key.step)?.world ?? state.store.jobs[key.job]?.world else {
                    throw StoreError(.unavailable, "node \(selfID) has no report of \(key.job) step \(key.step) yet; retry")
                }
                return (try state.store.reserveParity(key, row: row, fragmentSizeBytes: fragmentSizeBytes, world: world), nil)
            }
            guard let (record, existing) = reserved else { return nil }
            if let existing { return (record, existing) }
            var reservation = Reservation()
            reservation.took { [self] in state.withLock { _ = storeEffects.apply($0.store.releaseParity(key), to: &$0) } }
            let segment: MappedSegment
            do {
                segment = try arena.createParitySegment(key, sizeBytes: record.segmentSizeBytes)
            } catch {
                throw StoreError(.overBudget, "cannot allocate parity for \(key): \(error)")
            }
            reservation.took { [arena] in arena.releaseParity(key, segment: segment, poolLimitBytes: 0) }
            let installed = state.withLock { state -> ParityRecord? in
                guard let record = state.store.parity(key), state.paritySegments[key] == nil else { return nil }
                state.paritySegments[key] = segment
                return record
            }
            guard let installed else {
                throw StoreError(.unknownStep, "\(key) was dropped while its parity was allocated")
            }
            reservation.installed()
            return (installed, segment)
        }
    }

    /// A data fragment arrives at its parity holder: straight into a scratch
    /// buffer, checked against its CRC, folded into the parity (unless the
    /// machine refuses it or has it already), acknowledged.
    func handleFragmentPut(_ put: FragmentPut, header: FrameHeader, connection: FramedConnection, scratch: inout MappedSegment?) throws -> Message {
        let id = put.fragment
        let stripe = Int(id.stripe)
        let slot = Int(id.index)
        guard stripe < layout.stripeCount, slot < layout.dataFragmentCount, header.bulkLength == put.fragmentSizeBytes,
            put.fragmentSizeBytes > 0, put.fragmentSizeBytes <= UInt64(ReedSolomon.maximumFragmentSizeBytes),
            case .parity(let row) = try layout.role(node: position, stripe: stripe),
            try layout.dataSource(stripe: stripe, slot: slot) == group.position(of: put.sourceNode)
        else {
            throw SessionEnd(reason: "fragment \(id) from node \(put.sourceNode) does not belong on this node")
        }
        let key = ParityKey(job: id.job, step: id.step, stripe: stripe)
        let admission = withClusterState { cluster, state in cluster.protection.admit(put, record: state.store.parity(key), store: state.store) }
        let admitted: Result<MappedSegment?, StoreError>
        switch admission {
        case .refuse(let error): admitted = .failure(error)
        case .duplicate: admitted = .success(nil)
        case .fold:
            do {
                admitted = .success(try ensureParity(key, row: row, fragmentSizeBytes: put.fragmentSizeBytes)?.1)
            } catch let error as StoreError {
                admitted = .failure(error)
            } catch {
                admitted = .failure(StoreError(.internalError, "\(error)"))
            }
        }
        let segment: MappedSegment?
        switch admitted {
        case .failure(let error):
            // Refused before its bytes were read: drain them so the stream stays framed.
            try connection.stream.discard(count: header.bulkLength, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
            logger.error("fragment refused", metadata: ["fragment": "\(id)", "source": "\(put.sourceNode)", "reason": "\(error.message)"])
            throw error
        case .success(let admittedSegment):
            segment = admittedSegment
        }
        let size = Int(put.fragmentSizeBytes)
        if scratch == nil || scratch!.sizeBytes < size { scratch = try MappedSegment.anonymous(sizeBytes: size) }
        let buffer = scratch!.bytes(offset: 0, count: size)
        try connection.stream.readExact(into: buffer.baseAddress!, count: size, deadlineMilliseconds: connection.bulkDeadline(UInt64(size)))
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(buffer))
        guard crc == put.crc32c else {
            counters.increment(.crcFailures)
            logger.error("fragment arrived corrupted", metadata: ["fragment": "\(id)", "source": "\(put.sourceNode)"])
            throw StoreError(.checksumMismatch, "fragment \(key) slot \(slot) failed its CRC check")
        }
        if let segment {
            try fold(put, key: key, row: row, from: buffer.baseAddress!, into: segment)
        }
        return .fragmentAck(FragmentAck(fragment: id))
    }

    /// Folds a checked fragment into its parity, once; seals the parity when
    /// it was the last slot, before the fragment is acknowledged (so a step
    /// every source reports protected has all its parity sealed).
    private func fold(_ put: FragmentPut, key: ParityKey, row: Int, from buffer: UnsafeMutableRawPointer, into segment: MappedSegment) throws {
        let slot = Int(put.fragment.index)
        let actions: [ProtectionMachine.Action] = try parityOwners.withExclusive(key) {
            // Admission again: another session may have folded this slot meanwhile.
            let admission = withClusterState { cluster, state in cluster.protection.admit(put, record: state.store.parity(key), store: state.store) }
            switch admission {
            case .refuse(let error): throw error
            case .duplicate: return []
            case .fold: break
            }
            try [segment.base!].withUnsafeBufferPointer {
                try code.accumulate(dataIndex: slot, data: buffer, intoParityRowsFrom: row, parity: $0, fragmentSizeBytes: Int(put.fragmentSizeBytes))
            }
            let complete = withClusterState { cluster, state -> Bool in
                state.store.updateParity(key) { $0.foldedSlots[slot] = put.crc32c }
                guard let record = state.store.parity(key) else { return false }
                return cluster.protection.isParityComplete(job: key.job, step: key.step, stripe: key.stripe, record: record)
            }
            return complete ? seal(key) : []
        }
        execute(actions)
    }
}
