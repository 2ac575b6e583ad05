import Foundation
@testable import SnapshotCore
@testable import SnapshotDaemon
import SnapshotProtocol
import Testing

@Suite("Configuration")
struct ConfigurationTests {
    @Test func parsesTOML() throws {
        let config = try DaemonConfiguration.load(tomlText: """
            node_id = 3
            unix_socket = "/tmp/x.sock"
            tcp_listen = "127.0.0.1:7070"
            arena_directory = "/dev/shm/a"
            memory_budget = "1.5GiB"
            snapshots_kept_per_job = 3
            shared_secret_file = "/etc/snapshotd/secret"
            log_level = "debug"
            metrics_listen = "127.0.0.1:9464"
            """)
        #expect(config.nodeID == 3)
        #expect(config.metricsListen == "127.0.0.1:9464")
        #expect(config.memoryBudgetBytes == 1_610_612_736)
        #expect(config.snapshotsKeptPerJob == 3)
        #expect(config.logLevel == .debug)
        #expect(throws: Never.self) { try config.validate() }
    }

    /// The example shipped in deploy/ must load and validate as it is.
    @Test func shippedExampleConfigurationLoads() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path + "/deploy/snapshotd.toml"
        let config = try DaemonConfiguration.load(tomlText: try String(contentsOfFile: path, encoding: .utf8))
        #expect(config.memoryBudgetBytes == 64 << 30)
        #expect(config.tcpListen == "127.0.0.1:7070", "the shipped config listens on loopback unless told otherwise")
        #expect(config.metricsListen == "127.0.0.1:9464", "metrics on loopback too")
        #expect(throws: Never.self) { try config.validate() }
        // The local one, for trying it out, needs no secret and no TCP.
        let localPath = URL(fileURLWithPath: path).deletingLastPathComponent().path + "/snapshotd-local.toml"
        let local = try DaemonConfiguration.load(tomlText: try String(contentsOfFile: localPath, encoding: .utf8))
        #expect(local.tcpListen == nil && local.sharedSecretFile == nil)
        #expect(throws: Never.self) { try local.validate() }
    }

    @Test func rejectsMistakes() throws {
        #expect(throws: ConfigurationError.self) { try DaemonConfiguration.load(tomlText: "memroy_budget = \"1GiB\"") }
        #expect(throws: ConfigurationError.self) { try DaemonConfiguration.parseByteSize("lots") }
        var config = DaemonConfiguration()
        config.tcpListen = "0.0.0.0:7070"
        #expect(throws: ConfigurationError.self) { try config.validate() }
        config.sharedSecretFile = "/s"
        config.snapshotsKeptPerJob = 0
        #expect(throws: ConfigurationError.self) { try config.validate() }
    }

    @Test func rdmaDeviceListingLinksAndAnswers() {
        // No RDMA hardware on CI: the list is empty, and the call must not crash.
        for device in RDMADevices.list() { #expect(!device.name.isEmpty) }
    }
}

@Suite("Cluster file")
struct ClusterFileTests {
    @Test func clusterFileValidation() throws {
        let valid = """
            heartbeat_interval_ms = 100
            failure_timeout_ms = 1000
            [[node]]
            id = 0
            address = "127.0.0.10:7400"
            [[node]]
            id = 1
            address = "127.0.0.11:7401"
            [[group]]
            nodes = [0, 1]
            parity = 1
            """
        let config = try ClusterConfiguration.load(tomlText: valid)
        #expect(config.nodeIDs == [0, 1] && config.groups[0].parity == 1)
        let duplicate = valid.replacingOccurrences(of: "id = 1", with: "id = 0")
        #expect(loadError(duplicate)?.contains("appears twice") == true)
        let parityTooLarge = valid.replacingOccurrences(of: "parity = 1", with: "parity = 2")
        #expect(loadError(parityTooLarge)?.contains("m = 2 ≥ n = 2") == true)
        let tooLarge = valid.replacingOccurrences(of: "nodes = [0, 1]", with: "nodes = [0, 1, 2]")
        #expect(loadError(tooLarge)?.contains("only 2") == true)
        let unknown = valid.replacingOccurrences(of: "nodes = [0, 1]", with: "nodes = [0, 5]")
        #expect(loadError(unknown)?.contains("unknown node 5") == true)
        #expect(config.repair == .pipelined, "pipelined repair is the default")
        let gather = try ClusterConfiguration.load(tomlText: "repair = \"gather\"\n" + valid)
        #expect(gather.repair == .gather)
        #expect(loadError("repair = \"fast\"\n" + valid)?.contains("repair must be one of \"pipelined\", \"gather\"") == true)
        // How peers reach a node: auto unless its entry says otherwise.
        #expect(config.nodes.map(\.transport) == [.auto, .auto])
        let pinned = try ClusterConfiguration.load(tomlText: valid.replacingOccurrences(of: "address = \"127.0.0.11:7401\"", with: "address = \"127.0.0.11:7401\"\ntransport = \"tcp\""))
        #expect(pinned.nodes.map(\.transport) == [.auto, .tcp])
        let badTransport = valid.replacingOccurrences(of: "address = \"127.0.0.11:7401\"", with: "address = \"127.0.0.11:7401\"\ntransport = \"ib\"")
        #expect(loadError(badTransport) == "cluster file: node 1: transport = \"ib\" is not one of \"tcp\", \"rdma\", \"auto\"")
        let misspelt = valid.replacingOccurrences(of: "address = \"127.0.0.11:7401\"", with: "address = \"127.0.0.11:7401\"\ntransprot = \"tcp\"")
        #expect(loadError(misspelt) == "cluster file: node 1 has unknown key 'transprot'")
    }
}

func loadError(_ text: String) -> String? {
    do {
        _ = try ClusterConfiguration.load(tomlText: text)
        return nil
    } catch {
        return "\(error)"
    }
}
