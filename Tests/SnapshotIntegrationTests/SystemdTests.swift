import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol
import Testing

/// The daemon under systemd's eyes, without systemd: the test binds its own
/// NOTIFY_SOCKET and reads what a real snapshotd tells it.
@Suite(.serialized) struct SystemdTests {
    /// A bound Unix datagram socket standing in for systemd's notify socket.
    final class NotifySocket {
        let path: String
        let fd: Int32

        init(directory: String) throws {
            path = directory + "/notify.sock"
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            guard fd >= 0 else { throw HarnessError("socket: \(errno)") }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard bound == 0 else { throw HarnessError("bind \(path): \(errno)") }
        }

        deinit { close(fd) }

        /// Every datagram that arrives within `seconds`, each as its lines.
        func receive(for seconds: Double) -> [[String]] {
            var messages: [[String]] = []
            let deadline = Date().addingTimeInterval(seconds)
            var buffer = [UInt8](repeating: 0, count: 4096)
            while case let left = deadline.timeIntervalSinceNow, left > 0 {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&poller, 1, Int32(left * 1000) + 1) > 0 else { continue }
                let count = recv(fd, &buffer, buffer.count, 0)
                if count > 0 { messages.append(String(decoding: buffer[0..<count], as: UTF8.self).split(separator: "\n").map(String.init)) }
            }
            return messages
        }

        /// Datagrams until one has a line starting with `prefix` (included), at most `seconds`.
        func receive(until prefix: String, seconds: Double) -> [[String]] {
            var messages: [[String]] = []
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                let batch = receive(for: 0.05)
                messages += batch
                if batch.contains(where: { $0.contains { $0.hasPrefix(prefix) } }) { break }
            }
            return messages
        }
    }

    @Test func readyComesAfterArenaRecoveryAndTheWatchdogBeatsOnlyWhileTheDaemonRuns() throws {
        let daemon = try DaemonProcess()
        // Something to recover: a committed step in the arena, then a crash.
        do {
            let client = try daemon.unixClient(job: try JobID("systemd-job"), rank: 0, world: 1)
            try client.save(step: 1, tensors: tensors(step: 1, rank: 0, sizes: [("w", .float32, 1 << 20)]))
            try client.waitCommitted(step: 1, timeoutMilliseconds: 30_000)
        }
        daemon.kill9()

        let notify = try NotifySocket(directory: daemon.scratch)
        daemon.environment = ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"]  // a beat every 200 ms
        try daemon.start()
        let start = notify.receive(until: "READY=1", seconds: 20)
        let lines = start.flatMap { $0 }
        let ready = try #require(start.firstIndex { $0.contains("READY=1") }, "no READY=1 in \(start)")
        let recovering = try #require(start.firstIndex { $0.contains { $0.hasPrefix("STATUS=recovering the arena") } }, "\(start)")
        #expect(recovering < ready, "READY=1 before arena recovery: \(start)")
        #expect(start[..<ready].flatMap { $0 }.filter { $0.hasPrefix("EXTEND_TIMEOUT_USEC=") }.count >= 2, "one extension before recovery, one per recovered step: \(start)")
        #expect(start[ready].contains { $0.hasPrefix("STATUS=serving 1 job(s) [systemd-job@1]") }, "\(start[ready])")
        #expect(!lines.contains("WATCHDOG=1") || lines.lastIndex(of: "WATCHDOG=1")! > lines.firstIndex(of: "READY=1")!)

        // Beats at half the interval, each with a status line.
        let running = notify.receive(for: 1.2)
        let beats = running.filter { $0.contains("WATCHDOG=1") }
        #expect(beats.count >= 4, "\(beats.count) beats in 1.2 s: \(running)")
        #expect(beats.allSatisfy { $0.contains { $0.hasPrefix("STATUS=serving") } })

        // Stopped, it says nothing; resumed, it beats again.
        let pid = try #require(daemon.pid)
        kill(pid, SIGSTOP)
        _ = notify.receive(for: 0.05)  // anything sent before the stop landed
        let stopped = notify.receive(for: 1.0)
        kill(pid, SIGCONT)
        #expect(stopped.filter { $0.contains("WATCHDOG=1") }.isEmpty, "beats while stopped: \(stopped)")
        #expect(notify.receive(until: "WATCHDOG=1", seconds: 2).contains { $0.contains("WATCHDOG=1") }, "no beat after SIGCONT")

        // A graceful stop says so.
        kill(pid, SIGTERM)
        #expect(notify.receive(until: "STOPPING=1", seconds: 10).contains { $0.contains("STOPPING=1") })
        daemon.process?.waitUntilExit()
    }

    @Test func systemdAcceptsTheUnit() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze") else {
            print("[systemdAcceptsTheUnit] skipped: systemd-analyze is not installed (Debian package systemd)")
            return
        }
        let directory = try makeScratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let unit = try String(contentsOfFile: Checkout.root + "/deploy/snapshotd.service", encoding: .utf8)
            .replacingOccurrences(of: "/usr/local/bin/snapshotd", with: Executables.path("snapshotd"))
        let path = directory + "/snapshotd.service"
        try unit.write(toFile: path, atomically: true, encoding: .utf8)
        let output = directory + "/verify.out"
        let status = try spawnAndWait(["/bin/sh", "-c", "/usr/bin/systemd-analyze verify '\(path)' > '\(output)' 2>&1"])
        let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        #expect(status == 0, "systemd-analyze verify: \(text)")
        #expect(!text.contains(path), "warnings about the unit: \(text)")
        for option in ["Type=notify", "WatchdogSec=", "User=snapshotd", "RuntimeDirectory=snapshotd", "LimitMEMLOCK=infinity", "NoNewPrivileges=yes"] {
            #expect(unit.contains(option), "the unit lacks \(option)")
        }
        #expect(!unit.contains("PrivateDevices=yes") && !unit.contains("RemoveIPC=yes") && !unit.contains("DynamicUser=yes"), "an option that hides /dev/shm or RDMA devices")
    }
}
