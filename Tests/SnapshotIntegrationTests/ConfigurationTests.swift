import Foundation
import Glibc
import SnapshotClient
import SnapshotDaemon
import SnapshotProtocol
import Testing

/// Bad configuration values, given to a real `snapshotd`: each gives one clear
/// error line naming the setting and a non-zero exit, never a trap (a trap
/// exits by signal: SIGILL or SIGTRAP).
@Suite("Bad configuration values")
struct ConfigurationTests {
    struct Outcome {
        let status: Int32
        let reason: Process.TerminationReason
        let output: String
    }

    /// Runs snapshotd with `config` as its TOML file (and a cluster file, if
    /// given) and waits for it to exit. `$SCRATCH` in `config` is its directory.
    func run(config: String, cluster: String? = nil) throws -> Outcome {
        let scratch = try makeScratchDirectory()
        let arena = "/dev/shm/snapshotd-config-test-\(UUID().uuidString.prefix(8))"
        defer {
            try? FileManager.default.removeItem(atPath: scratch)
            try? FileManager.default.removeItem(atPath: arena)  // a daemon refused late (a bad flush directory) made it
        }
        try "integration-test-secret-0123456789".write(toFile: scratch + "/secret", atomically: true, encoding: .utf8)
        var text = """
            unix_socket = "\(scratch)/snapshotd.sock"
            arena_directory = "\(arena)"
            shared_secret_file = "\(scratch)/secret"

            """
        if let cluster {
            try cluster.write(toFile: scratch + "/cluster.toml", atomically: true, encoding: .utf8)
            try "integration-test-peer-secret-98765".write(toFile: scratch + "/peer-secret", atomically: true, encoding: .utf8)
            text += "cluster_file = \"\(scratch)/cluster.toml\"\n"
            if !config.contains("peer_secret_file") { text += "peer_secret_file = \"\(scratch)/peer-secret\"\n" }
        }
        try (text + config.replacingOccurrences(of: "$SCRATCH", with: scratch)).write(toFile: scratch + "/snapshotd.toml", atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Executables.path("snapshotd"))
        process.arguments = ["--config", scratch + "/snapshotd.toml"]
        let pipe = Pipe()
        process.standardError = pipe
        process.standardOutput = pipe
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while process.isRunning, Date() < deadline { usleep(20_000) }
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
            throw HarnessError("snapshotd started with a bad configuration:\n\(config)")
        }
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return Outcome(status: process.terminationStatus, reason: process.terminationReason, output: output)
    }

    static func clusterFile(groupSize: Int, heartbeat: Int = 200, timeout: Int = 2000) -> String {
        var text = "heartbeat_interval_ms = \(heartbeat)\nfailure_timeout_ms = \(timeout)\n"
        for id in 0..<groupSize { text += "[[node]]\nid = \(id)\naddress = \"127.0.0.1:\(20000 + id)\"\n" }
        text += "[[group]]\nnodes = [\((0..<groupSize).map(String.init).joined(separator: ", "))]\nparity = 1\n"
        return text
    }

    static let cases: [(name: String, config: String, cluster: String?, expected: String)] = [
        ("negative memory budget", "memory_budget = -1\n", nil, "memory_budget = -1 is negative"),
        ("budget below a segment", "memory_budget = 1000\n", nil, "memory_budget = 1000 is out of range"),
        ("no snapshots kept", "snapshots_kept_per_job = 0\n", nil, "snapshots_kept_per_job = 0 is out of range"),
        ("negative frame timeout", "frame_timeout_ms = -5\n", nil, "frame_timeout_ms = -5 is out of range"),
        ("zero connections", "max_connections = 0\n", nil, "max_connections = 0 is out of range"),
        ("negative scrub interval", "scrub_interval_ms = -1\n", nil, "scrub_interval_ms = -1 is out of range"),
        ("a 300-node group", "", clusterFile(groupSize: 300), "group 0 (300 nodes, parity 1)"),
        ("negative failure timeout", "", clusterFile(groupSize: 3, timeout: -100), "failure_timeout_ms = -100 is outside"),
        ("negative heartbeat interval", "", clusterFile(groupSize: 3, heartbeat: -1), "heartbeat_interval_ms = -1 is outside"),
        ("heartbeat that cannot fit the timeout", "", clusterFile(groupSize: 3, heartbeat: 600, timeout: 1000), "must exceed twice heartbeat_interval_ms"),
        ("a missing peer secret", "peer_secret_file = \"$SCRATCH/missing\"\n", clusterFile(groupSize: 3), "cannot read secret file"),
        ("metrics address without a port", "metrics_listen = \"127.0.0.1\"\n", nil, "metrics_listen = '127.0.0.1' is not host:port"),
        ("metrics address that is not IPv4", "metrics_listen = \"metrics.example:9464\"\n", nil, "'metrics.example' is not an IPv4 address"),
        ("metrics port out of range", "metrics_listen = \"127.0.0.1:70000\"\n", nil, "metrics_listen = '127.0.0.1:70000' is not host:port"),
        ("a relative flush directory", "flush_directory = \"durable\"\nflush_every_steps = 2\n", nil, "flush_directory = \"durable\" must be an absolute path"),
        ("a flush directory with no cadence", "flush_directory = \"/tmp/durable\"\n", nil, "neither flush_every_steps nor flush_interval_ms is"),
        ("a cadence with no flush directory", "flush_every_steps = 2\n", nil, "flush_every_steps or flush_interval_ms is set but flush_directory is not"),
        ("a flush bandwidth below the minimum", "flush_directory = \"/tmp/durable\"\nflush_every_steps = 2\nflush_bandwidth = \"1MiB\"\n", nil,
         "flush_bandwidth = 1048576 is out of range"),
        ("time-based flushing in a cluster", "flush_directory = \"/tmp/durable\"\nflush_interval_ms = 1000\n", clusterFile(groupSize: 3),
         "flush_interval_ms works on a single node only"),
        ("an unwritable flush directory", "flush_directory = \"/proc/durable\"\nflush_every_steps = 1\n", nil, "cannot create directory /proc/durable"),
        ("an unknown transport", "transport = \"infiniband\"\n", nil, "transport = \"infiniband\" is not one of \"tcp\", \"rdma\", \"auto\""),
        ("RDMA where there is none", "transport = \"rdma\"\n", nil,
         RDMADevices.list().isEmpty ? "transport = \"rdma\" but this machine has no RDMA device" : "needs tcp_listen: RDMA listens on its address and port"),
        ("peers sharing the trainers' secret", "peer_secret_file = \"$SCRATCH/secret\"\n", clusterFile(groupSize: 3), "peer_secret_file and shared_secret_file are the same file"),
    ]

    /// `auto` on a machine without RDMA: one clear line, and the daemon serves over TCP.
    @Test func autoTransportFallsBackToTCPWithOneLogLine() throws {
        let daemon = try DaemonProcess(extraArguments: ["--transport", "auto"])
        let expected = RDMADevices.list().isEmpty
            ? "transport auto: no RDMA device on this machine; falling back to TCP for peers and remote clients"
            : "peers and remote clients use RDMA, TCP where a peer does not answer over RDMA"
        let lines = daemon.log().split(separator: "\n").filter { $0.contains("transport auto:") }
        #expect(lines.count == 1, "\(lines)")
        #expect(lines.first?.contains(expected) == true, "\(lines)")
        let client = try daemon.tcpClient(job: try JobID("auto-tcp"), rank: 0, world: 1)
        try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: [("w", .float32, 4096)]))
        _ = try client.waitCommitted(step: 1)
        #expect(matches(try client.restore(), tensors(step: 1, rank: 0, sizes: [("w", .float32, 4096)])))
    }

    @Test(arguments: 0..<cases.count)
    func aBadValueIsOneClearErrorAndANonZeroExit(index: Int) throws {
        let bad = Self.cases[index]
        let outcome = try run(config: bad.config, cluster: bad.cluster)
        #expect(outcome.reason == .exit, "\(bad.name): snapshotd died by signal \(outcome.status)\n\(outcome.output)")
        #expect(outcome.status != 0, "\(bad.name)")
        #expect(outcome.output.contains(bad.expected), "\(bad.name): \(outcome.output)")
        #expect(!outcome.output.contains("Fatal error"), "\(bad.name): \(outcome.output)")
    }
}
