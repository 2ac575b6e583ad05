import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

/// Acceptance of the single-node daemon: real `snapshotd` processes, real
/// sockets, real `kill -9`.
@Suite("snapshotd on one node", .serialized)
struct SingleNodeTests {
    static let mib = 1 << 20
    /// 1 byte to 64 MiB, several dtypes; rank 0 and 7 carry the 64 MiB tensor.
    static func layout(rank: Rank) -> [(String, DType, Int)] {
        var sizes: [(String, DType, Int)] = [
            ("rng.state", .bytes, 1), ("layers.0.bias", .float16, 4098), ("layers.0.weight", .bfloat16, 3 * mib + 2),
            ("layers.0.weight.exp_avg", .float32, 1 * mib), ("step_counter", .int64, 8),
        ]
        if rank == 0 || rank == 7 { sizes.append(("embedding.weight", .float32, 64 * mib)) }
        return sizes
    }

    @Test func eightRanksSaveFiveStepsAndRestoreTheLatest() throws {
        let daemon = try DaemonProcess(budget: "2GiB", keep: 2)
        let job = try JobID("eight-ranks")
        var clients = try (0..<8 as Range<Rank>).map { try daemon.unixClient(job: job, rank: $0, world: 8) }
        for step in 1...5 as ClosedRange<Step> {
            try concurrently(0..<8) { [clients] rank in
                try clients[Int(rank)].save(step: step, tensors: tensors(step: step, rank: rank, sizes: Self.layout(rank: rank)), gradientNorm: 0.5)
                try clients[Int(rank)].waitCommitted(step: step, timeoutMilliseconds: 30_000)
            }
        }
        #expect(try clients[3].latestCommittedStep() == 5)
        for rank in 0..<8 as Range<Rank> {
            let shard = try clients[Int(rank)].restore()
            #expect(shard.step == 5)
            #expect(matches(shard, tensors(step: 5, rank: rank, sizes: Self.layout(rank: rank))), "rank \(rank)")
            #expect(shard.gradientNorm == 0.5)
            shard.release()
        }
        // Retention: exactly the configured 2 committed steps remain, in the store and in the arena.
        let status = try clients[0].status()
        #expect(status.jobs.first?.steps.map(\.step) == [4, 5])
        #expect(status.jobs.first?.steps.allSatisfy(\.committed) == true)
        let onDisk = try FileManager.default.contentsOfDirectory(atPath: daemon.arena + "/jobs/eight-ranks").sorted()
        #expect(onDisk == ["00000000000000000004", "00000000000000000005"])
        #expect(clientErrorCode { try clients[0].restore(step: 3) } == .notCommitted, "step 3 was dropped by retention")
        // The older kept step is still restorable byte-identical, and over TCP too
        // (rank 7 reconnects over TCP once its Unix session is gone).
        let older = try clients[7].restore(step: 4)
        #expect(matches(older, tensors(step: 4, rank: 7, sizes: Self.layout(rank: 7))))
        older.release()
        clients.removeLast()
        let tcp = try retrying(while: .duplicateRank, seconds: 5) { try daemon.tcpClient(job: job, rank: 7, world: 8) }
        for step in [4, 5] as [Step] {
            let shard = try tcp.restore(step: step)
            #expect(matches(shard, tensors(step: step, rank: 7, sizes: Self.layout(rank: 7))), "TCP restore of step \(step)")
        }
    }
}
