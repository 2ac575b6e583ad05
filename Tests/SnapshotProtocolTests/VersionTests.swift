import Foundation
import SnapshotProtocol
import Testing

/// One version for the daemon, snapshotctl, the C library and the Python
/// package: each place that spells it must agree with ``SnapshotdVersion``.
@Suite("One version")
struct VersionTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The first string in double quotes on the line that starts with `prefix`.
    static func quoted(in path: String, lineStartingWith prefix: String) throws -> String? {
        let text = try String(contentsOf: repository.appendingPathComponent(path), encoding: .utf8)
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return nil }
        let parts = line.split(separator: "\"", omittingEmptySubsequences: false)
        return parts.count >= 3 ? String(parts[1]) : nil
    }

    @Test(arguments: [
        ("Sources/CSnapshotd/include/snapshotd.h", "#define SNAPSHOTD_VERSION"),
        ("python/pyproject.toml", "version ="),
        ("python/src/snapshotd/__init__.py", "__version__ ="),
    ])
    func everyPlaceSaysTheSameVersion(path: String, prefix: String) throws {
        let found = try Self.quoted(in: path, lineStartingWith: prefix)
        #expect(found == SnapshotdVersion.string, "\(path): \(found ?? "no line starting with \(prefix)")")
    }

    @Test func theVersionIsSemantic() {
        let parts = SnapshotdVersion.string.split(separator: ".")
        #expect(parts.count == 3 && parts.allSatisfy { UInt($0) != nil }, "\(SnapshotdVersion.string)")
    }
}
