import Foundation
import SnapshotClient
import SnapshotProtocol
import Testing

/// A rank that saves the same step again before it committed replaces its
/// shard; the first save's seal, still running, must not touch the second.
@Suite("A step saved again while its first shard seals", .serialized)
struct ResaveTests {
    /// Enough steps that the race shows (before the fix, about one run in six failed at 30).
    static let steps: Step = 60

    static func bytes(step: Step, save: UInt8, count: Int) -> [UInt8] {
        var random = SplitMix64(seed: step &* 1_000 &+ UInt64(save))
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { random.fill($0) }
        return bytes
    }

    static func save(_ client: SnapshotClient, step: Step, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in
            try client.save(step: step, tensors: [TensorData(spec: try TensorSpec.blob(name: "w", byteCount: raw.count, kind: .parameter), bytes: raw)])
        }
    }

    /// Each step: 8 MiB saved, then at once 4 KiB of other bytes for the same
    /// step. The second save either replaces the first (the step had not
    /// committed) or is refused as not newer (it had). Either way the step
    /// commits, serves exactly the bytes of the save that stands, and after a
    /// kill -9 the daemon's manifests on disk agree (before the fix, the first
    /// seal's manifest write raced the second's: "cannot write manifest;
    /// shard not sealed", and the step never committed).
    @Test func theSaveThatStandsCommitsAndIsServedBeforeAndAfterARestart() throws {
        let daemon = try DaemonProcess(keep: 3)
        let job = try JobID("resave")
        var client = try daemon.unixClient(job: job, rank: 0, world: 1)
        var standing: [Step: [UInt8]] = [:]
        var replaced = 0
        for step in 1...Self.steps {
            let first = Self.bytes(step: step, save: 1, count: 8 << 20)
            let second = Self.bytes(step: step, save: 2, count: 4096)
            try Self.save(client, step: step, first)
            switch clientErrorCode({ try Self.save(client, step: step, second) }) {
            case nil:
                standing[step] = second
                replaced += 1
            case .invalidRequest?:
                standing[step] = first  // committed before the second save arrived
            case let other:
                Issue.record("step \(step): the second save failed with \(String(describing: other))")
                return
            }
            do {
                #expect(try client.waitCommitted(step: step, timeoutMilliseconds: 10_000) == step)
            } catch {
                let problems = daemon.log().split(separator: "\n").filter { $0.contains(" error ") || $0.contains(" warning ") }.suffix(10)
                Issue.record("step \(step) did not commit: \(error); the daemon's last errors:\n\(problems.joined(separator: "\n"))")
                return
            }
            let restored = try client.restore(step: step)
            #expect(Array(restored.tensor(at: 0)) == standing[step], "step \(step) serves other bytes than the save that stands")
            restored.release()
        }
        print("[resave] \(replaced) of \(Self.steps) second saves replaced the first")
        #expect(!daemon.log().contains("cannot write manifest"))
        #expect(!daemon.log().contains("shard refused"))

        daemon.kill9()
        try daemon.start()
        client = try daemon.unixClient(job: job, rank: 0, world: 1)
        for step in (Self.steps - 2)...Self.steps {
            let restored = try client.restore(step: step)
            #expect(Array(restored.tensor(at: 0)) == standing[step], "step \(step) after a restart")
            restored.release()
        }
    }
}
