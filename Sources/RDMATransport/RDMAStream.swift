import CRDMA
import Glibc
public import SnapshotIO
import Synchronization

/// A ``ByteStream`` over one RDMA connection: the daemon's sessions, its peer
/// connections and the clients run over it unchanged, with the same frames
/// as TCP, while bulk bytes go by RDMA WRITE from the writer's memory
/// straight into the reader's (an arena segment, a restore's destination):
/// no copy through a socket buffer or a bounce buffer on either side.
///
/// Small writes (at most ``eagerMaximumBytes``: frames, small tensors) travel
/// inline in SEND messages. A larger write is *offered*; the reader answers
/// with a *grant* of the registered memory it is reading into (or, for a
/// piece smaller than ``grantMinimumBytes``, a *want* for inline bytes), the
/// writer RDMA-WRITEs into the grant and says *written*. The reader drives:
/// it grants exactly the memory of the read in progress, so the two sides
/// may cut the stream into different pieces, as with a socket.
///
/// Flow control is by credits: a side sends only while the peer has a
/// receive slot posted for it (each message costs one; each message carries
/// the slots its sender has re-posted since its last one), keeping one slot
/// back for a credit-only message, so the device never waits for a slot.
/// Inline bytes read ahead of the reader are bounded by ``inboxMaximumBytes``.
///
/// One thread uses a stream at a time (a session, a peer channel under its
/// lock, a client under its lock); ``shutdownBoth()`` may come from any.
/// Every failure is an ``IOError`` naming the RDMA operation; after one the
/// stream is disconnected and every later call fails.
public final class RDMAStream: ByteStream {
    /// Writes up to this size go inline; larger ones are offered for RDMA WRITE.
    public static let eagerMaximumBytes = 64 << 10
    /// A granted piece is at least this large: smaller pieces of an offer
    /// (a frame header read from a large write) are cheaper as inline bytes
    /// than as a registration and a WRITE.
    public static let grantMinimumBytes = 16 << 10
    /// Inline bytes received but not yet read: a peer cannot make this side buffer more.
    public static let inboxMaximumBytes = 8 << 20

    private let state: Mutex<StreamState>
    private let disconnector: RDMAConnection.Disconnector

    public init(_ connection: sending RDMAConnection) {
        disconnector = connection.disconnector
        state = Mutex(StreamState(connection: connection))
    }

    /// Connects to `host:port` from the local address `source` (nil: as
    /// routing picks), established within `timeoutMilliseconds`.
    public static func connect(
        from source: String?, to host: String, port: UInt16, timeoutMilliseconds: Int32 = RDMAConnection.establishTimeoutMilliseconds
    ) throws -> RDMAStream {
        do throws(RDMAError) {
            return RDMAStream(try RDMAConnection.connect(from: source, to: host, port: port, timeoutMilliseconds: timeoutMilliseconds))
        } catch {
            throw IOError("\(error)", errno: ECONNREFUSED)
        }
    }

    public func readExact(into buffer: UnsafeMutableRawPointer, count: Int, deadlineMilliseconds: Int64?) throws {
        guard count > 0 else { return }
        // The address crosses into the lock as an integer: a pointer is not Sendable.
        let address = UInt(bitPattern: buffer)
        try state.withLock { state throws(IOError) in
            try state.closingOnError { state throws(IOError) in try state.read(into: UnsafeMutableRawPointer(bitPattern: address)!, count: count, deadline: deadlineMilliseconds) }
        }
    }

    public func readExact(count: Int, deadlineMilliseconds: Int64?) throws -> [UInt8] {
        // Bounded by the caller (a frame's checked payload length).
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { buffer in
            if let base = buffer.baseAddress { try readExact(into: base, count: count, deadlineMilliseconds: deadlineMilliseconds) }
        }
        return bytes
    }

    public func readExact(count: Int, collecting descriptors: inout [Int32]) throws -> [UInt8] {
        try readExact(count: count, deadlineMilliseconds: nil)
    }

