/// `transport = tcp | rdma | auto`: which transport peers and remote clients
/// use, decided once at start from the configuration and the RDMA devices
/// the verbs library sees (pure: devices in, decision out).
public enum TransportMode: String, Sendable, CaseIterable {
    case tcp, rdma, auto
}

enum TransportSelection {
    /// What the daemon uses, and the one line it logs about it.
    struct Decision: Equatable {
        let used: TransportMode
        let logLine: String
    }

    /// The RDMA data path is not built yet (README, "Not built yet"): until
    /// it is, `auto` always falls back to TCP and `rdma` is refused, with
    /// the reason, instead of pretending.
    static let rdmaDataPathBuilt = false

    static func decide(_ mode: TransportMode, devices: [RDMADevices.Device]) throws -> Decision {
        let names = devices.map { "\($0.name) (active ports \($0.activePorts))" }.joined(separator: ", ")
        switch mode {
        case .tcp:
            return Decision(used: .tcp, logLine: "transport tcp: peers and remote clients use TCP")
        case .rdma:
            guard !devices.isEmpty else {
                throw ConfigurationError(
                    "transport = \"rdma\" but this machine has no RDMA device (the verbs library lists none): load the device's driver (or rdma_rxe), or set transport = \"auto\" or \"tcp\"")
            }
            guard rdmaDataPathBuilt else {
                throw ConfigurationError("transport = \"rdma\": RDMA devices \(names) are present, but this build has no RDMA data path yet; set transport = \"auto\" or \"tcp\"")
            }
            return Decision(used: .rdma, logLine: "transport rdma: peers and remote clients use RDMA on \(names)")
        case .auto:
            if devices.isEmpty {
                return Decision(used: .tcp, logLine: "transport auto: no RDMA device on this machine; falling back to TCP for peers and remote clients")
            }
            guard rdmaDataPathBuilt else {
                return Decision(used: .tcp, logLine: "transport auto: RDMA devices \(names) found, but this build has no RDMA data path yet; falling back to TCP")
            }
            return Decision(used: .rdma, logLine: "transport auto: RDMA devices \(names) found; peers and remote clients use RDMA, TCP where a peer does not answer over RDMA")
        }
    }
}
