import SnapshotCore
/// `transport = tcp | rdma | auto`: which transport peers and remote clients
/// use, decided once at start from the configuration and the RDMA devices
/// the verbs library sees (pure: devices in, decision out).

enum TransportSelection {
    /// What the daemon uses, and the one line it logs about it.
    struct Decision: Equatable {
        let used: TransportMode
        let logLine: String
    }

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
            return Decision(used: .rdma, logLine: "transport rdma: peers and remote clients use RDMA on \(names)")
        case .auto:
            if devices.isEmpty {
                return Decision(used: .tcp, logLine: "transport auto: no RDMA device on this machine; falling back to TCP for peers and remote clients")
            }
            return Decision(used: .rdma, logLine: "transport auto: RDMA devices \(names) found; peers and remote clients use RDMA, TCP where a peer does not answer over RDMA")
        }
    }
}
