import ArgumentParser

@main
struct SnapshotctlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshotctl",
        abstract: "Operator CLI for snapshotd: status, verify, recover, export.",
        version: "0.1.0")

    func run() throws {
        print("snapshotctl 0.1.0")
    }
}
