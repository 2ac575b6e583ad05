import ErasureCoding
import Foundation
import Glibc
import SnapshotIO
public import SnapshotProtocol
import Synchronization

/// Where the daemon is.
public enum Endpoint: Sendable {
    /// Where a node's daemon listens unless configured otherwise (`unix_socket`).
    public static let defaultUnixSocketPath = "/run/snapshotd/snapshotd.sock"

    /// Local daemon: tensors go through shared memory, zero copy.
    case unix(path: String)
    /// Remote daemon: tensors stream over TCP; the shared secret authenticates.
    case tcp(host: String, port: UInt16, secret: [UInt8])
    /// Remote daemon over RDMA (its `transport` is `rdma` or `auto`, on the
    /// same address and port as TCP): the same frames and secret, with
    /// tensors RDMA-written between this process's memory and the daemon's
    /// arena. `source`: the local address to connect from (nil: as routing picks).
    case rdma(host: String, port: UInt16, secret: [UInt8], source: String? = nil)
}

/// An error from the daemon (with its code) or from the connection.
public struct SnapshotClientError: Error, Equatable, CustomStringConvertible {
    public let code: ErrorCode?
    public let message: String

    public init(code: ErrorCode?, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { code.map { "\($0): \(message)" } ?? message }
}

/// One tensor to save: its description and where its bytes are (host memory
/// the caller keeps valid for the duration of the call).
public struct TensorData: @unchecked Sendable {  // a read-only view: the client only reads the caller's bytes, kept valid and unchanged for the call
    public var spec: TensorSpec
    public var bytes: UnsafeRawBufferPointer

    public init(spec: TensorSpec, bytes: UnsafeRawBufferPointer) {
        precondition(UInt64(bytes.count) == spec.byteLength, "tensor '\(spec.name)': \(bytes.count) bytes for a \(spec.byteLength)-byte spec")
        self.spec = spec
        self.bytes = bytes
    }
}

/// A trainer rank's connection to its snapshot daemon. Calls are serialized;
/// one client per rank.
public final class SnapshotClient: Sendable {
    public let job: JobID
    public let rank: Rank
    public let world: UInt32
    public let endpoint: Endpoint
    public let daemonNodeID: NodeID

    let channel: DaemonChannel
    var connection: FramedConnection { channel.connection }
    /// Segments this client has mapped, by file identity, newest use last:
    /// when the daemon hands back a pooled segment this client used before,
    /// the mapping (and its page tables) is reused, so steady-state saves are
    /// a plain memcpy.
    private let mappings = Mutex<[(identity: FileIdentity, segment: MappedSegment)]>([])
    static let mappingCacheLimit = 4

    public var usesSharedMemory: Bool { channel.usesSharedMemory }

    /// How long a reply may take to start unless the caller says otherwise.
    public static let defaultReplyTimeoutMilliseconds = DaemonChannel.defaultReplyTimeoutMilliseconds

    /// - Parameters:
    ///   - localWorld: ranks of the job using this daemon (torchrun's
    ///     LOCAL_WORLD_SIZE); 0 when all `world` ranks are on one node.
    ///   - replyTimeoutMilliseconds: how long any reply may take to start
    ///     (``waitCommitted(step:timeoutMilliseconds:)`` adds its own wait)
    ///     before the call fails with ``ErrorCode/timeout`` and the connection closes.
    public init(
        endpoint: Endpoint, job: JobID, rank: Rank, world: UInt32, localWorld: UInt32 = 0, topology: Topology = Topology(),
        replyTimeoutMilliseconds: Int64 = SnapshotClient.defaultReplyTimeoutMilliseconds
    ) throws {
        self.job = job
        self.rank = rank
        self.world = world
        self.endpoint = endpoint
        let channel = try DaemonChannel(endpoint: endpoint, replyTimeoutMilliseconds: replyTimeoutMilliseconds)
        self.channel = channel
        let welcome = try channel.call(.hello(Hello(role: .trainer, job: job, rank: rank, world: world, topology: topology, localWorld: localWorld)))
        guard case .welcome(let w) = welcome else { throw unexpected(welcome) }
        daemonNodeID = w.nodeID
    }

    // MARK: Saving