    public func discard(count: UInt64, deadlineMilliseconds: Int64?) throws {
        let scratchBytes = 1 << 20
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: scratchBytes, alignment: 4096)
        defer { scratch.deallocate() }
        var left = count
        while left > 0 {
            let piece = Int(min(left, UInt64(scratchBytes)))
            try readExact(into: scratch, count: piece, deadlineMilliseconds: deadlineMilliseconds)
            left -= UInt64(piece)
        }
    }

    public func writeAll(_ buffer: UnsafeRawPointer, count: Int, deadlineMilliseconds: Int64) throws {
        guard count > 0 else { return }
        let address = UInt(bitPattern: buffer)
        try state.withLock { state throws(IOError) in
            try state.closingOnError { state throws(IOError) in try state.write(UnsafeRawPointer(bitPattern: address)!, count: count, deadline: deadlineMilliseconds) }
        }
    }

    public func writeAll(_ bytes: [UInt8], passing descriptors: [Int32], deadlineMilliseconds: Int64) throws {
        guard descriptors.isEmpty else { throw IOError("passing file descriptors over RDMA (only a Unix socket can)", errno: EINVAL) }
        try bytes.withUnsafeBytes { buffer in
            if let base = buffer.baseAddress { try writeAll(base, count: buffer.count, deadlineMilliseconds: deadlineMilliseconds) }
        }
    }

    public func waitReadable(until deadlineMilliseconds: Int64) throws {
        try state.withLock { state throws(IOError) in
            try state.closingOnError { state throws(IOError) in
                while !state.readable { try state.receiveOne(deadline: deadlineMilliseconds, "wait for data") }
            }
        }
    }

    public func peerHasClosed() -> Bool {
        state.withLock { state in state.connection.peerHasLeft() }
    }

    public func shutdownBoth() { disconnector.disconnect() }

    public func close() { disconnector.disconnect() }
}

/// The stream's messages: a 40-byte header, then (data only) inline bytes.
enum StreamMessage: Equatable {
    /// Bytes of the stream, inline.
    case data(ArraySlice<UInt8>)
    /// The writer will write `count` bytes at stream position `position` and waits for grants or wants.
    case offer(position: UInt64, count: UInt64)
    /// The reader's memory for `count` bytes at `position`.
    case grant(position: UInt64, remote: RemoteBuffer)
    /// The reader asks for `count` bytes at `position` inline.
    case want(position: UInt64, count: UInt64)
    /// The writer RDMA-wrote `count` bytes at `position` into the grant.
    case written(position: UInt64, count: UInt64)
    /// Only credits.
    case credit

    static let headerBytes = 40
    static let maximumDataBytes = RDMAConnection.maximumMessageBytes - headerBytes

    var kind: UInt8 {
        switch self {
        case .data: 1
        case .offer: 2
        case .grant: 3
        case .want: 4
        case .written: 5
        case .credit: 6
        }
    }

    /// Little-endian: kind u8, 0 u8, returned credits u16, 0 u32, position u64, count u64, key u32, 0 u32, address u64.
    func encoded(returnedCredits: UInt16) -> [UInt8] {
        var position: UInt64 = 0
        var count: UInt64 = 0
        var key: UInt32 = 0
        var address: UInt64 = 0
        switch self {
        case .data(let bytes): count = UInt64(bytes.count)
        case .offer(let p, let c), .want(let p, let c), .written(let p, let c): (position, count) = (p, c)
        case .grant(let p, let remote): (position, count, key, address) = (p, remote.count, remote.key, remote.address)
        case .credit: break
        }
        var bytes = [UInt8]()
        if case .data(let payload) = self { bytes.reserveCapacity(Self.headerBytes + payload.count) }
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
        put(kind)
        put(UInt8(0))
        put(returnedCredits)
        put(UInt32(0))
        put(position)
        put(count)
        put(key)
        put(UInt32(0))
        put(address)
        if case .data(let payload) = self { bytes.append(contentsOf: payload) }
        return bytes
    }

    /// Decodes a message from the peer; anything malformed is a protocol violation.
    static func decode(_ bytes: [UInt8]) throws(RDMAError) -> (message: StreamMessage, returnedCredits: UInt16) {
        guard bytes.count >= headerBytes else { throw violation("a \(bytes.count)-byte message is shorter than its header") }
        let returned: UInt16 = littleEndian(bytes, at: 2)
        let position: UInt64 = littleEndian(bytes, at: 8)
        let count: UInt64 = littleEndian(bytes, at: 16)
        let payload = bytes.count - headerBytes
        guard bytes[0] == 1 || payload == 0 else { throw violation("a message of kind \(bytes[0]) carries \(payload) inline bytes") }
        let message: StreamMessage
        switch bytes[0] {
        case 1:
            guard count == UInt64(payload), payload > 0 else { throw violation("a data message says \(count) bytes and carries \(payload)") }
            message = .data(bytes[headerBytes...])
        case 2: message = .offer(position: position, count: count)
        case 3: message = .grant(position: position, remote: RemoteBuffer(address: littleEndian(bytes, at: 32), key: littleEndian(bytes, at: 24), count: count))
        case 4: message = .want(position: position, count: count)
        case 5: message = .written(position: position, count: count)
        case 6: message = .credit
        default: throw violation("unknown message kind \(bytes[0])")
        }
        return (message, returned)
    }

