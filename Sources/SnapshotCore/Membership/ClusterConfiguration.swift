import ErasureCoding
import Foundation
public import SnapshotProtocol
import TOMLKit

/// The static cluster file (docs/operations.md, "A cluster"): nodes, their peer
/// addresses, protection groups, and failure-detection timing.
///
///     heartbeat_interval_ms = 200
///     failure_timeout_ms = 2000
///     repair = "pipelined"        # or "gather"
///     [[node]]
///     id = 0
///     address = "10.0.0.1:7070"
///     transport = "auto"         # how peers reach it: "tcp", "rdma" or "auto" (default)
///     [[group]]
///     nodes = [0, 1, 2, 3, 4, 5]
///     parity = 2
public struct ClusterConfiguration: Sendable, Equatable {
    public struct Node: Sendable, Equatable {
        public let id: NodeID
        public let host: String
        public let port: UInt16
        /// How peers reach this node (when they themselves use RDMA): `tcp`
        /// for a node without an RDMA device, `rdma` to refuse a TCP fallback.
        public let transport: TransportMode
        public var address: String { "\(host):\(port)" }

        public init(id: NodeID, host: String, port: UInt16, transport: TransportMode = .auto) {
            self.id = id
            self.host = host
            self.port = port
            self.transport = transport
        }
    }

    public struct Group: Sendable, Equatable {
        public let index: Int
        /// Members in layout order: position p in this list is node index p of the StripeLayout.
        public let nodes: [NodeID]
        public let parity: Int
        public let layout: StripeLayout

        public func position(of node: NodeID) -> Int? { nodes.firstIndex(of: node) }

        /// Checks that RS(n − m, m) over these nodes exists (0 ≤ m < n ≤ 255).
        public init(index: Int, nodes: [NodeID], parity: Int) throws {
            guard parity >= 0 else { throw ConfigurationError("cluster file: group \(index) has negative parity") }
            guard parity < nodes.count else {
                throw ConfigurationError("cluster file: group \(index) has parity m = \(parity) ≥ n = \(nodes.count); need m < n")
            }
            do {
                layout = try StripeLayout(groupSize: nodes.count, parityCount: parity)
            } catch {
                throw ConfigurationError("cluster file: group \(index) (\(nodes.count) nodes, parity \(parity)): \(error); need 0 ≤ parity < nodes ≤ \(ReedSolomon.maximumTotalFragments)")
            }
            self.index = index
            self.nodes = nodes
            self.parity = parity
        }
    }

    /// How a replacement rebuilds a fragment from k survivors.
    public enum RepairStrategy: String, Sendable, CaseIterable {
        /// The survivors pass a running partial sum along a chain
        /// (`RepairPipeline.swift`): each link carries one fragment's worth.
        case pipelined
        /// The replacement fetches k whole fragments and decodes: its own link
        /// carries k× the bytes it rebuilds. Kept as the fallback and for comparison.
        case gather
    }

    public let nodes: [Node]
    public let groups: [Group]
    public let repair: RepairStrategy
    public let heartbeatIntervalMilliseconds: Int64
    public let failureTimeoutMilliseconds: Int64

    public init(nodes: [Node], groups: [Group], heartbeatIntervalMilliseconds: Int64 = Limits.defaultHeartbeatIntervalMilliseconds,
        failureTimeoutMilliseconds: Int64 = Limits.defaultFailureTimeoutMilliseconds, repair: RepairStrategy = .pipelined) throws {
        var seen = Set<NodeID>()
        for node in nodes where !seen.insert(node.id).inserted {
            throw ConfigurationError("cluster file: node id \(node.id) appears twice")
        }
        guard !nodes.isEmpty else { throw ConfigurationError("cluster file: no [[node]] entries") }
        var grouped = Set<NodeID>()
        for group in groups {
            guard group.nodes.count <= nodes.count else {
                throw ConfigurationError("cluster file: group \(group.index) has \(group.nodes.count) nodes, the cluster only \(nodes.count)")
            }
            for id in group.nodes {
                guard seen.contains(id) else { throw ConfigurationError("cluster file: group \(group.index) names unknown node \(id)") }
                guard grouped.insert(id).inserted else { throw ConfigurationError("cluster file: node \(id) is in more than one group") }
            }
        }
        for node in nodes where !grouped.contains(node.id) {
            throw ConfigurationError("cluster file: node \(node.id) is in no protection group")
        }
        guard Limits.heartbeatIntervalMilliseconds.contains(heartbeatIntervalMilliseconds) else {
            throw ConfigurationError("cluster file: heartbeat_interval_ms = \(heartbeatIntervalMilliseconds) is outside \(Limits.heartbeatIntervalMilliseconds)")
        }
        guard Limits.failureTimeoutMilliseconds.contains(failureTimeoutMilliseconds) else {
            throw ConfigurationError("cluster file: failure_timeout_ms = \(failureTimeoutMilliseconds) is outside \(Limits.failureTimeoutMilliseconds)")
        }
        // A node must hear at least two heartbeats of a live peer within the
        // timeout, or one lost beat is a false death.
        guard failureTimeoutMilliseconds > 2 * heartbeatIntervalMilliseconds else {
            throw ConfigurationError("cluster file: failure_timeout_ms (\(failureTimeoutMilliseconds)) must exceed twice heartbeat_interval_ms (\(heartbeatIntervalMilliseconds)); raise failure_timeout_ms or lower heartbeat_interval_ms")
        }
        guard nodes.count <= Limits.maximumNodes else {
            throw ConfigurationError("cluster file: \(nodes.count) nodes; at most \(Limits.maximumNodes) are supported (each peer has a heartbeat thread)")
        }
        self.nodes = nodes
        self.groups = groups
        self.heartbeatIntervalMilliseconds = heartbeatIntervalMilliseconds
        self.failureTimeoutMilliseconds = failureTimeoutMilliseconds
        self.repair = repair
    }

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
            heartbeatIntervalMilliseconds: Int64(try integer(table, "heartbeat_interval_ms") ?? 200),
            failureTimeoutMilliseconds: Int64(try integer(table, "failure_timeout_ms") ?? 2000), repair: repair)
    }

    private static func integer(_ table: TOMLTable, _ key: String) throws -> Int? {
        guard let value = table[key] else { return nil }
        guard let number = value.int else { throw ConfigurationError("cluster file: \(key) must be an integer") }
        return number
    }

    public func node(_ id: NodeID) -> Node? { nodes.first { $0.id == id } }
    public func group(of id: NodeID) -> Group? { groups.first { $0.nodes.contains(id) } }
    public var nodeIDs: [NodeID] { nodes.map(\.id).sorted() }
}
