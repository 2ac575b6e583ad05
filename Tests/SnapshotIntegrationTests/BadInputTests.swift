import ErasureCoding
import Foundation
import Glibc
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

/// Hostile and broken clients on the Unix socket and on TCP: each gets its
/// specific error and a log line; the daemon keeps serving and loses nothing.
@Suite("Bad input on both sockets", .serialized)
struct BadInputTests {
    static let sizes: [(String, DType, Int)] = [("rng.state", .bytes, 7), ("w", .bfloat16, 1 << 20)]

    /// A raw connection that speaks frames by hand.
    struct Raw {
        let connection: FramedConnection

        static func unix(_ daemon: DaemonProcess) throws -> Raw {
            Raw(connection: FramedConnection(stream: try Socket.connectUnix(path: daemon.socketPath), frameTimeoutMilliseconds: 5000))
        }

        /// TCP, authenticated with `secret` (nil: skip the answer entirely).
        static func tcp(_ daemon: DaemonProcess, secret: [UInt8]?) throws -> (Raw, Message?) {
            let raw = Raw(connection: FramedConnection(stream: try Socket.connectTCP(host: "127.0.0.1", port: daemon.tcpPort), frameTimeoutMilliseconds: 5000))
            guard case .challenge(let challenge) = try raw.connection.receive().message else { throw HarnessError("no challenge") }
            guard let secret else { return (raw, nil) }
            try raw.connection.send(.authenticate(Authenticate(tag: Authentication.tag(secret: secret, nonce: challenge.nonce))), requestID: 1)
            return (raw, try? raw.connection.receive().message)
        }

        func send(bytes: [UInt8]) throws { try connection.stream.writeAll(bytes, deadlineMilliseconds: connection.deadline()) }

        func call(_ message: Message) throws -> Message {
            try connection.send(message, requestID: 77)
            return try connection.receive().message
        }

        /// The next reply, or nil when the daemon closed the connection.
        func reply() -> Message? { try? connection.receive().message }

        func close() { connection.close() }
    }

    func errorCode(_ message: Message?) -> ErrorCode? {
        if case .error(let e) = message { return e.code }
        return nil
    }

