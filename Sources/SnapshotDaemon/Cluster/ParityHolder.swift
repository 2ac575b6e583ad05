import ErasureCoding
import Foundation
import Glibc
import Logging
import SnapshotIO
import SnapshotProtocol

/// Protection, holder side: parity buffers created zeroed, data fragments
/// checked and folded in (each slot once, as the machine admits them), parity
/// sealed with its CRC when every fragment that belongs in it is folded.
extension ClusterNode {
    /// Creates this node's parity buffers of the step (zeroed) and seals the
    /// complete ones (a stripe whose sources are all padding completes with
    /// no fragment arriving). Returns the machine's follow-up actions.
    func holdParity(job: JobID, step: Step, fragmentSizeBytes size: UInt64) -> [ProtectionMachine.Action] {
        let complete: [ParityKey]
        do {
            complete = try state.withLock { state throws -> [ParityKey] in
                guard !state.store.isCommitted(job: job, step: step) else { return [] }
                var complete: [ParityKey] = []
                for (stripe, row) in try layout.parityStripes(node: position) {
                    let key = ParityKey(job: job, step: step, stripe: stripe)
                    let (record, _) = try ensureParity(key, row: row, fragmentSizeBytes: size, state: &state)
                    if !record.isComplete, state.cluster!.protection.isParityComplete(job: job, step: step, stripe: stripe, record: record) { complete.append(key) }
                }
                return complete
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
        return state.withLock { state in
            state.store.updateParity(key) { $0.crc32c = crc }
            return state.cluster!.protection.paritySealed(job: key.job, step: key.step, store: state.store)
        }
    }

    /// Inside state.withLock: the parity buffer for `key`, created zeroed on first use.
    private func ensureParity(_ key: ParityKey, row: Int, fragmentSizeBytes: UInt64, state: inout NodeState) throws -> (ParityRecord, MappedSegment) {
        if let record = state.store.parity(key), let segment = state.paritySegments[key] {
            guard record.fragmentSizeBytes == fragmentSizeBytes else {
                throw StoreError(.invalidRequest, "\(key) uses \(record.fragmentSizeBytes)-byte fragments, got \(fragmentSizeBytes)")
            }
            return (record, segment)
        }
        // The job's world comes from the step's reports (or the job this node
        // already knows); it is never guessed: a store job created with a
        // wrong world would refuse the job's trainers (`wrongJob`) for good.
        guard let world = state.cluster!.protection.ledger.entry(job: key.job, step: key.step)?.world ?? state.store.jobs[key.job]?.world else {
            throw StoreError(.unavailable, "node \(selfID) has no report of \(key.job) step \(key.step) yet; retry")
        }
        let record = try state.store.reserveParity(key, row: row, fragmentSizeBytes: fragmentSizeBytes, world: world)
        do {
            let segment = try arena.createParitySegment(key, sizeBytes: record.segmentSizeBytes)
            state.paritySegments[key] = segment
            return (record, segment)
        } catch {
            storeEffects.apply(state.store.releaseParity(key), to: &state)
            throw StoreError(.overBudget, "cannot allocate parity for \(key): \(error)")
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
        let admitted: Result<MappedSegment?, StoreError> = state.withLock { state in
            switch state.cluster!.protection.admit(put, record: state.store.parity(key), store: state.store) {
            case .refuse(let error): return .failure(error)
            case .duplicate: return .success(nil)
            case .fold:
                do {
                    return .success(try ensureParity(key, row: row, fragmentSizeBytes: put.fragmentSizeBytes, state: &state).1)
                } catch let error as StoreError {
                    return .failure(error)
                } catch {
                    return .failure(StoreError(.internalError, "\(error)"))
                }
            }
        }
        let segment: MappedSegment?
        switch admitted {
        case .failure(let error):
            // Refused before its bytes were read: drain them so the stream stays framed.
            try connection.socket.discard(count: header.bulkLength, deadlineMilliseconds: connection.bulkDeadline(header.bulkLength))
            logger.error("fragment refused", metadata: ["fragment": "\(id)", "source": "\(put.sourceNode)", "reason": "\(error.message)"])
            throw error
        case .success(let admittedSegment):
            segment = admittedSegment
        }
        let size = Int(put.fragmentSizeBytes)
        if scratch == nil || scratch!.sizeBytes < size { scratch = try MappedSegment.anonymous(sizeBytes: size) }
        let buffer = scratch!.bytes(offset: 0, count: size)
        try connection.socket.readExact(into: buffer.baseAddress!, count: size, deadlineMilliseconds: connection.bulkDeadline(UInt64(size)))
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(buffer))
        guard crc == put.crc32c else {
            logger.error("fragment arrived corrupted", metadata: ["fragment": "\(id)", "source": "\(put.sourceNode)"])
            throw StoreError(.checksumMismatch, "fragment \(key) slot \(slot) failed its CRC check")
        }
        if let segment {
            try fold(put, key: key, row: row, from: buffer.baseAddress!, into: segment)
        }
        return .fragmentAck(FragmentAck(fragment: id, holderNode: selfID))
    }

    /// Folds a checked fragment into its parity, once; seals the parity when
    /// it was the last slot, before the fragment is acknowledged (so a step
    /// every source reports protected has all its parity sealed).
    private func fold(_ put: FragmentPut, key: ParityKey, row: Int, from buffer: UnsafeMutableRawPointer, into segment: MappedSegment) throws {
        let slot = Int(put.fragment.index)
        let actions: [ProtectionMachine.Action] = try accumulateLock.withLock {
            // Admission again: another session may have folded this slot meanwhile.
            let admission = state.withLock { $0.cluster!.protection.admit(put, record: $0.store.parity(key), store: $0.store) }
            switch admission {
            case .refuse(let error): throw error
            case .duplicate: return []
            case .fold: break
            }
            try [segment.base!].withUnsafeBufferPointer {
                try code.accumulate(dataIndex: slot, data: buffer, intoParityRowsFrom: row, parity: $0, fragmentSizeBytes: Int(put.fragmentSizeBytes))
            }
            let complete = state.withLock { state -> Bool in
                state.store.updateParity(key) { $0.foldedSlots[slot] = put.crc32c }
                guard let record = state.store.parity(key) else { return false }
                return state.cluster!.protection.isParityComplete(job: key.job, step: key.step, stripe: key.stripe, record: record)
            }
            return complete ? seal(key) : []
        }
        execute(actions)
    }
}
