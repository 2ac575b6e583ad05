import CRDMA
import Glibc

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

/// Memory registered with a connection's device (`ibv_reg_mr`): what RDMA
/// reads and writes go from and to. Deregistered when released.
public final class RDMAMemoryRegion {
    let region: UnsafeMutablePointer<ibv_mr>
    public let base: UnsafeMutableRawPointer
    public let count: Int
    /// Kept alive by the region: the protection domain goes with the last endpoint.
    let connection: RDMAConnection

    init(region: UnsafeMutablePointer<ibv_mr>, base: UnsafeMutableRawPointer, count: Int, connection: RDMAConnection) {
        self.region = region
        self.base = base
        self.count = count
        self.connection = connection
    }

    /// What a peer needs to RDMA-WRITE into this region.
    public var grant: RemoteBuffer { RemoteBuffer(address: UInt64(UInt(bitPattern: base)), key: region.pointee.rkey, count: UInt64(count)) }

    deinit { rdma_dereg_mr(region) }
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
        func field<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            bytes[offset..<offset + MemoryLayout<T>.size].reversed().reduce(T(0)) { $0 << 8 | T($1) }
        }
        self.init(address: field(0, UInt64.self), key: field(8, UInt32.self), count: field(12, UInt64.self))
    }
}

/// One reliable-connected queue pair set up with rdma_cm: control messages
/// (the same frames as TCP) with SEND/RECV into pre-posted receive slots,
/// payloads with RDMA WRITE straight between registered memories. Owned by
/// one thread at a time (not Sendable). At most ``receiveSlots`` messages
/// may be in flight towards it: that many receives stay posted, and a
/// sender beyond them waits in the device (RNR retry) instead of failing.
public final class RDMAConnection {
    public static let receiveSlots = 16
    public static let maximumMessageBytes = 64 << 10
    /// One RDMA WRITE at most: a scatter entry's length is 32 bits, and Soft-RoCE takes 2 GiB.
    public static let maximumWriteBytes = 1 << 30

    let id: UnsafeMutablePointer<rdma_cm_id>
    private let slots: UnsafeMutableRawPointer
    private let slotRegion: UnsafeMutablePointer<ibv_mr>
    private let sendBuffer: UnsafeMutableRawPointer
    private let sendRegion: UnsafeMutablePointer<ibv_mr>
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

    /// Resolves `to` from `from` and connects (synchronous rdma_cm: bounded by its own resolution timeouts).
    public static func connect(from: String, to: String, port: UInt16) throws(RDMAError) -> RDMAConnection {
        var hints = rdma_addrinfo()
        hints.ai_port_space = Int32(RDMA_PS_TCP.rawValue)
        var source: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(from, nil, nil, &source) == 0, let source else {
            throw RDMAError(kind: .connection, operation: "resolve \(from)", detail: "not an address of this machine")
        }
        defer { freeaddrinfo(source) }
        hints.ai_src_addr = source.pointee.ai_addr
        hints.ai_src_len = source.pointee.ai_addrlen
        var info: UnsafeMutablePointer<rdma_addrinfo>?
        guard rdma_getaddrinfo(to, String(port), &hints, &info) == 0, let info else { throw .errno(.connection, "resolve \(to):\(port) from \(from)") }
        defer { rdma_freeaddrinfo(info) }
        var attributes = queuePairAttributes()
        var id: UnsafeMutablePointer<rdma_cm_id>?
        guard rdma_create_ep(&id, info, nil, &attributes) == 0, let id else { throw .errno(.connection, "create endpoint to \(to):\(port)") }
        let connection = try adopt(id)
        var parameters = connectionParameters()
        guard rdma_connect(id, &parameters) == 0 else { throw .errno(.connection, "connect to \(to):\(port)") }
        return connection
    }

    /// Takes ownership of `id` (destroyed on every path: here on a failed
    /// registration, else by the connection) and posts its receive slots.
    static func adopt(_ id: UnsafeMutablePointer<rdma_cm_id>) throws(RDMAError) -> RDMAConnection {
        let slotBytes = receiveSlots * maximumMessageBytes
        let slots = UnsafeMutableRawPointer.allocate(byteCount: slotBytes, alignment: 4096)
        let sendBuffer = UnsafeMutableRawPointer.allocate(byteCount: maximumMessageBytes, alignment: 4096)
        guard let slotRegion = rdma_reg_msgs(id, slots, slotBytes) else {
            let error = RDMAError.errno(.registration, "register receive slots")
            rdma_destroy_ep(id)
            slots.deallocate()
            sendBuffer.deallocate()
            throw error
        }
        guard let sendRegion = rdma_reg_msgs(id, sendBuffer, maximumMessageBytes) else {
            let error = RDMAError.errno(.registration, "register the send buffer")
            rdma_dereg_mr(slotRegion)
            rdma_destroy_ep(id)
            slots.deallocate()
            sendBuffer.deallocate()
            throw error
        }
        let connection = RDMAConnection(id: id, slots: slots, slotRegion: slotRegion, sendBuffer: sendBuffer, sendRegion: sendRegion)
        for slot in 0..<receiveSlots { try connection.postReceive(slot) }  // on failure the connection's deinit cleans up
        return connection
    }

    private init(
        id: UnsafeMutablePointer<rdma_cm_id>, slots: UnsafeMutableRawPointer, slotRegion: UnsafeMutablePointer<ibv_mr>,
        sendBuffer: UnsafeMutableRawPointer, sendRegion: UnsafeMutablePointer<ibv_mr>
    ) {
        self.id = id
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
    }

