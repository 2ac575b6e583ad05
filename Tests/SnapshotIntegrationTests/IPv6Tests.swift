import Foundation
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

/// TCP endpoints written as `[::1]:port` work end to end: the socket layer
/// listens and connects over IPv6, and a daemon serves a trainer there.
@Suite("IPv6", .serialized)
struct IPv6Tests {
    static let loopbackAvailable: Bool = (try? Socket.listenTCP(host: "::1", port: 0)).map { $0.close(); return true } ?? false

    @Test(.enabled(if: loopbackAvailable, "this machine has no IPv6 loopback (::1)"))
    func socketsListenAndConnectOverIPv6() throws {
        let listener = try Socket.listenTCP(host: "::1", port: 0)
        defer { listener.close() }
        let port = try #require(listener.localPort())
        #expect(port != 0)
        let client = try Socket.connectTCP(host: "::1", port: port, timeoutMilliseconds: 2000)
        defer { client.close() }
        let served = try listener.accept()
        defer { served.close() }
        try client.writeAll(Array("over six".utf8), deadlineMilliseconds: monotonicMilliseconds() + 2000)
        #expect(String(decoding: try served.readExact(count: 8), as: UTF8.self) == "over six")
    }

    @Test func aHostThatIsNoAddressIsAClearError() {
        do {
            _ = try Socket.listenTCP(host: "not-an-address", port: 0)
            Issue.record("listening on a name succeeded")
        } catch let error as IOError {
            #expect("\(error)".contains("'not-an-address' is not an IPv4 or IPv6 address"), "\(error)")
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test(.enabled(if: loopbackAvailable, "this machine has no IPv6 loopback (::1)"))
    func aDaemonServesATrainerOnIPv6() throws {
        let daemon = try DaemonProcess(tcpHost: "::1")
        #expect(daemon.log().contains("[::1]:\(daemon.tcpPort)"), "the ready line names the bound IPv6 address")
        let job = try JobID("ipv6-job")
        let client = try daemon.tcpClient(job: job, rank: 0, world: 1)
        let bytes = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try bytes.withUnsafeBytes { raw in
            try client.save(step: 1, tensors: [TensorData(spec: TensorSpec.blob(name: "w", byteCount: raw.count, kind: .parameter), bytes: raw)])
        }
        #expect(try client.waitCommitted(step: 1, timeoutMilliseconds: 10_000) == 1)
        let restored = try client.restore(step: 1)
        defer { restored.release() }
        #expect(restored.step == 1)
        #expect(Array(restored.tensor(at: 0)) == bytes)
    }
}
