@testable import RDMATransport
import SnapshotIO
import Synchronization
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

/// The RDMA stream's messages and credits: pure, checked here; the stream
/// itself runs over real queue pairs in the Soft-RoCE guest.
@Suite("RDMA stream protocol")
struct RDMAStreamProtocolTests {
    @Test func everyMessageRoundTripsWithItsCredits() throws {
        let messages: [StreamMessage] = [
            .data(ArraySlice((0..<300).map { UInt8(truncatingIfNeeded: $0 &* 7) })),
            .offer(position: 1 << 40, count: 3 << 30),
            .grant(position: 65_536, remote: RemoteBuffer(address: 0x7F00_0000_1000, key: 0xABCD_0123, count: 1 << 20)),
            .want(position: 24, count: 4096),
            .written(position: 65_536, count: 1 << 20),
            .credit,
        ]
        for (index, message) in messages.enumerated() {
            let bytes = message.encoded(returnedCredits: UInt16(index + 3))
            let decoded = try StreamMessage.decode(bytes)
            #expect(decoded.message == message)
            #expect(decoded.returnedCredits == UInt16(index + 3))
            #expect(bytes.count == StreamMessage.headerBytes + (index == 0 ? 300 : 0))
        }
        #expect(StreamMessage.maximumDataBytes + StreamMessage.headerBytes == RDMAConnection.maximumMessageBytes)
    }

    @Test func malformedMessagesAreProtocolViolations() {
        let grant = StreamMessage.want(position: 0, count: 8).encoded(returnedCredits: 0)
        var unknownKind = grant
        unknownKind[0] = 9
        var dataThatLies = StreamMessage.data(ArraySlice([1, 2, 3])).encoded(returnedCredits: 0)
        dataThatLies[16] = 4  // says 4 bytes, carries 3
        let cases: [([UInt8], String)] = [
            (Array(grant.prefix(39)), "a 39-byte message is shorter than its header"),
            (unknownKind, "unknown message kind 9"),
            (dataThatLies, "a data message says 4 bytes and carries 3"),
            (grant + [0], "a message of kind 4 carries 1 inline bytes"),
            (StreamMessage.data([]).encoded(returnedCredits: 0), "a data message says 0 bytes and carries 0"),
        ]
        for (bytes, detail) in cases {
            let error = #expect(throws: RDMAError.self) { try StreamMessage.decode(bytes) }
            #expect(error?.kind == .protocolViolation)
            #expect(error?.detail == detail)
        }
    }

    /// Both sides keep a slot back for a credit-only message, so neither can
    /// wait on the other's credits forever; a peer cannot return more than it holds.
    @Test func creditsKeepASlotBackAndAreReturnedAtHalfTheSlots() throws {
        var credits = StreamCredits()
        for _ in 0..<(StreamCredits.slots - 1) {
            #expect(credits.canSend(creditOnly: false))
            _ = credits.spend()
        }
        #expect(!credits.canSend(creditOnly: false))
        #expect(credits.canSend(creditOnly: true))
        for received in 1...StreamCredits.returnThreshold {
            #expect(!credits.shouldReturn)
            try credits.received(returned: 0)
            #expect(credits.unreturned == received)
        }
        #expect(credits.shouldReturn)
        #expect(credits.spend() == UInt16(StreamCredits.returnThreshold))
        #expect(credits.unreturned == 0 && credits.available == 0)
        #expect(!credits.canSend(creditOnly: true))
        try credits.received(returned: UInt16(StreamCredits.slots - 1))
        #expect(credits.available == StreamCredits.slots - 1)
        let overflow = #expect(throws: RDMAError.self) { try credits.received(returned: 2) }
        #expect(overflow?.detail == "the peer returned 2 credits with \(StreamCredits.slots - 1) of \(StreamCredits.slots) already held")
    }
}

/// What the RDMA stream caches per mapped segment: made once per key, found
/// for any range inside the mapping, gone before the mapping is unmapped or
/// when its connection goes.
@Suite("Mapped memory registrations")
struct MappedMemoryTests {
    /// Stands for a registration: counts its releases.
    final class Token: Sendable {
        static let released = Mutex(0)
        deinit { Self.released.withLock { $0 += 1 } }
    }

    @Test func anAttachmentIsMadeOncePerKeyAndGoesWithItsMappingOrKey() throws {
        let pageBytes = 4096
        var segment: MappedSegment? = try MappedSegment.anonymous(sizeBytes: 4 * pageBytes)
        let base = try #require(segment?.base)
        let releasedBefore = Token.released.withLock { $0 }
        var made: [(UnsafeMutableRawPointer, Int, Bool)] = []
        func attachment(_ offset: Int, _ count: Int, key: UInt) -> Token? {
            MappedMemory.shared.attachment(containing: base + offset, count: count, key: key) { mappingBase, size, writable in
                made.append((mappingBase, size, writable))
                return Token()
            }
        }
        let first = try #require(attachment(100, 1000, key: 7))
        #expect(attachment(3 * pageBytes, pageBytes, key: 7) === first, "any range inside the mapping finds the same one")
        #expect(made.count == 1 && made[0].0 == base && made[0].1 == 4 * pageBytes && made[0].2)
        #expect(attachment(3 * pageBytes, pageBytes + 1, key: 7) == nil, "a range past the mapping's end is not cached")
        let other = try #require(attachment(0, 1, key: 8))
        #expect(other !== first && made.count == 2)
        MappedMemory.shared.removeAttachments(key: 7)
        #expect(Token.released.withLock { $0 } == releasedBefore, "the test still holds both")
        #expect(attachment(0, 1, key: 7) !== first && made.count == 3, "a connection that came back registers afresh")
        segment = nil  // unmapped: its attachments go first
        _ = segment
        #expect(Token.released.withLock { $0 } == releasedBefore + 1, "the one made after the key was dropped went with the mapping")
        #expect(MappedMemory.shared.attachment(containing: base, count: 1, key: 8) { _, _, _ in Token() } == nil)
        withExtendedLifetime((first, other)) {}
    }
}
