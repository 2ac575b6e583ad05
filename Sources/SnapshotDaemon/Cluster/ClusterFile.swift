import SnapshotCore
import SnapshotProtocol
import TOMLKit

/// The static cluster file in TOML (the format is documented on
/// ``ClusterConfiguration``): parsed here, at the edge, into the core's value.
extension ClusterConfiguration {
    public static func load(tomlText: String) throws -> ClusterConfiguration {
        let table = try TOMLTable(string: tomlText)
        for key in table.keys where !["node", "group", "heartbeat_interval_ms", "failure_timeout_ms", "repair"].contains(key) {
            throw ConfigurationError("cluster file: unknown key '\(key)'")
        }
        let nodes = try (table["node"]?.array ?? TOMLArray()).map { value -> Node in
            guard let entry = value.table, let id = entry["id"]?.int, let address = entry["address"]?.string else {
                throw ConfigurationError("cluster file: each [[node]] needs id and address")
            }
            guard let nodeID = NodeID(exactly: id) else { throw ConfigurationError("cluster file: node id \(id) out of range") }
            for key in entry.keys where !["id", "address", "transport"].contains(key) {
                throw ConfigurationError("cluster file: node \(id) has unknown key '\(key)'")
            }
            let (host, port) = try DaemonConfiguration.parseHostPort(address)
            let transport = try entry["transport"].map { value -> TransportMode in
                guard let text = value.string else { throw ConfigurationError("cluster file: node \(id) transport must be a string") }
                do {
                    return try DaemonConfiguration.parseTransport(text)
                } catch {
                    throw ConfigurationError("cluster file: node \(id): \(error)")
                }
            }
            return Node(id: nodeID, host: host, port: port, transport: transport ?? .auto)
        }
        let groups = try (table["group"]?.array ?? TOMLArray()).enumerated().map { index, value -> Group in
            guard let entry = value.table, let members = entry["nodes"]?.array, let parity = entry["parity"]?.int else {
                throw ConfigurationError("cluster file: each [[group]] needs nodes and parity")
            }
            let ids = try members.map { member -> NodeID in
                guard let id = member.int, let nodeID = NodeID(exactly: id) else { throw ConfigurationError("cluster file: group \(index) has a non-integer node") }
                return nodeID
            }
            return try Group(index: index, nodes: ids, parity: parity)
        }
        var repair = RepairStrategy.pipelined
        if let value = table["repair"] {
            guard let text = value.string, let strategy = RepairStrategy(rawValue: text) else {
                throw ConfigurationError("cluster file: repair must be one of \(RepairStrategy.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", "))")
            }
            repair = strategy
        }
        return try ClusterConfiguration(
            nodes: nodes, groups: groups,
            heartbeatIntervalMilliseconds: Int64(try integer(table, "heartbeat_interval_ms") ?? Int(Limits.defaultHeartbeatIntervalMilliseconds)),
            failureTimeoutMilliseconds: Int64(try integer(table, "failure_timeout_ms") ?? Int(Limits.defaultFailureTimeoutMilliseconds)), repair: repair)
    }

    private static func integer(_ table: TOMLTable, _ key: String) throws -> Int? {
        guard let value = table[key] else { return nil }
        guard let number = value.int else { throw ConfigurationError("cluster file: \(key) must be an integer") }
        return number
    }
}
