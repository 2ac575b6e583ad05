import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

/// Acceptance of the Prometheus endpoint (`metrics_listen`): real daemons,
/// scraped over real TCP after saves and after a rebuild, the documented
/// series checked for their exact values, and the text checked by
/// `promtool check metrics` where Debian's prometheus package is installed.
@Suite("Metrics endpoint", .serialized)
struct MetricsTests {
    /// A single node: save series, the HTTP the endpoint answers, and that no
    /// bad, slow or vanished client stops it.
    @Test func aSingleNodeReportsItsSavesAndSurvivesBadClients() throws {
        let daemon = try DaemonProcess(keep: 2, extraArguments: ["--metrics-listen", "127.0.0.1:0"])
        let endpoint = try #require(metricsEndpoint(inLog: daemon.log()), "no metrics address in the ready line:\n\(daemon.log())")
        let job = try JobID("metrics-job")
        let sizes: [(String, DType, Int)] = [("rng", .bytes, 16), ("w", .float32, 3 << 20)]
        // One session per rank for all steps: a new one could race the previous one's close (duplicateRank).
        let clients = try (0..<2).map { try daemon.unixClient(job: job, rank: $0, world: 2) }
        for step: Step in 1...3 {
            try concurrently(0..<2) { rank in
                let client = clients[Int(rank)]
                try client.save(step: step, tensors: tensors(step: step, rank: rank, sizes: sizes))
                _ = try client.waitCommitted(step: step)
            }
        }
        let scrape = try Scrape(endpoint)
        let status = try OperatorClient(endpoint: .unix(path: daemon.socketPath)).status()
        // Two ranks, two steps kept of three.
        let shardBytes = 2 * 2 * (try segmentBytes(sizes))
        try scrape.expect("snapshotd_build_info{version=\"\(status.daemonVersion)\"}", 1)
        try scrape.expect("snapshotd_memory_budget_bytes", Double(2 << 30))
        try scrape.expect("snapshotd_held_bytes{training_job=\"metrics-job\",kind=\"shard\"}", Double(shardBytes))
        try scrape.expect("snapshotd_held_bytes{training_job=\"metrics-job\",kind=\"parity\"}", 0)
        #expect(status.usedBytes == shardBytes)
        try scrape.expect("snapshotd_snapshots{training_job=\"metrics-job\",state=\"committed\"}", 2)
        try scrape.expect("snapshotd_snapshots{training_job=\"metrics-job\",state=\"in_progress\"}", 0)
        try scrape.expect("snapshotd_protection_lag_steps{training_job=\"metrics-job\"}", 0)
        try scrape.expect("snapshotd_save_staging_duration_seconds_count", 6)
        try scrape.expect("snapshotd_save_commit_duration_seconds_count", 6)
        try scrape.expect("snapshotd_protection_duration_seconds_count", 0)
        try scrape.expect("snapshotd_flush_duration_seconds_count", 0)
        try scrape.expect("snapshotd_crc_failures_total", 0)
        try scrape.expect("snapshotd_quarantined_files_total", 0)
        try scrape.expect("snapshotd_rebuilds_total", 0)
        #expect(!scrape.text.contains("snapshotd_peer_up"), "a single node has no peers")
        try scrape.expectCumulativeBuckets("snapshotd_save_staging_duration_seconds")
        try scrape.expectCumulativeBuckets("snapshotd_save_commit_duration_seconds")
        #expect(scrape.contentType == "text/plain; version=0.0.4; charset=utf-8")
        try promtoolAccepts(scrape.text, "single node")

        // Wrong paths, methods and bytes get their status, never the daemon's attention for long.
        #expect(try httpExchange(endpoint, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").status == 404)
        #expect(try httpExchange(endpoint, "POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").status == 405)
        #expect(try httpExchange(endpoint, "\u{16}\u{03}\u{01}\u{02}\u{00}\r\n\r\n").status == 400)
        #expect(try httpExchange(endpoint, "GET /metrics HTTP/1.1\r\nX-Long: " + String(repeating: "a", count: 16 << 10) + "\r\n\r\n").status == 431)
        // A client that connects and says nothing holds the one-at-a-time endpoint
        // for the request deadline (2 s) at most: a scrape behind it is answered.
        let silent = try Socket.connectTCP(host: endpoint.host, port: endpoint.port)
        let half = try Socket.connectTCP(host: endpoint.host, port: endpoint.port)
        try half.writeAll(Array("GET /metr".utf8), deadlineMilliseconds: monotonicMilliseconds() + 1000)
        half.close()
        let started = Date()
        let behind = try Scrape(endpoint, timeoutSeconds: 8)
        #expect(Date().timeIntervalSince(started) < 6, "the scrape waited \(Date().timeIntervalSince(started)) s")
        try behind.expect("snapshotd_snapshots{training_job=\"metrics-job\",state=\"committed\"}", 2)
        silent.close()
        #expect(daemon.isRunning)
        try Scrape(endpoint).expect("snapshotd_save_staging_duration_seconds_count", 6)
    }

