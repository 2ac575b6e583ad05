import CRDMA
import SnapshotCore

/// What the verbs library can see. On machines without RDMA hardware (or
/// without the kernel modules) this is empty and the daemon uses TCP; the
/// daemon logs that choice at start.
public enum RDMADevices {
    public struct Device: Hashable, Sendable {
        public let name: String
        public let activePorts: [UInt8]
    }

    /// Devices with at least their name; ports are probed with ibv_query_port
    /// (through the C shim, as the header defines it as a macro).
    public static func list() -> [Device] {
        var count: Int32 = 0
        guard let devices = ibv_get_device_list(&count) else { return [] }
        defer { ibv_free_device_list(devices) }
        var result: [Device] = []
        for index in 0..<Int(count) {
            guard let device = devices[index] else { continue }
            let name = String(cString: ibv_get_device_name(device))
            result.append(Device(name: name, activePorts: activePorts(device)))
        }
        return result
    }

    private static func activePorts(_ device: UnsafeMutablePointer<ibv_device>) -> [UInt8] {
        guard let context = ibv_open_device(device) else { return [] }
        defer { ibv_close_device(context) }
        var deviceAttributes = ibv_device_attr()
        guard ibv_query_device(context, &deviceAttributes) == 0 else { return [] }
        var ports: [UInt8] = []
        for port in 1...max(1, UInt8(deviceAttributes.phys_port_cnt)) {
            var attributes = ibv_port_attr()
            if snapshotd_ibv_query_port(context, port, &attributes) == 0, attributes.state == IBV_PORT_ACTIVE {
                ports.append(port)
            }
        }
        return ports
    }
}