    static func violation(_ detail: String) -> RDMAError { RDMAError(kind: .protocolViolation, operation: "stream", detail: detail) }
}

/// Credits, pure: how many receive slots the peer has posted for this side,
/// and how many this side has re-posted without telling the peer.
struct StreamCredits: Equatable {
    static let slots = RDMAConnection.receiveSlots
    /// A credit-only message goes once this many slots wait to be returned.
    static let returnThreshold = slots / 2

    private(set) var available = slots
    private(set) var unreturned = 0

    /// A message other than credit-only keeps one slot back, so a credit-only
    /// message can always go: neither side can wait on the other's credits forever.
    func canSend(creditOnly: Bool) -> Bool { available >= (creditOnly ? 1 : 2) }

    /// Sends one message: it costs a slot and returns what was re-posted.
    mutating func spend() -> UInt16 {
        precondition(available >= 1, "a message sent without a posted slot at the peer")
        available -= 1
        defer { unreturned = 0 }
        return UInt16(unreturned)
    }

    /// A message arrived and its slot was re-posted; its sender returned `returned`.
    mutating func received(returned: UInt16) throws(RDMAError) {
        guard available + Int(returned) <= Self.slots else {
            throw StreamMessage.violation("the peer returned \(returned) credits with \(available) of \(Self.slots) already held")
        }
        // A peer on its credits fills at most every slot before this side answers.
        guard unreturned < Self.slots else { throw StreamMessage.violation("the peer sent beyond its \(Self.slots) credits") }
        available += Int(returned)
        unreturned += 1
    }

    var shouldReturn: Bool { unreturned >= Self.returnThreshold && canSend(creditOnly: true) }
}

/// The stream's state, owned by whichever thread holds the stream's lock.
struct StreamState {
    let connection: RDMAConnection
    var credits = StreamCredits()

    // Reading: bytes arrive in stream order, inline into the inbox or by RDMA
    // WRITE into a granted read; `readPosition` is the next byte to read.
    var inbox: [UInt8] = []
    var inboxStart = 0
    var readPosition: UInt64 = 0
    var arrivedPosition: UInt64 = 0
    /// The peer's offered write: `next` is its first byte not yet granted or wanted.
    var offer: (next: UInt64, end: UInt64)?
    var pendingGrant: (position: UInt64, count: UInt64)?

    // Writing: the peer's grants and wants for this side's open offer, in
    // order; `outgoing.next` is the first byte of it not yet asked for.
    var writePosition: UInt64 = 0
    var outgoing: (next: UInt64, end: UInt64)?
    var requests: [StreamMessage] = []

    /// Read bytes are dropped from the inbox's front once this many have piled up.
    static let inboxCompactionBytes = 1 << 20

    init(connection: RDMAConnection) { self.connection = connection }

    /// Runs `body`; on any error the connection closes: an offer or a grant
    /// may be half done, and the peer must not write into memory any more.
    mutating func closingOnError(_ body: (inout StreamState) throws(IOError) -> Void) throws(IOError) {
        do throws(IOError) {
            try body(&self)
        } catch {
            connection.close()
            throw error
        }
    }

    var inboxCount: Int { inbox.count - inboxStart }
    var readable: Bool { inboxCount > 0 || offer.map { $0.next == readPosition } == true }

    static func timeout(_ deadline: Int64?) -> Int32 { RDMAConnection.milliseconds(until: deadline) }

    static func ioError(_ error: RDMAError) -> IOError {
        let code: Int32 = switch error.kind {
        case .timeout: ETIMEDOUT
        case .connection, .completion: ECONNRESET
        case .protocolViolation: EPROTO
        case .registration, .post: EIO
        }
        return IOError("\(error)", errno: code)
    }

    // MARK: Reading

