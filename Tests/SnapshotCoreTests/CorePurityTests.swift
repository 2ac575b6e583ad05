import Foundation
import Testing

/// SnapshotCore holds the decisions; I/O lives outside it. Package.swift
/// gives it no I/O dependency, and this test keeps out the modules that are
/// importable without one (the C library, Foundation's files and clocks,
/// Dispatch's threads).
@Suite("SnapshotCore imports no I/O")
struct CorePurityTests {
    static let forbidden = ["Glibc", "Darwin", "Foundation", "FoundationEssentials", "Dispatch", "SnapshotIO", "RDMATransport", "CRDMA", "Logging", "Synchronization"]

    @Test func noSourceFileOfTheCoreImportsAnIOModule() throws {
        let core = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Sources/SnapshotCore")
        let files = try #require(FileManager.default.enumerator(atPath: core.path)).compactMap { $0 as? String }.filter { $0.hasSuffix(".swift") }
        #expect(files.count >= 8, "the core's sources were not found at \(core.path)")
        for file in files {
            let text = try String(contentsOf: core.appendingPathComponent(file), encoding: .utf8)
            for line in text.split(separator: "\n") {
                let words = line.split(separator: " ").filter { !["public", "internal", "package", "@testable", "@_exported", "@preconcurrency"].contains($0) }
                guard words.first == "import", words.count >= 2 else { continue }
                let module = String(words[1].split(separator: ".").first ?? words[1])
                #expect(!Self.forbidden.contains(module), "\(file) imports \(module)")
            }
        }
    }
}
