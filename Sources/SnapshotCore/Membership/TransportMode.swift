/// How a node reaches its peers, and how peers reach a node: over TCP, over
/// RDMA (refusing a TCP fallback), or RDMA where a device answers and TCP
/// otherwise.
public enum TransportMode: String, Sendable, CaseIterable {
    case tcp, rdma, auto
}
