public import ErasureCoding
public import SnapshotProtocol

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

    public func node(_ id: NodeID) -> Node? { nodes.first { $0.id == id } }
    public func group(of id: NodeID) -> Group? { groups.first { $0.nodes.contains(id) } }
    public var nodeIDs: [NodeID] { nodes.map(\.id).sorted() }
}
