import CRDMA
import Glibc
import SnapshotIO

/// A verbs or rdma_cm failure, typed: what failed and why, in words an
/// operator can act on (errno text, or the work completion's status).
public struct RDMAError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// Address or route resolution, listening, connecting or accepting.
        case connection
        /// Registering memory with the device.
        case registration
        /// Posting a work request.
        case post
        /// A work request completed with an error status (e.g. the peer left).
        case completion
        /// No completion within the deadline.
        case timeout
        /// A message larger than a receive slot, or a grant that does not fit.
        case protocolViolation
    }

    public let kind: Kind
    public let operation: String
    public let detail: String

    public var description: String { "RDMA \(operation) failed: \(detail)" }

    static func errno(_ kind: Kind, _ operation: String) -> RDMAError {
        RDMAError(kind: kind, operation: operation, detail: String(cString: strerror(Glibc.errno)))
    }
}

/// Memory registered in a connection's protection domain (`ibv_reg_mr`):
/// a mapped segment registered once and reused (``MappedMemory``), or one
/// transfer's buffer. Immutable; deregistered when released, which happens
/// before its pages are unmapped and before its connection's domain goes.
public final class RegisteredMemory: @unchecked Sendable {  // immutable; ibv_dereg_mr is thread-safe
    let region: UnsafeMutablePointer<ibv_mr>
    public let base: UnsafeMutableRawPointer
    public let count: Int
    /// Kept alive by the region: a domain cannot go while memory is registered in it.
    let domain: ProtectionDomain

    init(region: UnsafeMutablePointer<ibv_mr>, base: UnsafeMutableRawPointer, count: Int, domain: ProtectionDomain) {
        self.region = region
        self.base = base
        self.count = count
        self.domain = domain
    }

    /// What a peer needs to RDMA-WRITE `count` bytes at `address` (inside this memory).
    public func grant(_ address: UnsafeMutableRawPointer, count: Int) -> RemoteBuffer {
        RemoteBuffer(address: UInt64(UInt(bitPattern: address)), key: region.pointee.rkey, count: UInt64(count))
    }

    deinit { ibv_dereg_mr(region) }
}

/// A protection domain (`ibv_alloc_pd`): one per connection, deallocated
/// when the connection and every region registered in it are gone.
final class ProtectionDomain: @unchecked Sendable {  // immutable
    let pointer: UnsafeMutablePointer<ibv_pd>

    init(_ pointer: UnsafeMutablePointer<ibv_pd>) { self.pointer = pointer }

    deinit { ibv_dealloc_pd(pointer) }
}

/// A peer's registered memory, as its grant message says.
public struct RemoteBuffer: Equatable, Sendable {
    public var address: UInt64
    public var key: UInt32
    public var count: UInt64

    public init(address: UInt64, key: UInt32, count: UInt64) {
        self.address = address
        self.key = key
        self.count = count
    }

    /// 20 bytes, little-endian: what travels in a grant message.
    public var encoded: [UInt8] {
        withUnsafeBytes(of: address.littleEndian) { Array($0) } + withUnsafeBytes(of: key.littleEndian) { Array($0) }
            + withUnsafeBytes(of: count.littleEndian) { Array($0) }
    }

    public init(decoding bytes: [UInt8]) throws(RDMAError) {
        guard bytes.count == 20 else { throw RDMAError(kind: .protocolViolation, operation: "grant", detail: "a grant is 20 bytes, got \(bytes.count)") }
        self.init(address: littleEndian(bytes, at: 0), key: littleEndian(bytes, at: 8), count: littleEndian(bytes, at: 12))
    }
}

/// The `T` stored little-endian at `offset` of `bytes` (the caller checked the length).
func littleEndian<T: FixedWidthInteger>(_ bytes: [UInt8], at offset: Int) -> T {
    bytes[offset..<offset + MemoryLayout<T>.size].reversed().reduce(T(0)) { $0 << 8 | T($1) }
}