    @Test func everyKindOfBadInputIsRefusedAndNothingIsLost() throws {
        let daemon = try DaemonProcess()
        let job = try JobID("bad-input")
        let good = try daemon.unixClient(job: job, rank: 0, world: 2)
        let other = try daemon.tcpClient(job: job, rank: 1, world: 2)
        try good.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: Self.sizes))
        try other.save(step: 1, tensors: tensors(step: 1, rank: 1, sizes: Self.sizes))
        try good.waitCommitted(step: 1)

        // Random bytes: a bad-magic error, then the daemon hangs up.
        let seed = testSeed("bad input")
        var rng = SplitMix64(seed: seed)
        for _ in 0..<20 {
            let raw = try Raw.unix(daemon)
            try raw.send(bytes: (0..<Int.random(in: 40...400, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
            #expect(errorCode(raw.reply()) == .malformedFrame, "seed \(seed)")
            raw.close()
        }
        // Truncated header, then the client vanishes: its session ends, the daemon serves on.
        let truncated = try Raw.unix(daemon)
        try truncated.send(bytes: Array(Frame.encode(.latestCommitted, requestID: 1).prefix(17)))
        truncated.close()
        #expect(daemon.isRunning)
        #expect(errorCode(try Raw.unix(daemon).call(.latestCommitted)) == .helloRequired)
        // Oversize payload claim.
        let oversize = try Raw.unix(daemon)
        var header = FrameHeader(type: .beginSave, requestID: 5, payloadLength: 100 << 20, payloadChecksum: 0, bulkLength: 0).encoded()
        try oversize.send(bytes: header)
        guard case .error(let tooBig) = oversize.reply() else { throw HarnessError("no reply to an oversize claim") }
        #expect(tooBig.code == .malformedFrame && tooBig.message.contains("limit"))
        #expect(oversize.reply() == nil, "the stream cannot be trusted after a bad header")
        // Unknown message type behind a valid checksum.
        let unknown = try Raw.unix(daemon)
        header = try Frame.encode(.ok, requestID: 6)
        header[5] = 99
        let crc = CRC32C.checksum(Array(header[0..<36]))
        withUnsafeBytes(of: crc.littleEndian) { header.replaceSubrange(36..<40, with: $0) }
        try unknown.send(bytes: header)
        guard case .error(let unknownType) = unknown.reply() else { throw HarnessError("no reply to an unknown type") }
        #expect(unknownType.message.contains("unknown message type 99"))
        // A bad payload with intact framing: error, and the session goes on.
        let badPayload = try Raw.unix(daemon)
        let payload: [UInt8] = [7]
        try badPayload.send(bytes: FrameHeader(type: .status, requestID: 8, payloadLength: 1, payloadChecksum: CRC32C.checksum(payload), bulkLength: 0).encoded() + payload)
        #expect(errorCode(badPayload.reply()) == .malformedFrame)
        #expect(errorCode(try badPayload.call(.latestCommitted)) == .helloRequired, "requests before hello are refused, session kept")
        // Wrong job shape, duplicate rank, commit without begin.
        let session = try Raw.unix(daemon)
        #expect(errorCode(try session.call(.hello(Hello(role: .trainer, job: job, rank: 0, world: 4)))) == .wrongJob)
        #expect(errorCode(try session.call(.hello(Hello(role: .trainer, job: job, rank: 0, world: 2)))) == .duplicateRank)
        let fresh = try Raw.unix(daemon)
        guard case .welcome = try fresh.call(.hello(Hello(role: .trainer, job: try JobID("other-job"), rank: 0, world: 1))) else { throw HarnessError("hello refused") }
        #expect(errorCode(try fresh.call(.commitSave(CommitSave(step: 9)))) == .unknownStep)
        #expect(errorCode(try fresh.call(.restore(Restore(step: nil, transport: .sharedMemory)))) == .notCommitted)
        // A put with bulk bytes for a save that does not exist: refused, bytes drained, session kept.
        try fresh.connection.send(.putTensor(PutTensor(step: 3, tensorIndex: 0, offsetBytes: 0)), requestID: 10, bulkLength: 4096)
        try fresh.send(bytes: [UInt8](repeating: 1, count: 4096))
        #expect(errorCode(fresh.reply()) == .invalidRequest)
        guard case .latestCommittedReply = try fresh.call(.latestCommitted) else { throw HarnessError("session lost after a refused put") }
        // A trainer sees only its own job.
        guard case .statusReply(let visible) = try fresh.call(.status(StatusRequest(job: nil))) else { throw HarnessError("no status") }
        #expect(visible.jobs.map(\.job.rawValue) == ["other-job"])

        // TCP: wrong secret, and no answer to the challenge at all.
        let (wrong, wrongReply) = try Raw.tcp(daemon, secret: Array("not-the-secret-at-all".utf8))
        #expect(errorCode(wrongReply) == .unauthenticated)
        #expect(wrong.reply() == nil)
        let (skipper, _) = try Raw.tcp(daemon, secret: nil)
        #expect(errorCode(try skipper.call(.hello(Hello(role: .trainer, job: job, rank: 1, world: 2)))) == .unauthenticated)
        // TCP after authenticating: garbage still gets its error.
        let (authenticated, ok) = try Raw.tcp(daemon, secret: daemon.secret)
        #expect(ok == .ok)
        try authenticated.send(bytes: [UInt8](repeating: 0xEE, count: 64))
        #expect(errorCode(authenticated.reply()) == .malformedFrame)
        // Shared memory is not offered over TCP.
        let (tcpSession, _) = try Raw.tcp(daemon, secret: daemon.secret)
        _ = try tcpSession.call(.hello(Hello(role: .trainer, job: try JobID("tcp-job"), rank: 0, world: 1)))
        #expect(errorCode(try tcpSession.call(.beginSave(BeginSave(step: 1, transport: .sharedMemory, tensors: [])))) == .invalidRequest)

        // Nothing held was lost, and good clients are still served on both sockets.
        #expect(daemon.isRunning)
        #expect(matches(try good.restore(step: 1), tensors(step: 1, rank: 0, sizes: Self.sizes)))
        #expect(matches(try other.restore(step: 1), tensors(step: 1, rank: 1, sizes: Self.sizes)))
        try good.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: Self.sizes))
        try other.save(step: 2, tensors: tensors(step: 2, rank: 1, sizes: Self.sizes))
        #expect(try good.waitCommitted(step: 2) == 2)
        let log = daemon.log()
        #expect(log.contains("malformed frame"))
        #expect(log.contains("TCP client failed authentication"))
        #expect(log.contains("request refused"))
    }

    /// Sizes that overflow 64 bits (a shape product, a sum of tensor lengths)
    /// are refused before any arithmetic on them, over both sockets.
    @Test func beginSavesWhoseSizesOverflowAreRefused() throws {
        let daemon = try DaemonProcess()
        let huge = Int64.max  // 2^63 − 1 elements
        let overflowing: [(String, [TensorSpec])] = [
            ("one 2-byte tensor of 2^63 − 1 elements", [try TensorSpec(name: "w", dtype: .float16, shape: [huge], kind: .parameter)]),
            ("two 1-byte tensors of 2^63 − 1 elements", [
                try TensorSpec(name: "a", dtype: .bytes, shape: [huge], kind: .parameter),
                try TensorSpec(name: "b", dtype: .bytes, shape: [huge], kind: .parameter),
            ]),
            ("2^63 + 2^40 bytes, past the shard limit", [
                try TensorSpec(name: "c", dtype: .bytes, shape: [1 << 40], kind: .parameter),
                try TensorSpec(name: "d", dtype: .float32, shape: [1 << 31, 1 << 30], kind: .parameter),
            ]),
        ]
        let (tcp, ok) = try Raw.tcp(daemon, secret: daemon.secret)
        #expect(ok == .ok)
        let unix = try Raw.unix(daemon)
        for (raw, transport) in [(unix, DataTransport.sharedMemory), (tcp, .stream)] {
            guard case .welcome = try raw.call(.hello(Hello(role: .trainer, job: try JobID("overflow-\(transport)"), rank: 0, world: 1))) else {
                throw HarnessError("hello refused")
            }
            for (name, specs) in overflowing {
                guard case .error(let refusal) = try raw.call(.beginSave(BeginSave(step: 1, transport: transport, tensors: specs))) else {
                    Issue.record("\(name) over \(transport) was accepted")
                    continue
                }
                #expect(refusal.code == .invalidRequest, "\(name) over \(transport): \(refusal.message)")
                #expect(refusal.message.contains("the most any shard may hold"), "\(refusal.message)")
            }
            #expect(daemon.isRunning)
        }
        // The daemon serves on: a real save commits.
        let client = try daemon.unixClient(job: try JobID("after-overflow"), rank: 0, world: 1)
        try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: Self.sizes))
        #expect(try client.waitCommitted(step: 1) == 1)
        #expect(daemon.log().contains("the most any shard may hold"))
    }

    /// A client that asks for a restore and stops reading: the daemon's write
    /// deadline (frame timeout + 10 ms per MiB) cuts it, which frees the
    /// session's thread, its rank and the restore's pin.
    @Test func aClientThatStopsReadingMidRestoreIsCutAtTheWriteDeadline() throws {
        let daemon = try DaemonProcess(keep: 1, extraArguments: ["--frame-timeout-ms", "1000"])
        let job = try JobID("stalled-restore")
        let sizes: [(String, DType, Int)] = [("w", .float32, 64 << 20)]
        do {
            let client = try daemon.unixClient(job: job, rank: 0, world: 1)
            try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: sizes))
            try client.waitCommitted(step: 1)
        }
        let stalled = try Raw.unix(daemon)
        guard case .welcome = try stalled.call(.hello(Hello(role: .trainer, job: job, rank: 0, world: 1))) else { throw HarnessError("hello refused") }
        try stalled.connection.send(.restore(Restore(step: 1, transport: .stream)), requestID: 2)
        let asked = Date()
        // Never read. The rank is held until the daemon gives up on the write.
        var client: SnapshotClient?
        while client == nil, Date().timeIntervalSince(asked) < 10 {
            do {
                client = try daemon.unixClient(job: job, rank: 0, world: 1)
            } catch let error as SnapshotClientError where error.code == .duplicateRank {
                usleep(100_000)
            }
        }
        let freedAfter = Date().timeIntervalSince(asked)
        guard let client else { throw HarnessError("rank 0 was still held 10 s after the reader stalled") }
        // Deadline: 1 s frame timeout + 10 ms per MiB of 64 MiB = 1.64 s; slack for the check interval.
        #expect(freedAfter < 4, "the stalled session ended after \(freedAfter) s")
        // The pin is gone: with one step kept, committing step 2 drops step 1.
        try client.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: sizes))
        try client.waitCommitted(step: 2)
        let status = try OperatorClient(endpoint: .unix(path: daemon.socketPath)).status(job: job)
        #expect(status.jobs.first?.steps.map(\.step) == [2], "step 1 is still held (pinned?)")
        stalled.close()
    }

    /// A refused TCP put has no reply of its own: its error arrives ahead of
    /// the next call's reply. The client matches replies by request id, so
    /// the next call reports the refusal and every later call gets its own
    /// reply (it used to be off by one from then on).
    @Test func aRefusedPutDoesNotShiftLaterReplies() throws {
        let daemon = try DaemonProcess()
        let job = try JobID("refused-put")
        let client = try daemon.tcpClient(job: job, rank: 0, world: 1)
        try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: Self.sizes))
        #expect(try client.waitCommitted(step: 1) == 1)
        let data = tensors(step: 2, rank: 0, sizes: Self.sizes)
        let pending = try client.beginSave(step: 2, specs: data.map(\.spec))
        try client.abortSave(step: 2)
        try pending.write(tensorIndex: 0, from: data[0].bytes)  // refused by the daemon: no such save
        do {
            _ = try client.latestCommittedStep()
            Issue.record("the refused put went unreported")
        } catch let error as SnapshotClientError {
            #expect(error.code == .invalidRequest, "\(error)")
            #expect(error.message.contains("earlier request"), "\(error)")
        }
        #expect(try client.latestCommittedStep() == 1)
        #expect(try client.status().jobs.map(\.job) == [job])
        try client.save(step: 3, tensors: tensors(step: 3, rank: 0, sizes: Self.sizes))
        #expect(try client.waitCommitted(step: 3) == 3)
    }

    /// A TCP save is checked on arrival by default: the client computes each
    /// tensor's CRC while streaming it and the commit carries them. A proxy
    /// between client and daemon flips one byte of tensor data in flight; the
    /// step does not commit (`checksumMismatch`), and a clean save after it does.
    @Test func aByteFlippedInFlightOverTCPIsCaught() throws {
        let daemon = try DaemonProcess()
        let proxy = try Socket.listenTCP(host: "127.0.0.1", port: 0)
        defer { proxy.close() }
        let flipAtByte = 200_000  // well inside the first tensor's bulk bytes (1 MiB of bfloat16)
        let forwarding = inBackground {
            guard let client = try? proxy.accept(), let server = try? Socket.connectTCP(host: "127.0.0.1", port: daemon.tcpPort) else { return }
            let back = inBackground {
                var buffer = [UInt8](repeating: 0, count: 64 << 10)
                while let n = try? buffer.withUnsafeMutableBytes({ b in try server.readSome(into: b.baseAddress!, count: b.count) }), n > 0 {
                    try? client.writeAll(Array(buffer[..<n]), deadlineMilliseconds: monotonicMilliseconds() + 5000)
                }
                client.shutdownBoth()
            }
            var forwarded = 0
            var buffer = [UInt8](repeating: 0, count: 64 << 10)
            while let n = try? buffer.withUnsafeMutableBytes({ b in try client.readSome(into: b.baseAddress!, count: b.count) }), n > 0 {
                if forwarded <= flipAtByte, flipAtByte < forwarded + n { buffer[flipAtByte - forwarded] ^= 0x01 }
                forwarded += n
                try? server.writeAll(Array(buffer[..<n]), deadlineMilliseconds: monotonicMilliseconds() + 5000)
            }
            server.shutdownBoth()
            back.wait()
        }
        let job = try JobID("flipped-in-flight")
        do {  // the client closes its connection (and the proxy's) at the end of this scope
            let viaProxy = try SnapshotClient(endpoint: .tcp(host: "127.0.0.1", port: proxy.localPort()!, secret: daemon.secret), job: job, rank: 0, world: 1)
            try viaProxy.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: Self.sizes))
            do {
                try viaProxy.waitCommitted(step: 1, timeoutMilliseconds: 5000)
                Issue.record("a shard corrupted in flight committed")
            } catch let error as SnapshotClientError {
                #expect(error.code == .checksumMismatch, "\(error)")
            }
        }
        forwarding.wait()
        let direct = try daemon.tcpClient(job: job, rank: 0, world: 1)
        try direct.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: Self.sizes))
        #expect(try direct.waitCommitted(step: 2) == 2)
        #expect(matches(try direct.restore(step: 2), tensors(step: 2, rank: 0, sizes: Self.sizes)))
    }

    /// Two jobs on one node save in turns with the segment pool warm (one step
    /// kept, so every save reuses freed memory). A client of job A keeps a
    /// writable mapping of every segment it was ever given and finally writes
    /// over all of them: job B's committed shards are untouched, because a
    /// pooled segment goes back only to the same job and rank.
    @Test func aClientOfOneJobCannotWriteIntoAnotherJobsShards() throws {
        let daemon = try DaemonProcess(keep: 1)
        let sizes: [(String, DType, Int)] = [("w", .float32, 3 << 20)]
        let hostile = try Raw.unix(daemon)
        guard case .welcome = try hostile.call(.hello(Hello(role: .trainer, job: try JobID("job-a"), rank: 0, world: 1))) else { throw HarnessError("hello refused") }
        let victim = try daemon.unixClient(job: try JobID("job-b"), rank: 0, world: 1)
        var kept: [MappedSegment] = []
        for step in 1...4 as ClosedRange<Step> {
            let data = tensors(step: step, rank: 0, sizes: sizes)
            try hostile.connection.send(.beginSave(BeginSave(step: step, transport: .sharedMemory, tensors: data.map(\.spec))), requestID: 10 + step)
            var descriptors: [Int32] = []
            guard case .saveReady(let ready) = try hostile.connection.receive(collecting: &descriptors).message, descriptors.count == 1 else {
                throw HarnessError("no segment for job A's step \(step)")
            }
            let segment = try MappedSegment(fd: descriptors[0], sizeBytes: Int(ready.segmentSizeBytes), writable: true)
            segment.bytes(offset: Int(ready.tensorOffsets[0]), count: data[0].bytes.count).copyMemory(from: data[0].bytes)
            kept.append(segment)
            guard case .saveAccepted = try hostile.call(.commitSave(CommitSave(step: step))) else { throw HarnessError("job A's commit refused") }
            try victim.save(step: step, tensors: tensors(step: step, rank: 0, sizes: sizes))
            #expect(try victim.waitCommitted(step: step) == step)
        }
        for segment in kept { memset(segment.base!, 0xFF, segment.sizeBytes) }
        #expect(matches(try victim.restore(step: 4), tensors(step: 4, rank: 0, sizes: sizes)), "job B's shard was written through job A's mappings")
        hostile.close()
    }

    @Test func clientChecksumsThatDoNotMatchKeepTheStepUncommitted() throws {
        let daemon = try DaemonProcess()
        let client = try daemon.unixClient(job: try JobID("crc"), rank: 0, world: 1)
        let data = tensors(step: 1, rank: 0, sizes: Self.sizes)
        let pending = try client.beginSave(step: 1, specs: data.map(\.spec))
        for (index, tensor) in data.enumerated() { try pending.write(tensorIndex: index, from: tensor.bytes) }
        try pending.commit(checksums: [0, 0])
        do {
            try client.waitCommitted(step: 1, timeoutMilliseconds: 5000)
            Issue.record("a shard with wrong checksums committed")
        } catch let error as SnapshotClientError {
            #expect(error.code == .checksumMismatch)
        }
        try client.save(step: 2, tensors: tensors(step: 2, rank: 0, sizes: Self.sizes), sendChecksums: true)
        #expect(try client.waitCommitted(step: 2) == 2)
    }
}