    mutating func read(into buffer: UnsafeMutableRawPointer, count: Int, deadline: Int64?) throws(IOError) {
        var done = 0
        while done < count {
            if inboxCount > 0 {
                let piece = min(inboxCount, count - done)
                inbox.withUnsafeBytes { (buffer + done).copyMemory(from: $0.baseAddress! + inboxStart, byteCount: piece) }
                inboxStart += piece
                if inboxStart == inbox.count {
                    (inbox, inboxStart) = ([], 0)
                } else if inboxStart >= Self.inboxCompactionBytes && inboxStart * 2 >= inbox.count {
                    // Pipelined small writes keep the inbox from ever draining: drop what was read.
                    inbox.removeFirst(inboxStart)
                    inboxStart = 0
                }
                readPosition += UInt64(piece)
                done += piece
            } else if let current = offer, current.next == readPosition {
                let piece = Int(min(UInt64(count - done), current.end - current.next))
                offer = (current.next + UInt64(piece), current.end)
                if piece >= RDMAStream.grantMinimumBytes {
                    try receiveGranted(into: buffer + done, count: piece, deadline: deadline)
                    done += piece
                } else {
                    try send(.want(position: readPosition, count: UInt64(piece)), deadline: deadline)
                }
            } else {
                try receiveOne(deadline: deadline, "read")
            }
        }
    }

    /// Grants `count` bytes at `destination` and waits until the writer says they are written.
    private mutating func receiveGranted(into destination: UnsafeMutableRawPointer, count: Int, deadline: Int64?) throws(IOError) {
        let memory = try registration(destination, count: count, remoteWrite: true)
        pendingGrant = (readPosition, UInt64(count))
        try send(.grant(position: readPosition, remote: memory.grant(destination, count: count)), deadline: deadline)
        // The memory stays registered until the write is in: `memory` lives to here.
        try withExtendedLifetime(memory) { () throws(IOError) in
            while pendingGrant != nil { try receiveOne(deadline: deadline, "read") }
        }
        readPosition += UInt64(count)
    }

    // MARK: Writing

    mutating func write(_ buffer: UnsafeRawPointer, count: Int, deadline: Int64) throws(IOError) {
        guard count > 0 else { return }
        if count <= RDMAStream.eagerMaximumBytes {
            try sendInline(buffer, count: count, deadline: deadline)
            return
        }
        try send(.offer(position: writePosition, count: UInt64(count)), deadline: deadline)
        outgoing = (writePosition, writePosition + UInt64(count))
        defer { outgoing = nil }
        var done = 0
        while done < count {
            guard !requests.isEmpty else {
                try receiveOne(deadline: deadline, "write")
                continue
            }
            switch requests.removeFirst() {
            case .grant(let position, let remote) where position == writePosition && remote.count <= UInt64(count - done):
                let piece = Int(remote.count)
                let memory = try registration(UnsafeMutableRawPointer(mutating: buffer + done), count: piece, remoteWrite: false)
                do throws(RDMAError) {
                    try connection.write(buffer + done, count: piece, in: memory, to: remote, remoteOffset: 0, timeoutMilliseconds: Self.timeout(deadline))
                } catch {
                    throw Self.ioError(error)
                }
                try send(.written(position: position, count: remote.count), deadline: deadline)
                writePosition += remote.count
                done += piece
            case .want(let position, let wanted) where position == writePosition && wanted <= UInt64(count - done):
                let piece = Int(wanted)
                try sendInline(buffer + done, count: piece, deadline: deadline)
                done += piece
            case let request:
                throw fail("the peer asked for \(request) while this side writes \(count - done) more bytes at \(writePosition)")
            }
        }
    }

    private mutating func sendInline(_ buffer: UnsafeRawPointer, count: Int, deadline: Int64) throws(IOError) {
        var done = 0
        while done < count {
            let piece = min(count - done, StreamMessage.maximumDataBytes)
            let bytes = ArraySlice(UnsafeRawBufferPointer(start: buffer + done, count: piece))
            try send(.data(bytes), deadline: deadline)
            done += piece
        }
        writePosition += UInt64(count)
    }

    // MARK: Messages

    /// Sends `message` once the peer has a slot for it (receiving meanwhile).
    private mutating func send(_ message: StreamMessage, deadline: Int64?) throws(IOError) {
        let creditOnly = message == .credit
        while !credits.canSend(creditOnly: creditOnly) { try receiveOne(deadline: deadline, "wait for credits") }
        let bytes = message.encoded(returnedCredits: credits.spend())
        do throws(RDMAError) {
            // A send completes once the peer's device has it: bounded even without a caller's deadline.
            try connection.send(bytes, timeoutMilliseconds: deadline == nil ? 60_000 : Self.timeout(deadline))
        } catch {
            throw Self.ioError(error)
        }
    }