/// One reliable-connected queue pair set up with rdma_cm: control messages
/// (the same frames as TCP) with SEND/RECV into pre-posted receive slots,
/// payloads with RDMA WRITE straight between registered memories. Owned by
/// one thread at a time (not Sendable). At most ``receiveSlots`` messages
/// may be in flight towards it: that many receives stay posted, and a
/// sender beyond them waits in the device (RNR retry) instead of failing
/// (``RDMAStream`` never lets it come to that: it sends on credits).
///
/// Each connection has a protection domain of its own: a key it grants is
/// valid on its queue pair only, so no other connection (an unauthenticated
/// one included) can reach memory registered for it, and its registrations
/// go with it.
public final class RDMAConnection {
    public static let receiveSlots = 16
    public static let maximumMessageBytes = 64 << 10
    /// One RDMA WRITE at most: a scatter entry's length is 32 bits, and Soft-RoCE takes 2 GiB.
    public static let maximumWriteBytes = 1 << 30

    let id: UnsafeMutablePointer<rdma_cm_id>
    private let protectionDomain: ProtectionDomain
    private let slots: UnsafeMutableRawPointer
    private let slotRegion: UnsafeMutablePointer<ibv_mr>
    private let sendBuffer: UnsafeMutableRawPointer
    private let sendRegion: UnsafeMutablePointer<ibv_mr>
    /// Written by ``Disconnector/disconnect()``: ends a handshake in progress,
    /// which a disconnect of a connection not yet established does not (no
    /// rdma_cm event comes of it).
    private let disconnectSignal: Int32
    /// The event channel `beginEstablishing` moved the id to: destroyed after the id.
    private var ownedChannel: UnsafeMutablePointer<rdma_event_channel>?
    /// Set while the connection is being established: what, and by when.
    private var establishing: (operation: String, deadline: Int64, timeoutMilliseconds: Int32)?
    /// Set by close() or by the first failed or timed-out work request: the
    /// queue pair is then disconnected (in error, its work flushed) and
    /// every later call is refused, so no stale completion is mistaken for a new one.
    private var failure: RDMAError?

    /// How many RDMA devices the verbs library lists.
    public static var deviceCount: Int {
        var count: Int32 = 0
        guard let devices = ibv_get_device_list(&count) else { return 0 }
        ibv_free_device_list(devices)
        return Int(count)
    }

    /// How long connecting or accepting may take once addresses are resolved:
    /// the CM's own retries would wait for an unanswering peer for minutes.
    public static let establishTimeoutMilliseconds: Int32 = 10_000

    /// Resolves `to` (from the local address `from`, else as routing picks;
    /// rdma_cm bounds each resolution by 2 s) and connects within `timeoutMilliseconds`.
    public static func connect(from: String?, to: String, port: UInt16, timeoutMilliseconds: Int32 = establishTimeoutMilliseconds) throws(RDMAError) -> RDMAConnection {
        var hints = rdma_addrinfo()
        hints.ai_port_space = Int32(RDMA_PS_TCP.rawValue)
        var source: UnsafeMutablePointer<addrinfo>?
        if let from {
            guard getaddrinfo(from, nil, nil, &source) == 0, let source else {
                throw RDMAError(kind: .connection, operation: "resolve \(from)", detail: "not an address of this machine")
            }
            hints.ai_src_addr = source.pointee.ai_addr
            hints.ai_src_len = source.pointee.ai_addrlen
        }
        defer { if let source { freeaddrinfo(source) } }
        var info: UnsafeMutablePointer<rdma_addrinfo>?
        guard rdma_getaddrinfo(to, String(port), &hints, &info) == 0, let info else { throw .errno(.connection, "resolve \(to):\(port) from \(from ?? "any local address")") }
        defer { rdma_freeaddrinfo(info) }
        var id: UnsafeMutablePointer<rdma_cm_id>?
        guard rdma_create_ep(&id, info, nil, nil) == 0, let id else { throw .errno(.connection, "create endpoint to \(to):\(port)") }
        let connection = try adopt(id)
        try connection.beginEstablishing("connect to \(to):\(port)", timeoutMilliseconds: timeoutMilliseconds) { id in
            var parameters = connectionParameters()
            return rdma_connect(id, &parameters)
        }
        try connection.awaitEstablished()
        return connection
    }

