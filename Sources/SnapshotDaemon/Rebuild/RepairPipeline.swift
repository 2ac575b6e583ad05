import ErasureCoding
import Foundation
import Glibc
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

/// Pipelined repair (Li et al., "Repair Pipelining for Erasure-Coded Storage",
/// USENIX ATC 2017). Rebuilding a fragment from k survivors by gathering them
/// at the replacement makes its one link carry k fragments. Decoding is
/// linear, so instead the survivors form a chain: the first sends
/// c₁·f₁, each next one adds cᵢ·fᵢ and passes the sum on, and the last hands
/// the replacement the finished fragment. Every link carries one fragment's
/// worth, and because the sum travels in slices all hops work at once, so a
/// rebuild takes about (bytes ÷ link bandwidth) instead of k times that.
///
/// The replacement asks the last hop; each hop asks the one before it over a
/// connection of its own (see ``PeerMesh/openConnection``) and streams slices
/// back as they are ready. Every slice carries a CRC, checked at each hop.
/// Any failure along the chain surfaces as an error at the replacement, which
/// then gathers k fragments the classic way.
extension ClusterNode {
    /// Slice of the running sum: small enough that the chain fills in a few
    /// milliseconds, large enough that per-frame costs vanish.
    static let repairSliceBytes: UInt32 = 1 << 20

    /// Rebuilds fragment `target` into `output` through a chain of survivors.
    /// Padding-only data slots count towards the k survivors without being
    /// asked for anything.
    func pipelinedRepair(_ target: FragmentID, sources: RepairSources, fragmentSizeBytes: UInt64, into output: UnsafeMutableRawPointer) throws {
        let k = layout.dataFragmentCount
        let chosenZero = Array(sources.zeroSlots.prefix(k))
        let chosenRemote = Array(sources.remote.prefix(k - chosenZero.count))
        guard chosenZero.count + chosenRemote.count == k else {
            throw StoreError(.unrecoverable, "stripe \(target.stripe): \(chosenZero.count + chosenRemote.count) of the \(k) fragments needed exist")
        }
        let terms = try code.repairCoefficients(survivors: FragmentSet(chosenZero + chosenRemote.map(\.index)), target: Int(target.index))
        let coefficient = Dictionary(uniqueKeysWithValues: terms.map { ($0.index, $0.coefficient) })
        let chain = chosenRemote.map { RepairHop(nodeID: $0.node, index: UInt16($0.index), coefficient: coefficient[$0.index]!) }
        let request = RepairRequest(fragment: target, fragmentSizeBytes: fragmentSizeBytes, sliceSizeBytes: Self.repairSliceBytes, chain: chain)
        guard let last = chain.last else {
            memset(output, 0, Int(fragmentSizeBytes))  // every survivor is padding, so is the target
            return
        }
        let connection = try mesh.openConnection(last.nodeID, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds)
        defer { connection.close() }
        try connection.send(.repairRequest(request), requestID: 1)
        for number in 0..<request.sliceCount {
            let slice = request.slice(number)
            try receiveRepairSlice(from: connection, offsetBytes: slice.offsetBytes, countBytes: slice.countBytes, into: output + Int(slice.offsetBytes))
        }
    }