    /// Saves this rank's shard of `step`. Returns once the bytes are in the
    /// daemon's memory; checksums and protection continue in the background.
    /// Use ``waitCommitted(step:timeoutMilliseconds:)`` for the job-wide commit.
    public func save(
        step: Step, tensors: [TensorData], gradientNorm: Double? = nil, metadata: [UInt8] = [], sendChecksums: Bool = false
    ) throws {
        let pending = try beginSave(step: step, specs: tensors.map(\.spec))
        for (index, tensor) in tensors.enumerated() { try pending.write(tensorIndex: index, from: tensor.bytes) }
        // Over TCP the checksums computed while streaming go with the commit
        // anyway (``PendingSave/commit(gradientNorm:metadata:checksums:)``);
        // `sendChecksums` also covers shared memory, at the cost of a pass over the data.
        let checksums = sendChecksums && pending.segment != nil ? tensors.map { CRC32C.checksum($0.bytes) } : nil
        try pending.commit(gradientNorm: gradientNorm, metadata: metadata, checksums: checksums)
    }

    /// Starts a save; write each tensor (or fill ``PendingSave/destination(tensorIndex:)``
    /// directly, e.g. with a device-to-host copy), then commit.
    public func beginSave(step: Step, specs: [TensorSpec]) throws -> PendingSave {
        try channel.serialized { turn in
            var descriptors: [Int32] = []
            let transport: DataTransport = usesSharedMemory ? .sharedMemory : .stream
            let reply = try channel.call(.beginSave(BeginSave(step: step, transport: transport, tensors: specs)), in: &turn, collecting: &descriptors)
            guard case .saveReady(let ready) = reply, ready.tensorOffsets.count == specs.count else {
                descriptors.forEach { _ = close($0) }
                throw unexpected(reply)
            }
            var segment: MappedSegment?
            if usesSharedMemory {
                guard descriptors.count == 1 else {
                    descriptors.forEach { _ = close($0) }
                    throw SnapshotClientError(code: nil, message: "daemon sent \(descriptors.count) descriptors for the save segment, expected 1")
                }
                segment = try mapping(for: descriptors[0], sizeBytes: Int(ready.segmentSizeBytes))
            }
            return PendingSave(client: self, step: step, specs: specs, offsets: ready.tensorOffsets, segment: segment)
        }
    }

    private func mapping(for fd: Int32, sizeBytes: Int) throws -> MappedSegment {
        let identity = FileIdentity(fd: fd)
        let cached = identity.flatMap { identity in
            mappings.withLock { mappings -> MappedSegment? in
                guard let index = mappings.firstIndex(where: { $0.identity == identity && $0.segment.sizeBytes == sizeBytes }) else { return nil }
                let entry = mappings.remove(at: index)
                mappings.append(entry)
                return entry.segment
            }
        }
        if let cached {
            close(fd)
            return cached
        }
        let segment = try MappedSegment(fd: fd, sizeBytes: sizeBytes, writable: true, populate: true)
        if let identity {
            mappings.withLock { mappings in
                mappings.append((identity, segment))
                if mappings.count > Self.mappingCacheLimit { mappings.removeFirst() }
            }
        }
        return segment
    }

    func put(step: Step, tensorIndex: Int, offsetBytes: UInt64, bytes: UnsafeRawBufferPointer) throws {
        try channel.serialized { turn in
            let message = PutTensor(step: step, tensorIndex: UInt32(tensorIndex), offsetBytes: offsetBytes)
            // No reply unless refused: a refusal is read with the next call's reply.
            try channel.send(.putTensor(message), in: &turn, bulkLength: UInt64(bytes.count))
            do {
                if let base = bytes.baseAddress { try connection.sendBulk(base, count: bytes.count) }
            } catch {
                connection.close()
                throw SnapshotClientError(code: nil, message: "connection to snapshotd lost while sending tensor \(tensorIndex): \(error)")
            }
        }
    }

    func commit(step: Step, checksums: [UInt32]?, gradientNorm: Double?, metadata: [UInt8]) throws {
        let reply = try call(.commitSave(CommitSave(step: step, checksums: checksums, gradientNorm: gradientNorm, metadata: metadata)))
        guard case .saveAccepted = reply else { throw unexpected(reply) }
    }

    public func abortSave(step: Step) throws {
        let reply = try call(.abortSave(StepRequest(step: step)))
        guard case .ok = reply else { throw unexpected(reply) }
    }

