import Foundation
@testable import SnapshotDaemon
import Synchronization
import Testing

@Suite("One owner per key")
struct KeyedExclusionTests {
    /// Eight threads on one key never overlap; eight on keys of their own do; no
    /// entry outlives its last owner.
    @Test func ownersOfOneKeyTakeTurnsAndOthersRunAlongside() {
        let exclusion = KeyedExclusion<Int>()
        let inside = Mutex<[Int: Int]>([:])
        let mostAtOnce = Mutex<[Int: Int]>([:])
        let overall = Mutex((now: 0, most: 0))
        // Threads of their own (a pool may run them one after another on a busy machine).
        let group = DispatchGroup()
        for index in 0..<16 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                let key = index % 2 == 0 ? 0 : index  // half on key 0, the rest each on its own key
                exclusion.withExclusive(key) {
                let count = inside.withLock { $0[key, default: 0] += 1; return $0[key]! }
                mostAtOnce.withLock { $0[key] = max($0[key] ?? 0, count) }
                overall.withLock { $0.now += 1; $0.most = max($0.most, $0.now) }
                usleep(20_000)
                overall.withLock { $0.now -= 1 }
                inside.withLock { $0[key]! -= 1 }
                }
            }
        }
        group.wait()
        #expect(mostAtOnce.withLock { $0.values.max() } == 1, "two owners of one key at once")
        #expect(overall.withLock { $0.most } > 1, "different keys never ran at once")
        #expect(exclusion.keysInUse == 0)
    }

    @Test func aThrowingOwnerLetsTheNextOneIn() {
        struct Refused: Error {}
        let exclusion = KeyedExclusion<String>()
        #expect(throws: Refused.self) { try exclusion.withExclusive("k") { throw Refused() } }
        #expect(exclusion.withExclusive("k") { 7 } == 7)
        #expect(exclusion.keysInUse == 0)
    }
}