    /// A cluster: every node's held bytes, snapshots and latency counts after
    /// two saved steps; a peer seen down and up again; the replacement's
    /// rebuild counted in steps and in exactly the bytes it then holds.
    @Test func aClusterReportsProtectionPeersAndRebuilds() throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1, settings: ["METRICS_PORT": "0"])
        try cluster.saveStep(1)
        try cluster.saveStep(2)
        func shardBytes(on node: Int) throws -> UInt64 {
            try cluster.ranks(on: node).reduce(0) { $0 + 2 * (try segmentBytes(cluster.sizes(for: $1, base: LocalCluster.sizes))) }
        }
        var parityTotal: UInt64 = 0
        for node in 0..<3 {
            let scrape = try Scrape(try clusterEndpoint(cluster, node))
            let status = try cluster.operatorClient(node).status()
            let shards = try shardBytes(on: node)
            try scrape.expect("snapshotd_held_bytes{training_job=\"cluster-job\",kind=\"shard\"}", Double(shards), node: node)
            try scrape.expect("snapshotd_held_bytes{training_job=\"cluster-job\",kind=\"parity\"}", Double(status.usedBytes - shards), node: node)
            parityTotal += status.usedBytes - shards
            try scrape.expect("snapshotd_memory_budget_bytes", Double(1 << 30), node: node)
            try scrape.expect("snapshotd_snapshots{training_job=\"cluster-job\",state=\"committed\"}", 2, node: node)
            try scrape.expect("snapshotd_snapshots{training_job=\"cluster-job\",state=\"in_progress\"}", 0, node: node)
            try scrape.expect("snapshotd_protection_lag_steps{training_job=\"cluster-job\"}", 0, node: node)
            try scrape.expect("snapshotd_save_staging_duration_seconds_count", 4, node: node)  // two ranks, two steps
            try scrape.expect("snapshotd_save_commit_duration_seconds_count", 4, node: node)
            try scrape.expect("snapshotd_protection_duration_seconds_count", 2, node: node)  // one per step
            try scrape.expectCumulativeBuckets("snapshotd_protection_duration_seconds", node: node)
            for peer in 0..<3 where peer != node { try scrape.expect("snapshotd_peer_up{node=\"\(peer)\"}", 1, node: node) }
            #expect(!scrape.text.contains("snapshotd_peer_up{node=\"\(node)\"}"), "node \(node) lists itself as a peer")
            try scrape.expect("snapshotd_rebuilds_total", 0, node: node)
            try scrape.expect("snapshotd_crc_failures_total", 0, node: node)
            #expect(!scrape.text.contains("step="), "a step number as a label")
            try promtoolAccepts(scrape.text, "node \(node) after saves")
        }
        #expect(parityTotal > 0, "RS(2,1) keeps parity somewhere")

        try cluster.kill(2)
        try cluster.waitForReport(from: 0, seconds: 30) { $0.deadNodes.contains(2) }
        let survivor = try Scrape(try clusterEndpoint(cluster, 0))
        try survivor.expect("snapshotd_peer_up{node=\"2\"}", 0, node: 0)
        try survivor.expect("snapshotd_peer_up{node=\"1\"}", 1, node: 0)
        #expect(try survivor.value("snapshotd_peers_declared_dead_total") ?? 0 >= 1)

        try cluster.replace(2)
        try cluster.waitUntilRebuilt([2], observer: 0)
        let rebuilt = try Scrape(try clusterEndpoint(cluster, 2))
        let shards = try rebuilt.require("snapshotd_held_bytes{training_job=\"cluster-job\",kind=\"shard\"}")
        let parity = try rebuilt.require("snapshotd_held_bytes{training_job=\"cluster-job\",kind=\"parity\"}")
        #expect(shards == Double(try shardBytes(on: 2)), "the replacement holds what node 2 held")
        try rebuilt.expect("snapshotd_rebuilds_total", 2, node: 2)  // steps 1 and 2
        try rebuilt.expect("snapshotd_rebuilt_bytes_total", shards + parity, node: 2)
        try rebuilt.expect("snapshotd_snapshots{training_job=\"cluster-job\",state=\"committed\"}", 2, node: 2)
        try rebuilt.expect("snapshotd_save_staging_duration_seconds_count", 0, node: 2)  // a fresh process saved nothing
        try rebuilt.expect("snapshotd_crc_failures_total", 0, node: 2)
        try promtoolAccepts(rebuilt.text, "node 2 after its rebuild")
        try Scrape(try clusterEndpoint(cluster, 0)).expect("snapshotd_peer_up{node=\"2\"}", 1, node: 0)
    }

    // MARK: Helpers

    /// A node's metrics address: its newest "snapshotd ready" line (a
    /// replacement appends to the log of the node it replaces).
    func clusterEndpoint(_ cluster: LocalCluster, _ node: Int) throws -> (host: String, port: UInt16) {
        try #require(metricsEndpoint(inLog: cluster.log(node)), "node \(node) logged no metrics address")
    }

    func segmentBytes(_ sizes: [(String, DType, Int)]) throws -> UInt64 {
        let specs = try sizes.map { name, dtype, bytes in
            try TensorSpec(name: name, dtype: dtype, shape: [Int64(bytes) / Int64(dtype.elementSizeBytes)], kind: .parameter)
        }
        return try #require(SegmentLayout.offsets(for: specs)).segmentSizeBytes
    }

    /// Runs `promtool check metrics` on the text, if promtool is installed
    /// (Debian: prometheus); says so when it is not.
    func promtoolAccepts(_ text: String, _ what: String) throws {
        guard let promtool = executableOnPath("promtool") else {
            print("[MetricsTests] promtool check skipped (\(what)): promtool is not on PATH (Debian package prometheus, deploy/install-build-deps.sh)")
            return
        }
        let scratch = try makeScratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        try text.write(toFile: scratch + "/metrics.txt", atomically: true, encoding: .utf8)
        let status = try spawnAndWait(["/bin/sh", "-c", "'\(promtool)' check metrics < '\(scratch)/metrics.txt' > '\(scratch)/out' 2>&1"])
        let output = (try? String(contentsOfFile: scratch + "/out", encoding: .utf8)) ?? ""
        #expect(status == 0, "promtool check metrics (\(what)) exited \(status): \(output)")
        #expect(output.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "promtool check metrics (\(what)) says: \(output)")
    }
}