    // MARK: Commit state

    public func latestCommittedStep() throws -> Step? {
        let reply = try call(.latestCommitted)
        guard case .latestCommittedReply(let r) = reply else { throw unexpected(reply) }
        return r.step
    }

    /// Blocks until `step` (or a newer one) is committed for the whole job.
    @discardableResult
    public func waitCommitted(step: Step, timeoutMilliseconds: UInt32 = 60_000) throws -> Step {
        let reply = try channel.serialized { turn in
            var descriptors: [Int32] = []
            // The daemon answers at its timeout at the latest; allow it the usual reply time beyond.
            return try channel.call(
                .waitCommitted(WaitCommitted(step: step, timeoutMilliseconds: timeoutMilliseconds)), in: &turn, collecting: &descriptors,
                timeoutMilliseconds: Int64(timeoutMilliseconds) + channel.replyTimeoutMilliseconds)
        }
        guard case .latestCommittedReply(let r) = reply, let committed = r.step else { throw unexpected(reply) }
        return committed
    }

    public func status() throws -> StatusReply {
        let reply = try call(.status(StatusRequest(job: job)))
        guard case .statusReply(let r) = reply else { throw unexpected(reply) }
        return r
    }

    // MARK: Restoring

    /// Restores this rank's shard of the newest committed step (or `step`).
    /// Locally the tensors are read-only views of the daemon's memory (zero
    /// copy); remotely they arrive over TCP and are checked against their CRCs.
    public func restore(step: Step? = nil) throws -> RestoredShard {
        try channel.serialized { turn in
            var descriptors: [Int32] = []
            let transport: DataTransport = usesSharedMemory ? .sharedMemory : .stream
            let requestID = try channel.send(.restore(Restore(step: step, transport: transport)), in: &turn)
            let (header, reply) = try channel.receiveReply(to: requestID, in: &turn, collecting: &descriptors)
            guard case .restoreReady(let ready) = reply else {
                descriptors.forEach { _ = close($0) }
                throw unexpected(reply)
            }
            if usesSharedMemory {
                guard descriptors.count == 1 else {
                    descriptors.forEach { _ = close($0) }
                    throw SnapshotClientError(code: nil, message: "daemon sent \(descriptors.count) descriptors for the restore, expected 1")
                }
                let segment = try MappedSegment(fd: descriptors[0], sizeBytes: Int(ready.segmentSizeBytes), writable: false)
                try RestoredShard.validate(ready)
                return RestoredShard(client: self, ready: ready, segment: segment, owned: nil)
            }
            let expected = ready.entries.reduce(UInt64(0)) { $0 + $1.spec.byteLength }
            guard header.bulkLength == expected else {
                throw SnapshotClientError(code: nil, message: "restore carries \(header.bulkLength) bytes, manifest says \(expected)")
            }
            let owned = try MappedSegment.anonymous(sizeBytes: Int(expected))
            try receiveVerified(ready.entries, into: owned, in: &turn)
            return RestoredShard(client: self, ready: ready, segment: nil, owned: owned)
        }
    }

    /// Streams the tensors into `buffer`, checking each chunk's CRC while it is
    /// still in cache (one pass over memory instead of two).
    private func receiveVerified(_ entries: [ManifestEntry], into buffer: MappedSegment, in turn: inout DaemonChannel.Turn) throws {
        let chunkBytes = 4 << 20
        var cursor = 0
        for entry in entries {
            var crc: UInt32 = 0
            let end = cursor + Int(entry.spec.byteLength)
            while cursor < end {
                let count = min(chunkBytes, end - cursor)
                let chunk = buffer.bytes(offset: cursor, count: count)
                try connection.stream.readExact(into: chunk.baseAddress!, count: count, deadlineMilliseconds: connection.deadline())
                crc = CRC32C.checksum(UnsafeRawBufferPointer(chunk), seed: crc)
                cursor += count
            }
            guard crc == entry.crc32c else {
                throw SnapshotClientError(code: .checksumMismatch, message: "tensor '\(entry.spec.name)' arrived corrupted (CRC mismatch)")
            }
        }
    }

    func releaseRestore(step: Step) {
        _ = try? call(.releaseRestore(StepRequest(step: step)))
    }

    // MARK: Plumbing

    func call(_ message: Message) throws -> Message { try channel.call(message) }
}