    /// Moves the id to an event channel of its own, in asynchronous mode, so
    /// `start` (rdma_connect or rdma_accept) returns at once; the connection
    /// is then established by ``awaitEstablished()`` (explicitly, or by the
    /// first operation), within `timeoutMilliseconds` of now. Later rdma_cm
    /// events (a disconnect) arrive on the same channel.
    func beginEstablishing(_ operation: String, timeoutMilliseconds: Int32, _ start: (UnsafeMutablePointer<rdma_cm_id>) -> Int32) throws(RDMAError) {
        guard let channel = rdma_create_event_channel() else { throw fail(.errno(.connection, "create an event channel to \(operation)")) }
        guard rdma_migrate_id(id, channel) == 0 else {
            let error = RDMAError.errno(.connection, "move the connection to its event channel to \(operation)")
            rdma_destroy_event_channel(channel)
            throw fail(error)
        }
        ownedChannel = channel
        guard start(id) == 0 else { throw fail(.errno(.connection, operation)) }
        establishing = (operation, monotonicMilliseconds() + Int64(timeoutMilliseconds), timeoutMilliseconds)
    }

    /// Waits until the connection is established (at once when it is), or
    /// fails it: refused, unreachable, or no answer by the deadline.
    public func awaitEstablished() throws(RDMAError) {
        guard let (operation, deadline, timeoutMilliseconds) = establishing, let channel = ownedChannel else { return }
        while true {
            switch snapshotd_rdma_wait_either(channel.pointee.fd, disconnectSignal, Self.milliseconds(until: deadline)) {
            case 0: throw fail(RDMAError(kind: .timeout, operation: operation, detail: "no answer within \(timeoutMilliseconds) ms"))
            case 1: break
            case 2: throw fail(RDMAError(kind: .connection, operation: operation, detail: "disconnected by this side during the handshake"))
            default: throw fail(.errno(.connection, operation))
            }
            var event: UnsafeMutablePointer<rdma_cm_event>?
            guard rdma_get_cm_event(channel, &event) == 0, let event else { throw fail(.errno(.connection, operation)) }
            let (kind, status) = (event.pointee.event, event.pointee.status)
            rdma_ack_cm_event(event)
            switch kind {
            case RDMA_CM_EVENT_ESTABLISHED:
                establishing = nil
                return
            case RDMA_CM_EVENT_REJECTED, RDMA_CM_EVENT_UNREACHABLE, RDMA_CM_EVENT_CONNECT_ERROR, RDMA_CM_EVENT_DISCONNECTED, RDMA_CM_EVENT_DEVICE_REMOVAL:
                let reason = kind == RDMA_CM_EVENT_REJECTED ? "refused (nothing listens there over RDMA?)" : "failed"
                throw fail(RDMAError(kind: .connection, operation: operation, detail: "\(reason): \(String(cString: rdma_event_str(kind))), status \(status)"))
            default: continue
            }
        }
    }

    /// Takes ownership of `id` (destroyed on every path: here on a failure,
    /// else by the connection), gives it a protection domain and a queue
    /// pair of its own, and posts its receive slots.
    static func adopt(_ id: UnsafeMutablePointer<rdma_cm_id>) throws(RDMAError) -> RDMAConnection {
        guard let device = id.pointee.verbs, let pointer = ibv_alloc_pd(device) else {
            let error = RDMAError.errno(.registration, "allocate a protection domain")
            rdma_destroy_ep(id)
            throw error
        }
        let protectionDomain = ProtectionDomain(pointer)  // deallocated after the id on every path
        var attributes = queuePairAttributes()
        guard rdma_create_qp(id, pointer, &attributes) == 0 else {
            let error = RDMAError.errno(.connection, "create a queue pair")
            rdma_destroy_ep(id)
            throw error
        }
        let slotBytes = receiveSlots * maximumMessageBytes
        let slots = UnsafeMutableRawPointer.allocate(byteCount: slotBytes, alignment: 4096)
        let sendBuffer = UnsafeMutableRawPointer.allocate(byteCount: maximumMessageBytes, alignment: 4096)
        let slotRegion = rdma_reg_msgs(id, slots, slotBytes)
        let sendRegion = rdma_reg_msgs(id, sendBuffer, maximumMessageBytes)
        guard let slotRegion, let sendRegion else {
            let error = RDMAError.errno(.registration, "register the message buffers")
            if let slotRegion { rdma_dereg_mr(slotRegion) }
            if let sendRegion { rdma_dereg_mr(sendRegion) }
            rdma_destroy_ep(id)  // and its queue pair
            slots.deallocate()
            sendBuffer.deallocate()
            throw error
        }
        let connection = RDMAConnection(
            id: id, protectionDomain: protectionDomain, slots: slots, slotRegion: slotRegion, sendBuffer: sendBuffer, sendRegion: sendRegion)
        for slot in 0..<receiveSlots { try connection.postReceive(slot) }  // on failure the connection's deinit cleans up
        return connection
    }

