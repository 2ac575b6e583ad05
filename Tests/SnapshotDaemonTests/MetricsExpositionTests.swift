import Foundation
import SnapshotProtocol
import Testing

@testable import SnapshotCore
@testable import SnapshotDaemon

/// The Prometheus side of the daemon without sockets: the text format
/// byte for byte, the histograms, the gauges read from a store, the timers'
/// bounds, and the little HTTP the endpoint parses.
@Suite("Metrics: exposition, gauges, HTTP")
struct MetricsExpositionTests {
    @Test func aSmallRegistryRendersExactly() {
        let histogram = Histogram(upperBoundsSeconds: [0.1, 1])
        for seconds in [0.05, 0.1, 0.5, 3] { histogram.observe(seconds: seconds) }  // 0.1 is on a bound: it counts there
        let text = MetricsExposition.render([
            .counter("snapshotd_things_total", "Things done.", [MetricSample(.unsigned(7))]),
            .gauge("snapshotd_held_bytes", "Bytes held.", [
                MetricSample([MetricLabel("job", "a"), MetricLabel("kind", "shard")], .unsigned(1 << 60)),
                MetricSample([MetricLabel("job", "a"), MetricLabel("kind", "parity")], .unsigned(0)),
            ]),
            .gauge("snapshotd_empty", "No samples yet.", []),
            .histogram("snapshotd_wait_seconds", "Waits.", [histogram.sample()]),
        ])
        #expect(text == """
            # HELP snapshotd_things_total Things done.
            # TYPE snapshotd_things_total counter
            snapshotd_things_total 7
            # HELP snapshotd_held_bytes Bytes held.
            # TYPE snapshotd_held_bytes gauge
            snapshotd_held_bytes{job="a",kind="shard"} 1152921504606846976
            snapshotd_held_bytes{job="a",kind="parity"} 0
            # HELP snapshotd_empty No samples yet.
            # TYPE snapshotd_empty gauge
            # HELP snapshotd_wait_seconds Waits.
            # TYPE snapshotd_wait_seconds histogram
            snapshotd_wait_seconds_bucket{le="0.1"} 2
            snapshotd_wait_seconds_bucket{le="1"} 3
            snapshotd_wait_seconds_bucket{le="+Inf"} 4
            snapshotd_wait_seconds_sum 3.65
            snapshotd_wait_seconds_count 4

            """)
    }

    @Test func histogramBucketsAreCumulativeAndEndAtTheCount() {
        let histogram = Histogram(upperBoundsSeconds: MetricsRegistry.saveBoundsSeconds)
        let observations = [0.0001, 0.0007, 0.003, 0.003, 0.2, 7, 7, 1000, -1, .nan]
        for seconds in observations { histogram.observe(seconds: seconds) }
        let text = MetricsExposition.render([.histogram("snapshotd_x_seconds", "X.", [histogram.sample(labels: [MetricLabel("job", "j")])])])
        let buckets = text.split(separator: "\n").filter { $0.hasPrefix("snapshotd_x_seconds_bucket") }
        #expect(buckets.count == MetricsRegistry.saveBoundsSeconds.count + 1)
        let counts = buckets.compactMap { $0.split(separator: " ").last.flatMap { UInt64($0) } }
        #expect(counts == counts.sorted(), "cumulative counts never decrease: \(counts)")
        #expect(buckets.first == "snapshotd_x_seconds_bucket{job=\"j\",le=\"0.0005\"} 3", "0.0001, -1 and NaN (as 0)")
        #expect(buckets.last == "snapshotd_x_seconds_bucket{job=\"j\",le=\"+Inf\"} \(observations.count)")
        #expect(text.contains("snapshotd_x_seconds_bucket{job=\"j\",le=\"300\"} 9\n"), "only 1000 s is above the last bound")
        #expect(text.contains("snapshotd_x_seconds_count{job=\"j\"} \(observations.count)\n"))
    }

    @Test func labelValuesAndHelpAreEscaped() {
        let text = MetricsExposition.render([
            .gauge("snapshotd_g", "A \\ backslash, a \"quote\"\nand a newline.", [MetricSample([MetricLabel("job", "a\\b\"c\nd")], .signed(-3))])
        ])
        #expect(text == """
            # HELP snapshotd_g A \\\\ backslash, a "quote"\\nand a newline.
            # TYPE snapshotd_g gauge
            snapshotd_g{job="a\\\\b\\"c\\nd"} -3

            """)
    }

    @Test func valuesAreWrittenAsTheFormatReadsThem() {
        #expect(MetricValue.double(1).text == "1")
        #expect(MetricValue.double(2.5).text == "2.5")
        #expect(MetricValue.double(0.0005).text == "0.0005")
        #expect(MetricValue.double(.nan).text == "NaN")
        #expect(MetricValue.double(.infinity).text == "+Inf")
        #expect(MetricValue.double(-.infinity).text == "-Inf")
        #expect(MetricValue.unsigned(.max).text == "18446744073709551615")
        #expect(MetricsExposition.isValidMetricName("snapshotd_a:b_1") && !MetricsExposition.isValidMetricName("1a") && !MetricsExposition.isValidMetricName("a-b"))
        #expect(MetricsExposition.isValidLabelName("job") && !MetricsExposition.isValidLabelName("__name") && !MetricsExposition.isValidLabelName("a:b"))
    }

    // MARK: The daemon's families

    @Test func theDaemonsFamiliesFollowPrometheusNaming() throws {
        let job = try JobID("train-7")
        let registry = MetricsRegistry()
        registry.recordFlush(seconds: 12)
        let gauges = NodeGauges(
            budgetBytes: 1 << 30,
            jobs: [NodeGauges.Job(job: job, shardBytes: 4 << 20, parityBytes: 2 << 20, inProgressSteps: 1, committedSteps: 2, protectionLagSteps: 100)],
            peers: [NodeGauges.Peer(node: 1, alive: true), NodeGauges.Peer(node: 2, alive: false)])
        let families = registry.families(gauges: gauges, counters: [(.rebuilds, 2), (.crcFailures, 0)], version: "9.9.9")
        let text = MetricsExposition.render(families)
        for line in [
            "snapshotd_build_info{version=\"9.9.9\"} 1",
            "snapshotd_memory_budget_bytes 1073741824",
            "snapshotd_held_bytes{training_job=\"train-7\",kind=\"shard\"} 4194304",
            "snapshotd_held_bytes{training_job=\"train-7\",kind=\"parity\"} 2097152",
            "snapshotd_snapshots{training_job=\"train-7\",state=\"in_progress\"} 1",
            "snapshotd_snapshots{training_job=\"train-7\",state=\"committed\"} 2",
            "snapshotd_protection_lag_steps{training_job=\"train-7\"} 100",
            "snapshotd_peer_up{node=\"1\"} 1",
            "snapshotd_peer_up{node=\"2\"} 0",
            "snapshotd_rebuilds_total 2",
            "snapshotd_crc_failures_total 0",
            "snapshotd_flush_duration_seconds_count 1",
            "snapshotd_save_staging_duration_seconds_count 0",
        ] {
            #expect(text.contains(line + "\n"), "missing: \(line)")
        }
        for family in families {
            #expect(family.name.hasPrefix("snapshotd_"))
            #expect(family.kind == .counter ? family.name.hasSuffix("_total") : !family.name.hasSuffix("_total"), "\(family.name)")
            #expect(family.kind != .histogram || family.name.hasSuffix("_seconds"), "\(family.name)")
            #expect(!family.help.isEmpty)
        }
        let labelNames = Set(text.split(separator: "\n").filter { !$0.hasPrefix("#") }.flatMap { line -> [String] in
            guard let open = line.firstIndex(of: "{"), let close = line.firstIndex(of: "}") else { return [] }
            return line[line.index(after: open)..<close].split(separator: ",").map { String($0.split(separator: "=")[0]) }
        })
        #expect(labelNames == ["version", "training_job", "kind", "state", "node", "le"], "never a step or tensor name: \(labelNames)")
        // A single node has no peers: no peer_up family at all.
        let single = MetricsExposition.render(registry.families(gauges: NodeGauges(budgetBytes: 1 << 30, jobs: [], peers: nil), counters: [], version: "1"))
        #expect(!single.contains("snapshotd_peer_up"))
    }

    @Test func everyCounterIsExportedWithHelp() {
        let families = MetricsRegistry().families(gauges: NodeGauges(budgetBytes: 1, jobs: [], peers: nil), counters: Counters().all, version: "1")
        let counters = families.filter { $0.kind == .counter }.map(\.name)
        #expect(counters == Counters.Name.allCases.map { "snapshotd_\($0.rawValue)_total" })
        #expect(counters.contains("snapshotd_quarantined_files_total") && counters.contains("snapshotd_rebuilt_bytes_total"))
    }

    /// Held bytes, steps by state and protection lag, read from a cluster
    /// node's store: one rank here, steps 10 and 20 sealed, 10 committed by
    /// the cluster, 30 still receiving, parity held for a peer.
    @Test func gaugesAreReadFromTheStore() throws {
        let job = try JobID("lagging")
        var store = SnapshotStore(budgetBytes: 64 << 20, snapshotsKeptPerJob: 2, commitsLocally: false)
        try store.attach(session: 1, job: job, rank: 3, world: 4, localWorld: 1)
        let spec = try TensorSpec.blob(name: "w", byteCount: 1000)
        for step: Step in [10, 20, 30] {
            let key = ShardKey(job: job, step: step, rank: 3)
            _ = try store.beginSave(session: 1, key: key, specs: [spec], topology: Topology())
            guard step != 30 else { continue }
            _ = try store.commit(session: 1, key: key, clientChecksums: nil, gradientNorm: nil, metadata: [])
            #expect(store.sealed(key: key, checksums: [0]).localComplete.count == 1)
        }
        var gauges = NodeGauges(state: NodeState(store: store))
        #expect(gauges.jobs.first?.protectionLagSteps == 0, "nothing committed yet: no lag to measure from")
        _ = store.markCommitted(job: job, step: 10, world: 4)
        _ = try store.reserveParity(ParityKey(job: job, step: 20, stripe: 0), row: 0, fragmentSizeBytes: 4096, world: 4)
        gauges = NodeGauges(state: NodeState(store: store))
        let mib: UInt64 = 1 << 20
        #expect(gauges == NodeGauges(
            budgetBytes: 64 << 20,
            jobs: [NodeGauges.Job(job: job, shardBytes: 3 * mib, parityBytes: mib, inProgressSteps: 2, committedSteps: 1, protectionLagSteps: 10)],
            peers: nil))
        #expect(gauges.jobs[0].shardBytes + gauges.jobs[0].parityBytes == store.heldBytes)
        _ = store.markCommitted(job: job, step: 20, world: 4)
        #expect(NodeGauges(state: NodeState(store: store)).jobs[0].protectionLagSteps == 0)
    }

    // MARK: Timers

    @Test func protectionIsTimedFromLocalCompleteToCommitAndTimersAreBounded() throws {
        let job = try JobID("j")
        let registry = MetricsRegistry()
        registry.protectionStarted(job: job, step: 1)
        registry.protectionStarted(job: job, step: 2)
        registry.protectionStarted(job: job, step: 3)
        registry.protectionFinished(job: job, step: 2)
        #expect(registry.protection.sample().count == 1)
        #expect(registry.pendingProtectionTimers == 1, "step 1 can no longer commit: forgotten; step 3 still timed")
        registry.protectionFinished(job: job, step: 7)  // committed without this node's share: nothing to observe
        #expect(registry.protection.sample().count == 1 && registry.pendingProtectionTimers == 0)
        for step in 0..<Step(Limits.metricsProtectionTimers + 10) { registry.protectionStarted(job: job, step: step) }
        #expect(registry.pendingProtectionTimers == Limits.metricsProtectionTimers)
        registry.protectionFinished(job: job, step: 5)
        #expect(registry.protection.sample().count == 1, "step 5 was among the oldest, dropped at the bound")
        registry.protectionFinished(job: job, step: Step(Limits.metricsProtectionTimers + 9))
        #expect(registry.protection.sample().count == 2 && registry.pendingProtectionTimers == 0)
    }

    // MARK: HTTP

    @Test func requestHeadsAreParsedAndRouted() {
        func route(_ text: String) -> MetricsHTTP.Route? { MetricsHTTP.route(MetricsHTTP.parseHead(Array(text.utf8))) }
        #expect(route("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n") == .metrics)
        #expect(route("GET /metrics?name[]=up HTTP/1.0\r\n\r\n") == .metrics)
        #expect(route("GET /metrics HTTP/1.1\n\n") == .metrics, "bare LFs from a lenient client")
        #expect(route("GET /metrics HTTP/1.1\r\nHost: x\r\n") == nil, "no blank line yet: read on")
        #expect(route("GET /met") == nil)
        #expect(route("GET / HTTP/1.1\r\n\r\n") == .notFound)
        #expect(route("GET /metricsx HTTP/1.1\r\n\r\n") == .notFound)
        #expect(route("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n") == .methodNotAllowed)
        #expect(route("HEAD /metrics HTTP/1.1\r\n\r\n") == .methodNotAllowed)
        #expect(route("GET /metrics\r\n\r\n") == .badRequest, "HTTP/0.9")
        #expect(route("GET  /metrics HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(route("\u{16}\u{03}\u{01}\r\n\r\n") == .badRequest, "TLS or other garbage")
        #expect(route("GET /metrics SSH-2.0\r\n\r\n") == .badRequest)
        let long = Array("GET /metrics HTTP/1.1\r\nX: \(String(repeating: "a", count: Limits.metricsRequestBytes))".utf8)
        #expect(MetricsHTTP.route(MetricsHTTP.parseHead(Array(long.prefix(Limits.metricsRequestBytes)))) == .tooLarge)
        #expect(MetricsHTTP.route(MetricsHTTP.parseHead(Array(long.prefix(Limits.metricsRequestBytes - 1)))) == nil)
        #expect(MetricsHTTP.parseHead(Array("GET /metrics HTTP/1.1\r\n\r\n".utf8), limitBytes: 10) == .tooLarge)
    }

    @Test func responsesCarryTheirLengthAndCloseTheConnection() throws {
        let body = "snapshotd_x 1\n"
        let ok = String(decoding: MetricsHTTP.response(.metrics, body: body), as: UTF8.self)
        #expect(ok == "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body)
        let refused = String(decoding: MetricsHTTP.response(.methodNotAllowed), as: UTF8.self)
        #expect(refused.hasPrefix("HTTP/1.1 405 Method Not Allowed\r\n") && refused.contains("\r\nAllow: GET\r\n") && refused.contains("\r\nConnection: close\r\n"))
        #expect(String(decoding: MetricsHTTP.response(.notFound), as: UTF8.self).hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(String(decoding: MetricsHTTP.response(.tooLarge), as: UTF8.self).hasPrefix("HTTP/1.1 431 "))
        #expect(String(decoding: MetricsHTTP.response(.badRequest), as: UTF8.self).hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
    }
}
