import RDMATransport
import Testing

/// What the RDMA transport does without a device (this machine and CI): clear
/// typed errors, never a trap. With a device it runs in the Soft-RoCE guest
/// (Tests/rdma-guest/run.sh).
@Suite("RDMA transport without a device")
struct RDMATransportTests {
    @Test func aGrantRoundTripsAndAMalformedOneIsRefused() throws {
        let grant = RemoteBuffer(address: 0x7F12_3456_7000, key: 0xDEAD_BEEF, count: 8 << 30)
        #expect(grant.encoded.count == 20)
        #expect(try RemoteBuffer(decoding: grant.encoded) == grant)
        let error = #expect(throws: RDMAError.self) { try RemoteBuffer(decoding: Array(grant.encoded.dropLast())) }
        #expect(error?.kind == .protocolViolation)
        #expect(error?.description == "RDMA grant failed: a grant is 20 bytes, got 19")
    }

    @Test(.enabled(if: RDMAConnection.deviceCount == 0, "this machine has an RDMA device: the guest test covers it"))
    func connectingWithoutADeviceIsATypedConnectionError() throws {
        let listen = #expect(throws: RDMAError.self) { try RDMAListener(address: "127.0.0.1", port: 7499) }
        #expect(listen?.kind == .connection, "\(String(describing: listen))")
        #expect(listen?.description.hasPrefix("RDMA ") == true && listen?.description.contains("127.0.0.1:7499") == true, "\(String(describing: listen))")
        let connect = #expect(throws: RDMAError.self) { try RDMAConnection.connect(from: "127.0.0.1", to: "127.0.0.1", port: 7499) }
        #expect(connect?.kind == .connection, "\(String(describing: connect))")
    }
}