    private init(
        id: UnsafeMutablePointer<rdma_cm_id>, protectionDomain: ProtectionDomain, slots: UnsafeMutableRawPointer,
        slotRegion: UnsafeMutablePointer<ibv_mr>, sendBuffer: UnsafeMutableRawPointer, sendRegion: UnsafeMutablePointer<ibv_mr>
    ) {
        self.id = id
        self.protectionDomain = protectionDomain
        disconnectSignal = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        self.slots = slots
        self.slotRegion = slotRegion
        self.sendBuffer = sendBuffer
        self.sendRegion = sendRegion
    }

    static func queuePairAttributes() -> ibv_qp_init_attr {
        var attributes = ibv_qp_init_attr()
        attributes.cap.max_send_wr = UInt32(receiveSlots)
        attributes.cap.max_recv_wr = UInt32(receiveSlots)
        attributes.cap.max_send_sge = 1
        attributes.cap.max_recv_sge = 1
        attributes.sq_sig_all = 1
        attributes.qp_type = IBV_QPT_RC
        return attributes
    }

    static func connectionParameters() -> rdma_conn_param {
        var parameters = rdma_conn_param()
        parameters.responder_resources = 1
        parameters.initiator_depth = 1
        parameters.retry_count = 7
        parameters.rnr_retry_count = 7  // 7: wait for a receive slot however long
        return parameters
    }

    private func usable(_ operation: String) throws(RDMAError) {
        if let failure { throw RDMAError(kind: failure.kind, operation: operation, detail: "the connection already failed (\(failure))") }
        try awaitEstablished()
    }

    private func postReceive(_ slot: Int) throws(RDMAError) {
        let address = slots + slot * Self.maximumMessageBytes
        guard rdma_post_recv(id, UnsafeMutableRawPointer(bitPattern: slot + 1), address, Self.maximumMessageBytes, slotRegion) == 0 else {
            throw fail(.errno(.post, "post receive"))
        }
    }

