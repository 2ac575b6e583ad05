import Foundation
import Logging
import SnapshotIO
import SnapshotProtocol
import Synchronization
import Testing

@testable import SnapshotCore
@testable import SnapshotDaemon

/// The arena is called from many threads at once without the node's state
/// lock (segment files are created outside it): its pool must stay
/// consistent with the files on disk, within its limit, and never hand one
/// owner's file to another.
@Suite("Arena segment pool")
struct ArenaPoolTests {
    @Test func concurrentCreatesAndReleasesKeepThePoolConsistent() throws {
        let directory = "/dev/shm/snapshotd-arena-\(getpid())-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let arena = try Arena(root: directory, logger: Logger(label: "test"))
        let job = try JobID("pool-job")
        let segmentBytes = SegmentLayout.segmentGranularityBytes
        let poolLimitBytes = 6 * segmentBytes
        let threads = 8
        let rounds = 200
        // Each thread is one rank: it owns its keys, as the store guarantees.
        let mixedUp = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: threads) { rank in
            for step in 1...rounds {
                let key = ShardKey(job: job, step: Step(step), rank: Rank(rank))
                guard let segment = try? arena.createSegment(key, sizeBytes: segmentBytes) else {
                    mixedUp.withLock { $0 += 1 }
                    continue
                }
                // A reused segment must be this rank's own: it still holds what this rank wrote last.
                let first = segment.bytes(offset: 0, count: 1)[0]
                if first != 0 && first != UInt8(rank + 1) { mixedUp.withLock { $0 += 1 } }
                segment.bytes(offset: 0, count: 1)[0] = UInt8(rank + 1)
                arena.release(key, segment: segment, poolLimitBytes: poolLimitBytes)
            }
        }
        #expect(mixedUp.withLock { $0 } == 0, "a create failed or a segment went to another rank")
        let pooledFiles = try FileManager.default.contentsOfDirectory(atPath: directory + "/pool")
        #expect(UInt64(pooledFiles.count) * segmentBytes == arena.pooledBytes, "the pool's count disagrees with its files: \(pooledFiles)")
        #expect(arena.pooledBytes <= poolLimitBytes)
        #expect(arena.pooledBytes > 0, "nothing was pooled")
        arena.trimPool(toBytes: 0)
        #expect(arena.pooledBytes == 0)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory + "/pool").isEmpty)
    }
}
