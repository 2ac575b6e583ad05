import ErasureCoding
import Foundation
import Glibc
import SnapshotIO
import SnapshotProtocol

/// The export format on disk (``ExportLayout``): writing a rank and a step
/// atomically (temporary name, fsync, rename, fsync of the directory), and
/// reading a rank back for a restore, every tensor checked against its CRC.
enum DurableFiles {
    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return encoder
    }()

    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return decoder
    }()

    /// Writes one rank's safetensors file, then its manifest. `bytes` is the
    /// shard's segment (laid out as `shard.tensorOffsets` say). Returns the
    /// tensor bytes written.
    @discardableResult
    static func writeRank(stepDirectory: String, key: ShardKey, world: UInt32, shard: ShardRecord, bytes: UnsafeRawPointer, pacer: inout BandwidthPacer?) throws -> UInt64 {
        try createDirectory(stepDirectory)
        let metadata = ["format": "pt", "snapshotd.job": key.job.rawValue, "snapshotd.step": "\(key.step)", "snapshotd.rank": "\(key.rank)", "snapshotd.world": "\(world)"]
        let layout = Safetensors.layout(shard.specs, metadata: metadata)
        let order = shard.specs.indices.sorted { layout.offsets[$0] < layout.offsets[$1] }
        try atomicWrite(path: "\(stepDirectory)/\(ExportLayout.tensorFile(rank: key.rank))") { file in
            try file.write(layout.header.withUnsafeBytes { $0 }, pacer: &pacer)
            for index in order where shard.specs[index].byteLength > 0 {
                let start = bytes + Int(shard.tensorOffsets[index])
                try file.write(UnsafeRawBufferPointer(start: start, count: Int(shard.specs[index].byteLength)), pacer: &pacer)
            }
        }
        let manifest = try encoder.encode(RankManifest(key: key, world: world, shard: shard))
        try atomicWrite(path: "\(stepDirectory)/\(ExportLayout.rankManifestFile(rank: key.rank))") { file in
            var none: BandwidthPacer? = nil
            try manifest.withUnsafeBytes { try file.write($0, pacer: &none) }
        }
        return shard.specs.reduce(0) { $0 + $1.byteLength }
    }

    /// Writes `manifest.json` (the same bytes from every writer) and makes the
    /// directory's renames durable.
    static func writeStepManifest(stepDirectory: String, job: JobID, step: Step, world: UInt32) throws {
        let manifest = try encoder.encode(StepManifest(job: job, step: step, world: world))
        try atomicWrite(path: "\(stepDirectory)/\(ExportLayout.stepManifestFile)") { file in
            var none: BandwidthPacer? = nil
            try manifest.withUnsafeBytes { try file.write($0, pacer: &none) }
        }
        try syncDirectory(stepDirectory)
        try syncDirectory((stepDirectory as NSString).deletingLastPathComponent)
    }

    // MARK: Reading

    /// A rank's shard read from the durable tier, checked and ready to serve.
    struct DurableShard {
        let path: String
        let file: MappedSegment
        let ready: RestoreReady
    }

    /// Steps of `job` under `root`, newest first.
    static func steps(root: String, job: JobID) -> [Step] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "\(root)/\(job)")) ?? []
        return names.compactMap(ExportLayout.step(directoryName:)).sorted(by: >)
    }

    /// Steps whose every rank is on disk (as this node sees `root`), newest first.
    static func completeSteps(root: String, job: JobID) -> [Step] {
        steps(root: root, job: job).filter { step in
            let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
            guard let data = FileManager.default.contents(atPath: "\(directory)/\(ExportLayout.stepManifestFile)"),
                let manifest = try? decoder.decode(StepManifest.self, from: data)
            else { return false }
            return manifest.ranks.allSatisfy { FileManager.default.fileExists(atPath: "\(directory)/\($0.manifest)") }
        }
    }

    /// The newest flushed copy of `rank` (at `step` if given), or nil when there is none.
    static func newestRank(root: String, job: JobID, rank: Rank, step wanted: Step?) -> Step? {
        steps(root: root, job: job).first { step in
            (wanted == nil || step == wanted)
                && FileManager.default.fileExists(atPath: ExportLayout.stepDirectory(root: root, job: job, step: step) + "/" + ExportLayout.rankManifestFile(rank: rank))
        }
    }

    /// Reads and checks one rank of one step: its manifest, its safetensors
    /// header against the manifest, and every tensor's CRC.
    static func readRank(root: String, job: JobID, step: Step, rank: Rank) throws -> DurableShard {
        let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
        let manifestPath = "\(directory)/\(ExportLayout.rankManifestFile(rank: rank))"
        guard let data = FileManager.default.contents(atPath: manifestPath), data.count <= ProtocolLimits.maximumControlPayloadBytes * 8 else {
            throw StoreError(.unavailable, "cannot read \(manifestPath)")
        }
        let manifest: RankManifest
        do {
            manifest = try decoder.decode(RankManifest.self, from: data)
        } catch {
            throw StoreError(.checksumMismatch, "\(manifestPath) is not a rank manifest: \(error)")
        }
        guard manifest.job == job.rawValue, manifest.step == step, manifest.rank == rank else {
            throw StoreError(.checksumMismatch, "\(manifestPath) describes \(manifest.job)/\(manifest.step)/rank \(manifest.rank)")
        }
        let entries = try manifest.entries()
        let path = "\(directory)/\(ExportLayout.tensorFile(rank: rank))"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError(.unavailable, "cannot open \(path): \(String(cString: strerror(errno)))") }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_size > 0 else {
            close(fd)
            throw StoreError(.checksumMismatch, "\(path) is empty or unreadable")
        }
        let file = try MappedSegment(fd: fd, sizeBytes: Int(info.st_size), writable: false)
        let header = try Safetensors.parse(UnsafeRawBufferPointer(file.bytes(offset: 0, count: file.sizeBytes)))
        var offsets: [UInt64] = []
        var bad: [String] = []
        for entry in entries {
            let spec = entry.spec
            guard let placed = header[spec.name], placed.dtype == spec.dtype.description, placed.shape == spec.shape,
                placed.range.count == Int(spec.byteLength)
            else { throw StoreError(.checksumMismatch, "\(path): tensor '\(spec.name)' does not match its manifest") }
            offsets.append(placed.range.lowerBound)
            let bytes = file.bytes(offset: Int(placed.range.lowerBound), count: Int(spec.byteLength))
            if CRC32C.checksum(UnsafeRawBufferPointer(bytes)) != entry.crc32c { bad.append(spec.name) }
        }
        guard bad.isEmpty else { throw StoreError(.checksumMismatch, "\(path): tensor(s) \(bad.prefix(8)) fail their CRCs") }
        let ready = RestoreReady(
            step: step, entries: entries, tensorOffsets: offsets, segmentSizeBytes: UInt64(file.sizeBytes), gradientNorm: manifest.gradientNorm,
            metadata: Array(Data(base64Encoded: manifest.metadata) ?? Data()), durableSource: path)
        return DurableShard(path: path, file: file, ready: ready)
    }

    // MARK: Retention

    /// Removes `ranks`' files from every step of `job` but the newest `kept`,
    /// and a step directory once no rank is left in it.
    static func prune(root: String, job: JobID, ranks: [Rank], kept: Int) {
        for step in steps(root: root, job: job).dropFirst(kept) {
            let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
            for rank in ranks {
                unlink("\(directory)/\(ExportLayout.rankManifestFile(rank: rank))")
                unlink("\(directory)/\(ExportLayout.tensorFile(rank: rank))")
            }
            let left = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
            if left.allSatisfy({ $0 == ExportLayout.stepManifestFile || $0.hasPrefix(".") }) {
                for name in left { unlink("\(directory)/\(name)") }
                rmdir(directory)
            }
        }
    }

    // MARK: Files

    static func createDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw StoreError(.unavailable, "cannot create directory \(path): \(error.localizedDescription)")
        }
    }

    /// An open file being written.
    struct OutputFile {
        let fd: Int32
        let path: String

        func write(_ buffer: UnsafeRawBufferPointer, pacer: inout BandwidthPacer?) throws {
            var offset = 0
            while offset < buffer.count {
                let count = min(Limits.durableWriteChunkBytes, buffer.count - offset)
                let written = Glibc.write(fd, buffer.baseAddress! + offset, count)
                if written < 0 {
                    if errno == EINTR { continue }
                    throw StoreError(.unavailable, "cannot write \(path): \(String(cString: strerror(errno)))")
                }
                offset += written
                pacer?.consumed(bytes: written)
            }
        }
    }

    /// Writes `path` through a temporary name in the same directory, fsyncs
    /// it and renames it into place: a reader sees the old file or the whole
    /// new one, never a part.
    static func atomicWrite(path: String, _ body: (OutputFile) throws -> Void) throws {
        let temporary = "\((path as NSString).deletingLastPathComponent)/.\((path as NSString).lastPathComponent).\(getpid()).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw StoreError(.unavailable, "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        do {
            try body(OutputFile(fd: fd, path: temporary))
            guard fsync(fd) == 0 else { throw StoreError(.unavailable, "cannot fsync \(temporary): \(String(cString: strerror(errno)))") }
            close(fd)
            guard rename(temporary, path) == 0 else { throw StoreError(.unavailable, "cannot rename \(temporary) to \(path): \(String(cString: strerror(errno)))") }
        } catch {
            close(fd)
            unlink(temporary)
            throw error
        }
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError(.unavailable, "cannot open directory \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw StoreError(.unavailable, "cannot fsync directory \(path): \(String(cString: strerror(errno)))") }
    }
}

/// Keeps a stream of work at most `bytesPerSecond`, averaged since it
/// started: it sleeps whenever it runs ahead.
struct BandwidthPacer {
    let bytesPerSecond: Int
    private let startedMilliseconds = monotonicMilliseconds()
    private var bytes = 0

    init(bytesPerSecond: Int) {
        precondition(bytesPerSecond >= 1000)
        self.bytesPerSecond = bytesPerSecond
    }

    mutating func consumed(bytes count: Int) {
        bytes += count
        let dueMilliseconds = Int64(bytes / (bytesPerSecond / 1000))
        let ahead = dueMilliseconds - (monotonicMilliseconds() - startedMilliseconds)
        if ahead > 0 { usleep(UInt32(min(ahead, 10_000)) * 1000) }
    }
}