    /// Sends one message (a frame) and waits until the device has delivered it.
    public func send(_ message: [UInt8], timeoutMilliseconds: Int32) throws(RDMAError) {
        try usable("send")
        guard message.count <= Self.maximumMessageBytes else {
            throw RDMAError(kind: .protocolViolation, operation: "send", detail: "\(message.count) bytes exceed a receive slot (\(Self.maximumMessageBytes))")
        }
        message.withUnsafeBytes { sendBuffer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        guard rdma_post_send(id, nil, sendBuffer, message.count, sendRegion, 0) == 0 else { throw fail(.errno(.post, "post send")) }
        _ = try waitCompletion(send: true, "send", timeoutMilliseconds: timeoutMilliseconds)
    }

    /// The next message the peer sent.
    public func receive(timeoutMilliseconds: Int32) throws(RDMAError) -> [UInt8] {
        try usable("receive")
        let completion = try waitCompletion(send: false, "receive", timeoutMilliseconds: timeoutMilliseconds)
        let slot = Int(completion.wr_id) - 1
        guard (0..<Self.receiveSlots).contains(slot), Int(completion.byte_len) <= Self.maximumMessageBytes else {
            throw fail(RDMAError(kind: .protocolViolation, operation: "receive", detail: "completion for slot \(slot) with \(completion.byte_len) bytes"))
        }
        let message = [UInt8](UnsafeRawBufferPointer(start: slots + slot * Self.maximumMessageBytes, count: Int(completion.byte_len)))
        try postReceive(slot)
        return message
    }

    /// RDMA-WRITEs `count` bytes at `offset` of `local` into `remote` at
    /// `remoteOffset`, in pieces of at most ``maximumWriteBytes``, and waits
    /// for each to complete. Ranges come from peers: checked without overflow.
    private func write(
        region: UnsafeMutablePointer<ibv_mr>, base: UnsafeMutableRawPointer, regionCount: Int, offset: Int, count: Int, to remote: RemoteBuffer, remoteOffset: UInt64,
        timeoutMilliseconds: Int32
    ) throws(RDMAError) {
        try usable("write")
        let (localEnd, localOverflow) = offset.addingReportingOverflow(count)
        let (remoteEnd, remoteOverflow) = remoteOffset.addingReportingOverflow(UInt64(clamping: count))
        let (_, addressOverflow) = remote.address.addingReportingOverflow(remoteEnd)
        guard offset >= 0, count >= 0, !localOverflow, localEnd <= regionCount, !remoteOverflow, remoteEnd <= remote.count, !addressOverflow else {
            throw fail(RDMAError(kind: .protocolViolation, operation: "write", detail: "\(count) bytes at \(offset) → \(remoteOffset) exceed a region"))
        }
        var done = 0
        while done < count {
            let piece = min(Self.maximumWriteBytes, count - done)
            guard rdma_post_write(id, nil, base + offset + done, piece, region, 0, remote.address + remoteOffset + UInt64(done), remote.key) == 0 else {
                throw fail(.errno(.post, "post write"))
            }
            _ = try waitCompletion(send: true, "write", timeoutMilliseconds: timeoutMilliseconds)
            done += piece
        }
    }

    /// The connection's rdma_cm event channel (sync mode gives every id its own): where a peer's disconnect shows.
    private var eventFD: Int32 { id.pointee.channel.map { $0.pointee.fd } ?? -1 }

    /// The next completion on the send or receive queue; -1 waits without
    /// limit. A peer's disconnect (rdma_cm DISCONNECTED) ends the wait at
    /// once, as a `.connection` error, instead of when a work request times out.
    private func waitCompletion(send: Bool, _ operation: String, timeoutMilliseconds: Int32) throws(RDMAError) -> ibv_wc {
        var completion = ibv_wc()
        let deadline = timeoutMilliseconds < 0 ? nil : monotonicMilliseconds() + Int64(timeoutMilliseconds)
        while true {
            let left = Self.milliseconds(until: deadline)
            let found = send
                ? snapshotd_rdma_wait_completion(id.pointee.send_cq, id.pointee.send_cq_channel, eventFD, left, &completion)
                : snapshotd_rdma_wait_completion(id.pointee.recv_cq, id.pointee.recv_cq_channel, eventFD, left, &completion)
            switch found {
            case 0: throw fail(RDMAError(kind: .timeout, operation: operation, detail: "no completion within \(timeoutMilliseconds) ms"))
            case 1 where completion.status == IBV_WC_SUCCESS: return completion
            case 1: throw fail(RDMAError(kind: .completion, operation: operation, detail: String(cString: ibv_wc_status_str(completion.status))))
            case 2: try takeConnectionEvent(operation)
            default: throw fail(.errno(.completion, "wait for \(operation)"))
            }
        }
    }

    /// Reads the waiting rdma_cm event: a disconnect (or the device going
    /// away) fails the connection; anything else is acknowledged and ignored.
    private func takeConnectionEvent(_ operation: String) throws(RDMAError) {
        guard let channel = id.pointee.channel else { return }
        var event: UnsafeMutablePointer<rdma_cm_event>?
        guard rdma_get_cm_event(channel, &event) == 0, let event else { throw fail(.errno(.connection, "read a connection event during \(operation)")) }
        let kind = event.pointee.event
        rdma_ack_cm_event(event)
        switch kind {
        case RDMA_CM_EVENT_DISCONNECTED, RDMA_CM_EVENT_DEVICE_REMOVAL, RDMA_CM_EVENT_TIMEWAIT_EXIT:
            throw fail(RDMAError(kind: .connection, operation: operation, detail: "the peer disconnected (\(String(cString: rdma_event_str(kind))))"))
        default:
            return
        }
    }

    /// Whether the peer is gone (a disconnect event waiting, or this side
    /// failed). Never blocks.
    public func peerHasLeft() -> Bool {
        if failure != nil { return true }
        guard establishing == nil else { return false }  // its events are the handshake's
        guard eventFD >= 0, snapshotd_rdma_fd_readable(eventFD, 0) == 1 else { return false }
        do throws(RDMAError) {
            try takeConnectionEvent("check the peer")
        } catch {
            return true
        }
        return failure != nil
    }

    /// What is left until `deadline` (monotonic ms) as a poll timeout; nil: -1, without limit.
    public static func milliseconds(until deadline: Int64?) -> Int32 {
        deadline.map { Int32(clamping: max(0, $0 - monotonicMilliseconds())) } ?? -1
    }

    /// Records the first failure and disconnects: the queue pair goes to
    /// error, so the device stops touching registered memory.
    private func fail(_ error: RDMAError) -> RDMAError {
        if failure == nil {
            failure = error
            // Before `beginEstablishing` the id is in librdmacm's blocking
            // mode, where a disconnect would wait for an event that never
            // comes; not connected then, there is nothing to flush.
            if ownedChannel != nil { rdma_disconnect(id) }
        }
        return error
    }

    /// Disconnects from any thread (a daemon stopping, a session evicted):
    /// the queue pair goes to error and a thread blocked on it wakes with a
    /// flush error. Valid while the connection lives (its holder keeps it).
    public struct Disconnector: @unchecked Sendable {  // an rdma_cm id and an eventfd; both calls are thread-safe
        let id: UnsafeMutablePointer<rdma_cm_id>
        let signal: Int32

        public func disconnect() {
            if signal >= 0 { _ = eventfd_write(signal, 1) }
            rdma_disconnect(id)
        }
    }

    /// Only for a connection past `beginEstablishing` (every one `connect` and `accept` return).
    public var disconnector: Disconnector { Disconnector(id: id, signal: disconnectSignal) }

    /// The peer's address (host:port), for logs.
    public var peerAddress: String {
        guard let address = rdma_get_peer_addr(id) else { return "unknown" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        let length = socklen_t(address.pointee.sa_family == sa_family_t(AF_INET6) ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
        guard getnameinfo(address, length, &host, socklen_t(host.count), &service, socklen_t(service.count), NI_NUMERICHOST | NI_NUMERICSERV) == 0 else { return "unknown" }
        return "\(String(cString: host)):\(String(cString: service))"
    }

    /// This connection's protection domain, as a key for registrations
    /// made for it (``MappedMemory``; with the low bit set, the
    /// remote-writable ones); they are dropped when it goes.
    public var protectionDomainKey: UInt { UInt(bitPattern: protectionDomain.pointer) }

    /// Registers `count` bytes at `base` in this connection's protection
    /// domain, for as long as the returned memory lives (which must be less
    /// than the connection's life and the memory's): as the source of RDMA
    /// WRITEs, and (`remoteWrite`) as their destination.
    public func register(_ base: UnsafeMutableRawPointer, count: Int, remoteWrite: Bool) throws(RDMAError) -> RegisteredMemory {
        try usable("register")
        let access = remoteWrite ? Int32(IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_WRITE.rawValue) : 0
        guard let region = ibv_reg_mr(protectionDomain.pointer, base, count, access) else { throw .errno(.registration, "register \(count) bytes") }
        return RegisteredMemory(region: region, base: base, count: count, domain: protectionDomain)
    }

    /// RDMA-WRITEs `count` bytes at `source` (inside `memory`) to `remote` at `remoteOffset`.
    public func write(_ source: UnsafeRawPointer, count: Int, in memory: RegisteredMemory, to remote: RemoteBuffer, remoteOffset: UInt64, timeoutMilliseconds: Int32) throws(RDMAError) {
        let offset = source - UnsafeRawPointer(memory.base)
        try write(region: memory.region, base: memory.base, regionCount: memory.count, offset: offset, count: count, to: remote, remoteOffset: remoteOffset, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Disconnects; posted work completes with a flush error.
    public func close() {
        _ = fail(RDMAError(kind: .connection, operation: "close", detail: "closed by this side"))
    }

    deinit {
        close()
        // The queue pair first: nothing posted may still reference the
        // regions; then the regions (those cached for mapped segments too);
        // the domain goes with its last reference.
        rdma_destroy_qp(id)
        MappedMemory.shared.removeAttachments(key: protectionDomainKey)
        MappedMemory.shared.removeAttachments(key: protectionDomainKey | 1)  // the remote-writable ones
        rdma_dereg_mr(slotRegion)
        rdma_dereg_mr(sendRegion)
        rdma_destroy_ep(id)
        if let ownedChannel { rdma_destroy_event_channel(ownedChannel) }
        if disconnectSignal >= 0 { Glibc.close(disconnectSignal) }
        slots.deallocate()
        sendBuffer.deallocate()
    }
}

/// A listening rdma_cm endpoint. Immutable; one thread accepts on it (it
/// may be handed to that thread, hence Sendable).
public final class RDMAListener: @unchecked Sendable {
    let id: UnsafeMutablePointer<rdma_cm_id>

    public init(address: String, port: UInt16) throws(RDMAError) {
        var hints = rdma_addrinfo()
        hints.ai_port_space = Int32(RDMA_PS_TCP.rawValue)
        hints.ai_flags = RAI_PASSIVE
        var info: UnsafeMutablePointer<rdma_addrinfo>?
        guard rdma_getaddrinfo(address, String(port), &hints, &info) == 0, let info else { throw .errno(.connection, "resolve \(address):\(port)") }
        defer { rdma_freeaddrinfo(info) }
        var id: UnsafeMutablePointer<rdma_cm_id>?
        // No queue pair here: each accepted connection makes its own, in a domain of its own.
        guard rdma_create_ep(&id, info, nil, nil) == 0, let id else { throw .errno(.connection, "listen on \(address):\(port)") }
        self.id = id
        guard rdma_listen(id, 8) == 0 else { throw .errno(.connection, "listen on \(address):\(port)") }
    }

    /// The next connection, established (blocks until a peer connects).
    public func accept() throws(RDMAError) -> RDMAConnection {
        let connection = try accept(timeoutMilliseconds: -1)!
        try connection.awaitEstablished()
        return connection
    }

    /// The next connection request, accepted, or nil when none came within
    /// `timeoutMilliseconds` (-1: without limit), so an accepting thread can
    /// look whether to stop. The connection completes on its first use (or
    /// ``RDMAConnection/awaitEstablished()``), on the thread that serves it,
    /// within ``RDMAConnection/establishTimeoutMilliseconds``: a peer that
    /// never finishes its handshake holds up no other.
    public func accept(timeoutMilliseconds: Int32) throws(RDMAError) -> RDMAConnection? {
        if let channel = id.pointee.channel {
            switch snapshotd_rdma_fd_readable(channel.pointee.fd, timeoutMilliseconds) {
            case 0: return nil
            case 1: break
            default: throw .errno(.connection, "wait for a connection request")
            }
        }
        var request: UnsafeMutablePointer<rdma_cm_id>?
        guard rdma_get_request(id, &request) == 0, let request else { throw .errno(.connection, "get a connection request") }
        let connection = try RDMAConnection.adopt(request)
        try connection.beginEstablishing("accept", timeoutMilliseconds: RDMAConnection.establishTimeoutMilliseconds) { id in
            var parameters = RDMAConnection.connectionParameters()
            return rdma_accept(id, &parameters)
        }
        return connection
    }

    deinit { rdma_destroy_ep(id) }
}
