@testable import SnapshotCore
import Testing

/// The relationships between the daemon's limits, run as a test (the daemon
/// runs the same check at start and traps on a violation).
@Suite("Limits")
struct LimitsTests {
    @Test func everyRelationshipHolds() {
        #expect(Limits.violatedRelationships() == [])
    }
}