    /// Receives and applies one message.
    mutating func receiveOne(deadline: Int64?, _ operation: String) throws(IOError) {
        if let deadline, deadline <= monotonicMilliseconds() { throw IOError.timedOut("RDMA \(operation)") }
        let bytes: [UInt8]
        let decoded: (message: StreamMessage, returnedCredits: UInt16)
        do throws(RDMAError) {
            bytes = try connection.receive(timeoutMilliseconds: Self.timeout(deadline))
            decoded = try StreamMessage.decode(bytes)
            try credits.received(returned: decoded.returnedCredits)
        } catch {
            if error.kind == .protocolViolation { connection.close() }
            throw Self.ioError(error)
        }
        try apply(decoded.message)
        if credits.shouldReturn { try send(.credit, deadline: deadline) }
    }

    private mutating func apply(_ message: StreamMessage) throws(IOError) {
        switch message {
        case .data(let bytes):
            // Inline bytes come only outside an offer or for a want inside it.
            let limit = offer?.next ?? UInt64.max
            guard arrivedPosition + UInt64(bytes.count) <= limit, pendingGrant == nil else {
                throw fail("\(bytes.count) inline bytes at \(arrivedPosition) that were neither sent freely nor wanted")
            }
            guard inboxCount + bytes.count <= RDMAStream.inboxMaximumBytes else {
                throw fail("the peer sent more than \(RDMAStream.inboxMaximumBytes) bytes ahead of this side's reads")
            }
            inbox.append(contentsOf: bytes)
            arrivedPosition += UInt64(bytes.count)
            closeOfferIfDone()
        case .offer(let position, let count):
            guard offer == nil, position == arrivedPosition, count > 0, count <= UInt64.max - position else {
                throw fail("an offer of \(count) bytes at \(position) with \(arrivedPosition) arrived\(offer == nil ? "" : " and an offer open")")
            }
            offer = (position, position + count)
        case .written(let position, let count):
            guard let grant = pendingGrant, grant.position == position, grant.count == count, position == arrivedPosition else {
                throw fail("written \(count) bytes at \(position), which were not granted")
            }
            pendingGrant = nil
            arrivedPosition += count
            closeOfferIfDone()
        case .grant(let position, let remote):
            try acceptRequest(message, position: position, count: remote.count)
        case .want(let position, let count):
            try acceptRequest(message, position: position, count: count)
        case .credit:
            break
        }
    }

    /// A grant or a want is for this side's open offer, in order, and within it.
    private mutating func acceptRequest(_ message: StreamMessage, position: UInt64, count: UInt64) throws(IOError) {
        guard let open = outgoing, position == open.next, count > 0, count <= open.end - open.next else {
            throw fail("\(message) outside this side's offer \(outgoing.map { "\($0.next)..<\($0.end)" } ?? "(none)")")
        }
        outgoing = (open.next + count, open.end)
        requests.append(message)
    }

    private mutating func closeOfferIfDone() {
        if let current = offer, arrivedPosition == current.end { offer = nil }
    }

    /// A protocol violation by the peer: the stream is closed.
    private func fail(_ detail: String) -> IOError {
        connection.close()
        return Self.ioError(StreamMessage.violation(detail))
    }

    /// Registered memory holding `count` bytes at `address`: the whole
    /// mapping when it is a mapped segment (registered once for this
    /// connection and use, and reused until either goes: ``MappedMemory``),
    /// else, or when that fails, this one transfer's range. A mapping is
    /// remote-writable only once it has been granted: one only ever written
    /// from (a restore's source) never is.
    private func registration(_ address: UnsafeMutableRawPointer, count: Int, remoteWrite: Bool) throws(IOError) -> RegisteredMemory {
        let connection = connection
        let key = connection.protectionDomainKey | (remoteWrite ? 1 : 0)  // domains are aligned: the low bit is free
        let cached = try? MappedMemory.shared.attachment(containing: address, count: count, key: key) { base, size, writable in
            guard writable || !remoteWrite else { throw IOError("a read-only mapping cannot be granted", errno: EACCES) }
            return try connection.register(base, count: size, remoteWrite: remoteWrite)
        }
        if let cached = cached ?? nil { return cached }
        do throws(RDMAError) {
            return try connection.register(address, count: count, remoteWrite: remoteWrite)
        } catch {
            throw Self.ioError(error)
        }
    }
}