    private func postReceive(_ slot: Int) throws(RDMAError) {
        let address = slots + slot * Self.maximumMessageBytes
        guard rdma_post_recv(id, UnsafeMutableRawPointer(bitPattern: slot + 1), address, Self.maximumMessageBytes, slotRegion) == 0 else {
            throw fail(.errno(.post, "post receive"))
        }
    }

    /// Registers `count` bytes at `base` (which must outlive the region); `remoteWrite` lets the peer write into it.
    public func register(_ base: UnsafeMutableRawPointer, count: Int, remoteWrite: Bool) throws(RDMAError) -> RDMAMemoryRegion {
        try usable("register")
        let region = remoteWrite ? rdma_reg_write(id, base, count) : rdma_reg_msgs(id, base, count)
        guard let region else { throw .errno(.registration, "register \(count) bytes") }
        return RDMAMemoryRegion(region: region, base: base, count: count, connection: self)
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
    public func write(_ local: RDMAMemoryRegion, offset: Int, count: Int, to remote: RemoteBuffer, remoteOffset: UInt64, timeoutMilliseconds: Int32) throws(RDMAError) {
        try usable("write")
        let (localEnd, localOverflow) = offset.addingReportingOverflow(count)
        let (remoteEnd, remoteOverflow) = remoteOffset.addingReportingOverflow(UInt64(clamping: count))
        let (_, addressOverflow) = remote.address.addingReportingOverflow(remoteEnd)
        guard offset >= 0, count >= 0, !localOverflow, localEnd <= local.count, !remoteOverflow, remoteEnd <= remote.count, !addressOverflow else {
            throw RDMAError(kind: .protocolViolation, operation: "write", detail: "\(count) bytes at \(offset) → \(remoteOffset) exceed a region")
        }
        var done = 0
        while done < count {
            let piece = min(Self.maximumWriteBytes, count - done)
            guard rdma_post_write(id, nil, local.base + offset + done, piece, local.region, 0, remote.address + remoteOffset + UInt64(done), remote.key) == 0 else {
                throw fail(.errno(.post, "post write"))
            }
            _ = try waitCompletion(send: true, "write", timeoutMilliseconds: timeoutMilliseconds)
            done += piece
        }
    }

    private func waitCompletion(send: Bool, _ operation: String, timeoutMilliseconds: Int32) throws(RDMAError) -> ibv_wc {
        var completion = ibv_wc()
        let found = send
            ? snapshotd_rdma_wait_completion(id.pointee.send_cq, id.pointee.send_cq_channel, timeoutMilliseconds, &completion)
            : snapshotd_rdma_wait_completion(id.pointee.recv_cq, id.pointee.recv_cq_channel, timeoutMilliseconds, &completion)
        switch found {
        case 0: throw fail(RDMAError(kind: .timeout, operation: operation, detail: "no completion within \(timeoutMilliseconds) ms"))
        case 1 where completion.status == IBV_WC_SUCCESS: return completion
        case 1: throw fail(RDMAError(kind: .completion, operation: operation, detail: String(cString: ibv_wc_status_str(completion.status))))
        default: throw fail(.errno(.completion, "wait for \(operation)"))
        }
    }

    /// Records the first failure and disconnects: the queue pair goes to
    /// error, so the device stops touching registered memory.
    private func fail(_ error: RDMAError) -> RDMAError {
        if failure == nil {
            failure = error
            rdma_disconnect(id)
        }
        return error
    }

    /// Disconnects; posted work completes with a flush error.
    public func close() {
        _ = fail(RDMAError(kind: .connection, operation: "close", detail: "closed by this side"))
    }

    deinit {
        close()
        // The queue pair first: nothing posted may still reference the regions.
        rdma_destroy_qp(id)
        rdma_dereg_mr(slotRegion)
        rdma_dereg_mr(sendRegion)
        rdma_destroy_ep(id)
        slots.deallocate()
        sendBuffer.deallocate()
    }
}

/// A listening rdma_cm endpoint.
public final class RDMAListener {
    let id: UnsafeMutablePointer<rdma_cm_id>

    public init(address: String, port: UInt16) throws(RDMAError) {
        var hints = rdma_addrinfo()
        hints.ai_port_space = Int32(RDMA_PS_TCP.rawValue)
        hints.ai_flags = RAI_PASSIVE
        var info: UnsafeMutablePointer<rdma_addrinfo>?
        guard rdma_getaddrinfo(address, String(port), &hints, &info) == 0, let info else { throw .errno(.connection, "resolve \(address):\(port)") }
        defer { rdma_freeaddrinfo(info) }
        var attributes = RDMAConnection.queuePairAttributes()
        var id: UnsafeMutablePointer<rdma_cm_id>?
        guard rdma_create_ep(&id, info, nil, &attributes) == 0, let id else { throw .errno(.connection, "listen on \(address):\(port)") }
        self.id = id
        guard rdma_listen(id, 8) == 0 else { throw .errno(.connection, "listen on \(address):\(port)") }
    }

    /// The next connection (blocks until a peer connects).
    public func accept() throws(RDMAError) -> RDMAConnection {
        var request: UnsafeMutablePointer<rdma_cm_id>?
        guard rdma_get_request(id, &request) == 0, let request else { throw .errno(.connection, "get a connection request") }
        let connection = try RDMAConnection.adopt(request)
        var parameters = RDMAConnection.connectionParameters()
        guard rdma_accept(request, &parameters) == 0 else { throw .errno(.connection, "accept") }
        return connection
    }

    deinit { rdma_destroy_ep(id) }
}
