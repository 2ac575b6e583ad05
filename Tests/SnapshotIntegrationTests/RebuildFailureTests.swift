import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotProtocol
import Testing

/// A rebuild goes reserve → allocate → install: a throw anywhere before the
/// store takes the step gives back every file and every reserved byte.
@Suite("A rebuild that fails mid-way", .serialized)
struct RebuildFailureTests {
    /// A replacement whose rebuild stops on purpose (a failpoint: after its
    /// shards' segment files are made, or after it wrote its manifests and
    /// commit marker) retries as the coordinator orders; once the orders stop
    /// (the survivors are killed) its arena holds no file of the step and it
    /// reports no memory in use.
    @Test(arguments: ["rebuild.afterShardSegments", "rebuild.beforeAdoption"])
    func leavesNoSegmentFileAndNoReservation(failpoint: String) throws {
        let cluster = try LocalCluster.forTest(nodes: 3, parity: 1, settings: ["SNAPSHOTD_FAILPOINTS": failpoint])
        try cluster.saveStep(1)
        try cluster.kill(1)
        try cluster.replace(1)
        let failure = "failpoint \(failpoint)"
        func count(_ text: String) -> Int { cluster.log(1).components(separatedBy: text).count - 1 }
        let deadline = Date().addingTimeInterval(90)
        while count(failure) < 2, Date() < deadline { usleep(100_000) }
        #expect(count(failure) >= 2, "node 1 did not fail its rebuild twice at \(failpoint); log:\n\(cluster.log(1).suffix(3000))")
        #expect(cluster.log(0).contains("failpoints are set"), "the daemon says it fails on purpose")

        // No more orders; the attempt in flight (if any) ends.
        try cluster.kill(0)
        try cluster.kill(2)
        var quietSince = Date()
        var lastCount = count("rebuild")
        while Date().timeIntervalSince(quietSince) < 2, Date() < deadline.addingTimeInterval(30) {
            usleep(200_000)
            let now = count("rebuild")
            if now != lastCount { (lastCount, quietSince) = (now, Date()) }
        }

        let jobs = try cluster.arenaDirectory(1) + "/jobs"
        let leftovers = (FileManager.default.enumerator(atPath: jobs)?.allObjects as? [String] ?? []).filter {
            $0.hasSuffix(".seg") || $0.hasSuffix(".manifest") || $0.hasSuffix("COMMITTED") || $0.hasSuffix(".tmp")
        }
        #expect(leftovers == [], "files left in \(jobs)")
        let status = try cluster.operatorClient(1).status()
        #expect(status.usedBytes == 0, "held and reserved bytes after failed rebuilds")
        #expect(status.jobs.allSatisfy { $0.steps.allSatisfy { !$0.committed } }, "the failed step is not served")
    }
}
