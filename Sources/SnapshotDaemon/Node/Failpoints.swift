import Foundation
import SnapshotCore

/// Named places where a test makes the daemon fail on purpose, as etcd's
/// gofail does: `SNAPSHOTD_FAILPOINTS=rebuild.afterShardSegments,…` in the
/// daemon's environment makes each named point throw
/// `internalError: failpoint NAME`. Read once at start; the daemon logs a
/// warning naming any that are set. Never set in production. The points:
///
/// - `rebuild.afterShardSegments`: a rebuild has reserved its budget and
///   created its shards' segment files, and stops.
/// - `rebuild.beforeAdoption`: a rebuild has rebuilt and checked everything
///   and written its manifests and commit marker, and stops before the store
///   takes the step.
enum Failpoints {
    static let environmentVariable = "SNAPSHOTD_FAILPOINTS"
    static let known: Set<String> = ["rebuild.afterShardSegments", "rebuild.beforeAdoption"]

    static let active: Set<String> = Set(
        (ProcessInfo.processInfo.environment[environmentVariable] ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })

    static func hit(_ name: String) throws {
        precondition(known.contains(name), "failpoint \(name) is not listed in Failpoints.known")
        if active.contains(name) { throw StoreError(.internalError, "failpoint \(name)") }
    }
}
