import ArgumentParser
import SnapshotDaemon

@main
struct SnapshotdCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshotd",
        abstract: "In-memory snapshot daemon for distributed training jobs.",
        version: SnapshotDaemonVersion.string)

    func run() throws {
        print("snapshotd \(SnapshotDaemonVersion.string)")
    }
}
