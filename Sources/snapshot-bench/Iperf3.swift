import Foundation
import Glibc

/// iperf3's single-stream TCP throughput, GB/s, or nil without iperf3. Each
/// end may run behind a prefix command (`local-cluster.sh exec DIR ID`, to
/// measure between two nodes' network namespaces).
func iperf3GigabytesPerSecond(
    seconds: Int = 3, address: String = "127.0.0.1", serverPrefix: [String] = [], clientPrefix: [String] = []
) -> Double? {
    guard let path = ["/usr/bin/iperf3", "/usr/local/bin/iperf3"].first(where: FileManager.default.isExecutableFile(atPath:)) else { return nil }
    let port = String(20_000 + Int(getpid()) % 20_000)
    let server = process(serverPrefix + [path, "-s", "-1", "-B", address, "-p", port])
    server.standardOutput = FileHandle.nullDevice
    server.standardError = FileHandle.nullDevice
    guard (try? server.run()) != nil else { return nil }
    defer { if server.isRunning { server.terminate() } }
    usleep(500_000)
    let client = process(clientPrefix + [path, "-c", address, "-p", port, "-t", "\(seconds)", "-J"])
    let output = Pipe()
    client.standardOutput = output
    client.standardError = FileHandle.nullDevice
    guard (try? client.run()) != nil else { return nil }
    let data = output.fileHandleForReading.readDataToEndOfFile()
    client.waitUntilExit()
    guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
        let end = json["end"] as? [String: Any], let received = end["sum_received"] as? [String: Any],
        let bits = received["bits_per_second"] as? Double
    else { return nil }
    return bits / 8 / 1e9
}

private func process(_ command: [String]) -> Process {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: command[0])
    process.arguments = Array(command.dropFirst())
    return process
}