    /// One hop: this node is `request.chain.last`. Streams, slice by slice,
    /// (the partial sum from the hops before it) + coefficient × its own fragment.
    func serveRepair(_ request: RepairRequest, requestID: UInt64, connection: FramedConnection) throws {
        let own = request.chain.last!  // the decoder refuses empty chains
        guard own.nodeID == selfID else { throw StoreError(.invalidRequest, "repair chain ends at node \(own.nodeID), not \(selfID)") }
        guard request.chain.count <= layout.dataFragmentCount else {
            throw StoreError(.invalidRequest, "a repair chain of \(request.chain.count) hops; RS(\(layout.dataFragmentCount),\(layout.parityCount)) needs at most k")
        }
        let id = FragmentID(job: request.fragment.job, step: request.fragment.step, stripe: request.fragment.stripe, index: own.index)
        let local = try localFragment(id)
        guard local.sizeBytes == request.fragmentSizeBytes else {
            throw StoreError(.invalidRequest, "fragment \(id) is \(local.sizeBytes) bytes here, the request says \(request.fragmentSizeBytes)")
        }
        let upstream = try request.chain.count > 1 ? openUpstream(request) : nil
        defer { upstream?.close() }
        let buffer = try MappedSegment.anonymous(sizeBytes: Int(request.sliceSizeBytes))
        let multiplier = GFMultiplier(coefficient: own.coefficient)
        var ownCRC: UInt32 = 0
        for number in 0..<request.sliceCount {
            let (offset, count) = request.slice(number)
            if let upstream {
                try receiveRepairSlice(from: upstream, offsetBytes: offset, countBytes: count, into: buffer.base!)
            } else {
                memset(buffer.base!, 0, count)
            }
            var written = 0
            _ = local.bytes.visit(offset: local.offsetBytes + Int(offset), count: count) { piece in
                guard let base = piece.baseAddress else { return }
                multiplier.multiplyAdd(from: base, into: buffer.base! + written, count: piece.count)
                if local.storedCRC32C != nil { ownCRC = CRC32C.checksum(UnsafeRawBufferPointer(piece), seed: ownCRC) }
                written += piece.count
            }
            // Parity is checked against its stored CRC before the last slice
            // leaves, so a corrupted holder fails the chain instead of
            // poisoning the rebuild. (Data fragments are covered by the
            // tensors' own CRCs, checked once the rebuilt shard is whole.)
            if number == request.sliceCount - 1, let stored = local.storedCRC32C, ownCRC != stored {
                counters.increment(.crcFailures)
                logger.error("parity fragment failed its CRC check while serving a repair", metadata: ["fragment": "\(id)"])
                throw StoreError(.checksumMismatch, "parity fragment \(id) on node \(selfID) fails its CRC check")
            }
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: buffer.base!, count: count))
            try connection.send(.repairSlice(RepairSlice(offsetBytes: offset, crc32c: crc)), requestID: requestID, bulkLength: UInt64(count))
            try connection.sendBulk(buffer.base!, count: count)
        }
    }

    /// Asks the previous hop for the partial sum of the rest of the chain.
    private func openUpstream(_ request: RepairRequest) throws -> FramedConnection {
        var rest = request
        rest.chain.removeLast()
        let node = rest.chain.last!.nodeID
        do {
            let connection = try mesh.openConnection(node, .data, timeoutMilliseconds: heartbeatTimeoutMilliseconds)
            do {
                try connection.send(.repairRequest(rest), requestID: 1)
            } catch {
                connection.close()
                throw error
            }
            return connection
        } catch {
            throw StoreError(.unavailable, "repair chain: node \(node) unreachable: \(error)")
        }
    }

    /// Receives the slice at `offsetBytes` into `destination` and checks its CRC.
    private func receiveRepairSlice(from connection: FramedConnection, offsetBytes: UInt64, countBytes: Int, into destination: UnsafeMutableRawPointer) throws {
        let header: FrameHeader
        let message: Message
        do {
            (header, message) = try connection.receiveReply(deadlineMilliseconds: connection.deadline())
        } catch {
            throw StoreError(.unavailable, "repair chain broke: \(error)")
        }
        if case .error(let reply) = message { throw StoreError(reply.code, reply.message) }  // already says where in the chain
        guard case .repairSlice(let slice) = message, slice.offsetBytes == offsetBytes, header.bulkLength == UInt64(countBytes) else {
            throw StoreError(.invalidRequest, "repair chain sent \(message.type) (\(header.bulkLength) bytes) where slice \(offsetBytes) of \(countBytes) bytes was due")
        }
        try connection.stream.readExact(into: destination, count: countBytes, deadlineMilliseconds: connection.deadline())
        guard CRC32C.checksum(UnsafeRawBufferPointer(start: destination, count: countBytes)) == slice.crc32c else {
            counters.increment(.crcFailures)
            throw StoreError(.checksumMismatch, "repair slice at \(offsetBytes) failed its CRC check")
        }
    }
}
