import ErasureCoding
import Foundation
import RDMATransport
import SnapshotProtocol

/// The RDMA transport's checks inside the Soft-RoCE guest (Tests/rdma-guest):
///
///     rdma-guest-test server ADDRESS SCENARIO        (one connection, then exits)
///     rdma-guest-test client FROM TO SCENARIO
///
/// A save as it would travel over RDMA: the server grants registered
/// memory, the client RDMA-WRITEs 8 MiB of pseudo-random tensor bytes into
/// it and sends a commitSave frame (the same frames as TCP) with their
/// CRC-32C; the server checks the CRC and answers saveAccepted or
/// checksumMismatch. Scenarios: `ok`; `corrupt` (a byte flipped after the
/// CRC was taken: the server must refuse it); `disconnect` (the server
/// leaves after its grant: the client must get a clear error, the server
/// must not have committed anything). Each side prints one line starting
/// "rdma-guest-test <role> <scenario>: ok" when it saw what it must.
///
///     rdma-guest-test daemons SNAPSHOTD
///
/// runs two real daemons over RDMA (``DaemonScenarios``).
@main
struct RDMAGuestTest {
    static let port: UInt16 = 7472
    static let payloadBytes = 8 << 20
    static let timeoutMilliseconds: Int32 = 30_000

    static func main() {
        let arguments = CommandLine.arguments
        do {
            switch (arguments.count, arguments.count > 1 ? arguments[1] : "") {
            case (4, "server"): try server(address: arguments[2], scenario: arguments[3])
            case (5, "client"): try client(from: arguments[2], to: arguments[3], scenario: arguments[4])
            case (3, "daemons"): try DaemonScenarios.run(snapshotd: arguments[2])
            default:
                say("usage: rdma-guest-test server ADDRESS ok|corrupt|disconnect | client FROM TO ok|corrupt|disconnect | daemons SNAPSHOTD")
                exit(2)
            }
        } catch {
            say("rdma-guest-test \(arguments.dropFirst().first ?? "") \(arguments.last ?? ""): FAILED: \(error)")
            exit(1)
        }
    }

    /// One line, written at once (the guest's console is the only channel out).
    static func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

    static func frame(_ message: Message) throws -> [UInt8] { try Frame.encode(message, requestID: 1) }

    static func decode(_ bytes: [UInt8]) throws -> Message { try Frame.decode(bytes).message }

    static func server(address: String, scenario: String) throws {
        let listener = try RDMAListener(address: address, port: port)
        say("rdma-guest-test server \(scenario): listening on \(address):\(port)")
        let connection = try listener.accept()
        let arena = UnsafeMutableRawPointer.allocate(byteCount: payloadBytes, alignment: 4096)
        defer { arena.deallocate() }
        arena.initializeMemory(as: UInt8.self, repeating: 0, count: payloadBytes)
        let region = try connection.register(arena, count: payloadBytes, remoteWrite: true)
        // The region must stay registered until the verdict: the client writes into it meanwhile.
        try withExtendedLifetime(region) {
            try connection.send(region.grant(arena, count: payloadBytes).encoded, timeoutMilliseconds: timeoutMilliseconds)
            if scenario == "disconnect" {
                connection.close()
                // Nothing is committed: the arena holds no save (writes that landed stay uncommitted).
                say("rdma-guest-test server disconnect: ok (left after the grant; nothing committed)")
                return
            }
            guard case .commitSave(let commit) = try decode(try connection.receive(timeoutMilliseconds: timeoutMilliseconds)), let claimed = commit.checksums?.first else {
                throw GuestTestFailure("expected a commitSave frame with a CRC")
            }
            let held = CRC32C.checksum(UnsafeRawBufferPointer(start: arena, count: payloadBytes))
            let verdict: Message = held == claimed
                ? .saveAccepted(SaveAccepted(step: commit.step))
                : .error(ErrorReply(code: .checksumMismatch, message: String(format: "payload CRC-32C %08x, the commit says %08x", held, claimed)))
            try connection.send(try frame(verdict), timeoutMilliseconds: timeoutMilliseconds)
            switch (scenario, held == claimed) {
            case ("ok", true): say(String(format: "rdma-guest-test server ok: ok (%d bytes by RDMA WRITE, CRC-32C %08x matches)", payloadBytes, held))
            case ("corrupt", false): say(String(format: "rdma-guest-test server corrupt: ok (refused: CRC-32C %08x, the commit says %08x)", held, claimed))
            default: throw GuestTestFailure("scenario \(scenario) but the CRC match is \(held == claimed)")
            }
            _ = try? connection.receive(timeoutMilliseconds: 2000)  // let the client read the verdict before the disconnect
        }
    }

    static func client(from: String, to: String, scenario: String) throws {
        // The server may still be starting (the Swift runtime loads slowly under emulation): retry for 60 s.
        var attempt: RDMAConnection? = nil
        let deadline = Date().addingTimeInterval(60)
        while attempt == nil {
            do throws(RDMAError) {
                attempt = try RDMAConnection.connect(from: from, to: to, port: port)
            } catch {
                guard error.kind == .connection, Date() < deadline else { throw error }
                usleep(200_000)
            }
        }
        guard let connection = attempt else { throw GuestTestFailure("no connection") }
        let grant = try RemoteBuffer(decoding: try connection.receive(timeoutMilliseconds: timeoutMilliseconds))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: payloadBytes, alignment: 4096)
        defer { buffer.deallocate() }
        var state: UInt64 = 0x5EED_2026
        for index in 0..<payloadBytes / 8 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            buffer.storeBytes(of: state, toByteOffset: index * 8, as: UInt64.self)
        }
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: buffer, count: payloadBytes))
        if scenario == "corrupt" { buffer.storeBytes(of: buffer.load(fromByteOffset: 4096, as: UInt8.self) ^ 0x20, toByteOffset: 4096, as: UInt8.self) }
        let local = try connection.register(buffer, count: payloadBytes, remoteWrite: false)
        if scenario == "disconnect" {
            // The server leaves after its grant: keep writing until the device says so.
            var failure: RDMAError? = nil
            for _ in 0..<200 where failure == nil {
                do throws(RDMAError) {
                    try connection.write(buffer, count: payloadBytes, in: local, to: grant, remoteOffset: 0, timeoutMilliseconds: 5000)
                } catch {
                    failure = error
                }
                usleep(50_000)
            }
            if let failure, [.connection, .completion, .timeout, .post].contains(failure.kind) {
                say("rdma-guest-test client disconnect: ok (a clear error: \(failure))")
                return
            }
            throw GuestTestFailure("writes kept succeeding after the server left")
        }
        try connection.write(buffer, count: payloadBytes, in: local, to: grant, remoteOffset: 0, timeoutMilliseconds: timeoutMilliseconds)
        try connection.send(try frame(.commitSave(CommitSave(step: 1, checksums: [crc]))), timeoutMilliseconds: timeoutMilliseconds)
        let verdict = try decode(try connection.receive(timeoutMilliseconds: timeoutMilliseconds))
        switch (scenario, verdict) {
        case ("ok", .saveAccepted): say(String(format: "rdma-guest-test client ok: ok (save accepted, CRC-32C %08x)", crc))
        case ("corrupt", .error(let refusal)) where refusal.code == .checksumMismatch: say("rdma-guest-test client corrupt: ok (refused: \(refusal.message))")
        default: throw GuestTestFailure("scenario \(scenario) got \(verdict)")
        }
        try? connection.send([0], timeoutMilliseconds: 1000)
    }
}

struct GuestTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
