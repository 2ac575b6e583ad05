import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
import SnapshotProtocol

/// Finds the package's built executables (swift test builds them: the test
/// target depends on them), next to the test bundle.
enum Executables {
    static let directory: String = {
        let candidates = [
            URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path,
            URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path + "/.build/debug",
        ]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0 + "/snapshotd") } ?? candidates[1]
    }()

    static func path(_ name: String) -> String { directory + "/" + name }
}

/// A real `snapshotd` process on its own socket, port and arena, removed on deinit.
final class DaemonProcess: @unchecked Sendable {
    let scratch: String
    let arena: String
    let socketPath: String
    let secretPath: String
    let secret = Array("integration-test-secret-0123456789".utf8)
    let tcpPort: UInt16
    /// The TCP listen host: 127.0.0.1, or ::1 to serve over IPv6.
    let tcpHost: String
    let budget: String
    let keep: Int
    let extraArguments: [String]
    /// Added to the daemon's environment on every start (e.g. NOTIFY_SOCKET).
    var environment: [String: String] = [:]
    private(set) var process: Process?
    var logPath: String { scratch + "/snapshotd.log" }

    init(budget: String = "2GiB", keep: Int = 2, arena: String? = nil, tcpHost: String = "127.0.0.1", extraArguments: [String] = []) throws {
        scratch = try makeScratchDirectory()
        self.arena = arena ?? "/dev/shm/snapshotd-test-\(UUID().uuidString.prefix(8))"
        socketPath = scratch + "/snapshotd.sock"
        secretPath = scratch + "/secret"
        self.budget = budget
        self.keep = keep
        self.extraArguments = extraArguments
        self.tcpHost = tcpHost
        tcpPort = try freeTCPPort(host: tcpHost)
        try String(decoding: secret, as: UTF8.self).write(toFile: secretPath, atomically: true, encoding: .utf8)
        try start()
    }

    func start() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Executables.path("snapshotd"))
        process.arguments = [
            "--unix-socket", socketPath, "--arena-directory", arena, "--tcp-listen", HostPort(host: tcpHost, port: tcpPort).description,
            "--shared-secret-file", secretPath, "--memory-budget", budget, "--keep", "\(keep)", "--log-level", "debug",
        ] + extraArguments
        if !FileManager.default.fileExists(atPath: logPath) { _ = FileManager.default.createFile(atPath: logPath, contents: nil) }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        process.standardError = log
        process.standardOutput = log
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        try process.run()
        self.process = process
        try waitUntilReady()
    }

    private func waitUntilReady() throws {
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            // The socket answers a moment before the ready line (with its
            // bound addresses) is logged; tests read that line.
            if let socket = try? Socket.connectUnix(path: socketPath) {
                socket.close()
                if log().contains("snapshotd ready") { return }
            }
            guard process?.isRunning == true else { break }
            usleep(20_000)
        }
        throw HarnessError("snapshotd did not become ready; log:\n\(log())")
    }

    var isRunning: Bool { process?.isRunning ?? false }

    func kill9() {
        guard let process, process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    var pid: Int32? { process.map(\.processIdentifier) }

    func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func unixClient(job: JobID, rank: Rank, world: UInt32) throws -> SnapshotClient {
        try SnapshotClient(endpoint: .unix(path: socketPath), job: job, rank: rank, world: world)
    }

    func tcpClient(job: JobID, rank: Rank, world: UInt32) throws -> SnapshotClient {
        try SnapshotClient(endpoint: .tcp(host: tcpHost, port: tcpPort, secret: secret), job: job, rank: rank, world: world)
    }

    deinit {
        if let process, process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: arena)
        try? FileManager.default.removeItem(atPath: scratch)
    }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func makeScratchDirectory() throws -> String {
    let path = NSTemporaryDirectory() + "snapshotd-test-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// A loopback port nobody listens on right now.
func freeTCPPort(host: String = "127.0.0.1") throws -> UInt16 {
    let listener = try Socket.listenTCP(host: host, port: 0)
    defer { listener.close() }
    guard let port = listener.localPort() else { throw HarnessError("no free port") }
    return port
}

/// Pseudo-random bytes shared by every test tensor: a tensor's content is a
/// slice of this pool at an offset derived from (step, rank, tensor), so data
/// differs per step and rank without generating gigabytes in a debug build.
final class RandomPool: @unchecked Sendable {
    static let shared = RandomPool(byteCount: 80 << 20)
    let bytes: UnsafeMutableRawBufferPointer

    init(byteCount: Int) {
        bytes = .allocate(byteCount: byteCount, alignment: 64)
        var state: UInt64 = 0x5EED
        let words = bytes.baseAddress!.bindMemory(to: UInt64.self, capacity: byteCount / 8)
        for i in 0..<(byteCount / 8) {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            words[i] = state ^ (state >> 33)
        }
    }

    func slice(step: Step, rank: Rank, tensor: Int, count: Int) -> UnsafeRawBufferPointer {
        precondition(count <= bytes.count)
        let span = UInt64(bytes.count - count + 1)
        let offset = Int((step &* 1_000_003 &+ UInt64(rank) &* 7919 &+ UInt64(tensor) &* 104_729) % span)
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + count)])
    }
}

/// A rank's tensors for a step: names, dtypes and sizes from a list.
func tensors(step: Step, rank: Rank, sizes: [(String, DType, Int)]) -> [TensorData] {
    sizes.enumerated().map { index, entry in
        let (name, dtype, bytes) = entry
        let spec = try! TensorSpec(name: name, dtype: dtype, shape: [Int64(bytes) / Int64(dtype.elementSizeBytes)], kind: index == 0 ? .rng : .parameter)
        return TensorData(spec: spec, bytes: RandomPool.shared.slice(step: step, rank: rank, tensor: index, count: bytes))
    }
}

/// Whether a restored shard equals what `tensors(step:rank:sizes:)` produced.
func matches(_ shard: RestoredShard, _ expected: [TensorData]) -> Bool { restored(shard, matches: expected) }

/// Runs `body` for every rank on its own thread and rethrows the first error.
func concurrently(_ ranks: Range<Rank>, _ body: @escaping @Sendable (Rank) throws -> Void) throws {
    try onThreads(ranks.count) { try body(ranks.lowerBound + Rank($0)) }
}


/// The daemon's error code for a failed client call (nil if it succeeded or
/// failed without one): tests pin the exact code, since a crashed daemon also throws.
func clientErrorCode<T>(_ body: () throws -> T) -> ErrorCode? {
    do {
        _ = try body()
        return nil
    } catch let error as SnapshotClientError {
        return error.code
    } catch {
        return nil
    }
}
