import ErasureCoding
import Foundation
import Glibc
import SnapshotIO
import SnapshotProtocol
import SnapshotCore

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
    static func writeRank(
        stepDirectory: String, key: ShardKey, world: UInt32, shard: ShardRecord, bytes: UnsafeRawPointer, pacer: inout BandwidthPacer?,
        isCancelled: () -> Bool = { false }
    ) throws -> UInt64 {
        try createDirectory(stepDirectory)
        let metadata = ["format": "pt", "snapshotd.job": key.job.rawValue, "snapshotd.step": "\(key.step)", "snapshotd.rank": "\(key.rank)", "snapshotd.world": "\(world)"]
        let layout = Safetensors.layout(shard.specs, metadata: metadata)
        let order = shard.specs.indices.sorted { layout.offsets[$0] < layout.offsets[$1] }
        try atomicWrite(path: "\(stepDirectory)/\(ExportLayout.tensorFile(rank: key.rank))") { file in
            try file.write(layout.header.withUnsafeBytes { $0 }, pacer: &pacer)
            for index in order where shard.specs[index].byteLength > 0 {
                let start = bytes + Int(shard.tensorOffsets[index])
                try file.write(UnsafeRawBufferPointer(start: start, count: Int(shard.specs[index].byteLength)), pacer: &pacer, isCancelled: isCancelled)
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

    /// The step a restore falls back to: `wanted` if it is complete, else
    /// (no step asked) the newest complete step. Whole steps only, so every
    /// rank of the job restores the same one.
    static func stepToRestore(root: String, job: JobID, wanted: Step?) -> Step? {
        completeSteps(root: root, job: job).first { wanted == nil || $0 == wanted }
    }

    /// Reads and checks one rank of one step: its manifest, its safetensors
    /// header against the manifest, and every tensor's CRC.
    static func readRank(root: String, job: JobID, step: Step, rank: Rank, world: UInt32) throws -> DurableShard {
        let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
        let manifestPath = "\(directory)/\(ExportLayout.rankManifestFile(rank: rank))"
        var info = stat()
        guard lstat(manifestPath, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_size <= Limits.maximumRankManifestFileBytes,
            let data = FileManager.default.contents(atPath: manifestPath)
        else { throw StoreError(.unavailable, "cannot read \(manifestPath) (a regular file of at most \(Limits.maximumRankManifestFileBytes) bytes)") }
        let manifest: RankManifest
        do {
            manifest = try decoder.decode(RankManifest.self, from: data)
        } catch {
            throw StoreError(.checksumMismatch, "\(manifestPath) is not a rank manifest: \(error)")
        }
        guard manifest.job == job.rawValue, manifest.step == step, manifest.rank == rank else {
            throw StoreError(.checksumMismatch, "\(manifestPath) describes \(manifest.job)/\(manifest.step)/rank \(manifest.rank)")
        }
        guard manifest.world == world else {
            throw StoreError(.wrongJob, "\(manifestPath) was saved by a job of \(manifest.world) ranks; this one has \(world)")
        }
        guard let metadata = Data(base64Encoded: manifest.metadata) else { throw StoreError(.checksumMismatch, "\(manifestPath): metadata is not base64") }
        let entries = try manifest.entries()
        let path = "\(directory)/\(ExportLayout.tensorFile(rank: rank))"
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw StoreError(.unavailable, "cannot open \(path): \(String(cString: strerror(errno)))") }
        guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_size > 0 else {
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
            metadata: Array(metadata), durableSource: path)
        return DurableShard(path: path, file: file, ready: ready)
    }

    // MARK: Retention

    /// Keeps `ranks`' files in the newest `kept` steps where this node wrote
    /// them all, removes them from older ones, but never from the newest
    /// step complete for the whole job (the fallback). A step directory goes
    /// once only its manifest is left (other writers' files, temporary ones
    /// included, are never touched).
    static func prune(root: String, job: JobID, ranks: [Rank], kept: Int) {
        let fallback = completeSteps(root: root, job: job).first
        let mine = steps(root: root, job: job).filter { step in
            let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
            return ranks.allSatisfy { FileManager.default.fileExists(atPath: "\(directory)/\(ExportLayout.rankManifestFile(rank: $0))") }
        }
        for step in mine.dropFirst(kept) where step != fallback {
            let directory = ExportLayout.stepDirectory(root: root, job: job, step: step)
            for rank in ranks {
                unlink("\(directory)/\(ExportLayout.rankManifestFile(rank: rank))")
                unlink("\(directory)/\(ExportLayout.tensorFile(rank: rank))")
            }
            if let left = try? FileManager.default.contentsOfDirectory(atPath: directory), left.isEmpty || left == [ExportLayout.stepManifestFile] {
                unlink("\(directory)/\(ExportLayout.stepManifestFile)")
                rmdir(directory)
            }
        }
    }

    // MARK: Files

    static func createDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw StoreError(.invalidRequest, "cannot create directory \(path): \(error.localizedDescription)")
        }
    }

    /// An open file being written.
    struct OutputFile {
        let fd: Int32
        let path: String

        func write(_ buffer: UnsafeRawBufferPointer, pacer: inout BandwidthPacer?, isCancelled: () -> Bool = { false }) throws {
            var offset = 0
            while offset < buffer.count {
                guard !isCancelled() else { throw StoreError(.unavailable, "cancelled while writing \(path)") }
                let count = min(Limits.durableWriteChunkBytes, buffer.count - offset)
                let written = Glibc.write(fd, buffer.baseAddress! + offset, count)
                if written < 0 {
                    if errno == EINTR { continue }
                    throw StoreError(.invalidRequest, "cannot write \(path): \(String(cString: strerror(errno)))")
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
        // A random name, created exclusively and never through a symlink: writers
        // on a shared file system (or a flush and an export) never share one.
        let temporary = "\((path as NSString).deletingLastPathComponent)/.\((path as NSString).lastPathComponent).\(String(UInt64.random(in: 1...UInt64.max), radix: 16)).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StoreError(.invalidRequest, "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        do {
            try body(OutputFile(fd: fd, path: temporary))
            guard fsync(fd) == 0 else { throw StoreError(.invalidRequest, "cannot fsync \(temporary): \(String(cString: strerror(errno)))") }
            close(fd)
            guard rename(temporary, path) == 0 else { throw StoreError(.invalidRequest, "cannot rename \(temporary) to \(path): \(String(cString: strerror(errno)))") }
        } catch {
            close(fd)
            unlink(temporary)
            throw error
        }
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError(.invalidRequest, "cannot open directory \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw StoreError(.invalidRequest, "cannot fsync directory \(path): \(String(cString: strerror(errno)))") }
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
        if ahead > 0 { usleep(useconds_t(min(ahead, Limits.pacerLongestSleepMilliseconds) * 1000)) }
    }
}
