import ArgumentParser

/// Benchmarks print figures as ratios against a reference measured in the same
/// run (memcpy, ISA-L called from C, iperf3), because the machines are noisy.
@main
struct SnapshotBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot-bench",
        abstract: "snapshotd benchmarks (build with -c release).",
        subcommands: [ErasureBenchmark.self, NodeBenchmark.self, ClusterBenchmark.self, CheckFreeBenchmark.self]
    )
}
