import Foundation
import SnapshotCore

/// Where a node learns who is in the cluster: node ids, addresses, protection
/// groups and failure-detection timing, as one checked
/// ``ClusterConfiguration`` value. Everything downstream (the monitor, the
/// protection machine, the peer mesh, the data path) consumes only that
/// value, so a backend on etcd (or any store with a watch) can replace the
/// static file here without touching them. A dynamic backend would add a
/// change stream; the machines would take it as an event, as they take
/// heartbeats.
public protocol MembershipBackend: Sendable {
    /// The membership in force, checked (ranges, group layouts).
    func load() throws -> ClusterConfiguration
    /// Where it comes from, for logs and errors.
    var source: String { get }
}

/// The membership is a TOML file every node is given (docs/operations.md, "A cluster").
public struct StaticClusterFile: MembershipBackend {
    public let path: String

    public init(path: String) { self.path = path }

    public var source: String { "cluster file \(path)" }

    public func load() throws -> ClusterConfiguration {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ConfigurationError("cannot read cluster file \(path)")
        }
        return try ClusterConfiguration.load(tomlText: text)
    }
}