/// The `metrics=host:port` of the newest "snapshotd ready" line in a log.
func metricsEndpoint(inLog log: String) -> (host: String, port: UInt16)? {
    guard let line = log.split(separator: "\n").last(where: { $0.contains("snapshotd ready") }),
        let address = logField(line, "metrics"), let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...])
    else { return nil }
    return (String(address[..<colon]), port)
}

func executableOnPath(_ name: String) -> String? {
    (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":")
        .map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// One HTTP exchange over a fresh TCP connection: the request as given, the
/// response read until the server closes.
func httpExchange(_ endpoint: (host: String, port: UInt16), _ request: String, timeoutSeconds: Double = 5) throws -> (status: Int, head: String, body: String) {
    let socket = try Socket.connectTCP(host: endpoint.host, port: endpoint.port, timeoutMilliseconds: 2000)
    defer { socket.close() }
    let deadline = monotonicMilliseconds() + Int64(timeoutSeconds * 1000)
    try socket.writeAll(Array(request.utf8), deadlineMilliseconds: deadline)
    var response: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 64 << 10)
    while true {
        try socket.waitReadable(until: deadline)
        let count = try chunk.withUnsafeMutableBytes { try socket.readSome(into: $0.baseAddress!, count: $0.count) }
        if count == 0 { break }
        response += chunk[..<count]
    }
    let text = String(decoding: response, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n") else { throw HarnessError("no HTTP head in: \(text.prefix(200))") }
    let head = String(text[..<split.lowerBound])
    let parts = head.split(separator: " ", maxSplits: 2)
    guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]) else { throw HarnessError("bad status line: \(head.prefix(100))") }
    return (status, head, String(text[split.upperBound...]))
}

/// One scrape of `GET /metrics`, and lookups of its series by exact name and labels.
struct Scrape {
    let text: String
    let contentType: String?

    init(_ endpoint: (host: String, port: UInt16), timeoutSeconds: Double = 5) throws {
        let (status, head, body) = try httpExchange(endpoint, "GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: text/plain\r\n\r\n", timeoutSeconds: timeoutSeconds)
        guard status == 200 else { throw HarnessError("GET /metrics answered \(status): \(body)") }
        text = body
        contentType = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-type:") }
            .map { $0.dropFirst("content-type:".count).trimmingCharacters(in: .whitespaces) }
        #expect(head.contains("\r\nContent-Length: \(body.utf8.count)\r\n"), "\(head)")
    }

    /// The value of the sample `series` (name and label set exactly as written).
    func value(_ series: String) throws -> Double? {
        let lines = text.split(separator: "\n").filter { $0.hasPrefix(series + " ") }
        guard lines.count <= 1 else { throw HarnessError("\(series) appears \(lines.count) times") }
        return lines.first.flatMap { Double($0.dropFirst(series.count + 1)) }
    }

    func require(_ series: String) throws -> Double {
        guard let value = try value(series) else { throw HarnessError("no sample \(series) in:\n\(text)") }
        return value
    }

    func expect(_ series: String, _ expected: Double, node: Int? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let actual = try value(series)
        #expect(actual == expected, "\(node.map { "node \($0): " } ?? "")\(series) is \(actual.map { "\($0)" } ?? "absent"), expected \(expected)", sourceLocation: sourceLocation)
    }

    /// Buckets never decrease, and `+Inf` equals `_count`.
    func expectCumulativeBuckets(_ name: String, node: Int? = nil) throws {
        let counts = text.split(separator: "\n").filter { $0.hasPrefix(name + "_bucket{") }.compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }
        #expect(!counts.isEmpty && counts == counts.sorted(), "\(node.map { "node \($0): " } ?? "")\(name) buckets \(counts)")
        #expect(try counts.last == value(name + "_count"), "\(name): +Inf bucket is not the count")
    }
}
