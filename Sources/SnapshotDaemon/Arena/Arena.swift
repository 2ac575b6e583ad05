import Foundation
import Glibc
import Logging
import Synchronization
public import SnapshotIO
public import SnapshotProtocol
import SnapshotCore

/// Snapshot memory as files on a tmpfs (default /dev/shm), owned by the daemon:
///
///     <root>/jobs/<job>/<step, 20 digits>/rank-<r>.seg        tensor bytes
///     <root>/jobs/<job>/<step, 20 digits>/rank-<r>.manifest   sealed manifest
///     <root>/jobs/<job>/<step, 20 digits>/parity-<stripe>.seg  parity held for the group
///     <root>/quarantine/…                                     files set aside at start (bad), kept for inspection
///     <root>/jobs/<job>/<step, 20 digits>/COMMITTED           the step is committed:
///                                                             world, local ranks, parity held
///     <root>/pool/<capacity>.<owner>.<pid>.<n>.seg            freed, resident, reusable by the same owner
///
/// Files, not anonymous memory, so a restarted daemon re-attaches to every
/// snapshot. The COMMITTED marker is written only after all manifests, and
/// removed before anything of the step is freed, so a crash at any point
/// leaves either a whole committed step or one that restart discards.
///
/// Freed segments go to a pool instead of being unlinked: their pages stay
/// resident, so the next step's save writes into memory that is already
/// allocated (no page faults, no zeroing) and, when the same file comes back
/// to the same rank, the client can even keep its mapping. A pooled segment
/// goes back only to its owner, the same job and rank (or parity to parity):
/// a client keeps writable mappings of segments it was given, so handing one
/// to another job's rank, or to parity, would let a stale or buggy trainer
/// write into them. A segment nobody of its owner wants is unlinked instead
/// (its pages are freed once no one maps it).
///
/// Thread-safe, and meant to be called outside the node's state lock: the
/// pool has a lock of its own, held only to pick or record an entry, and
/// the file work (create, reserve, map) runs without any lock. Callers own
/// the paths they ask for: the store hands a shard or parity key to one
/// writer at a time.
public final class Arena: Sendable {
    public let root: String
    let logger: Logger
    /// Who may reuse a pooled segment.
    enum SegmentOwner: Hashable {
        case shard(JobID, Rank)
        case parity

        /// Its part of a pool file name (`s<rank>-<job>` or `p`).
        var tag: String {
            switch self {
            case .shard(let job, let rank): "s\(rank)-\(job)"
            case .parity: "p"
            }
        }

        init?(tag: Substring) {
            if tag == "p" { self = .parity; return }
            guard tag.first == "s", let dash = tag.firstIndex(of: "-"), let rank = Rank(tag[tag.index(after: tag.startIndex)..<dash]),
                let job = try? JobID(String(tag[tag.index(after: dash)...]))
            else { return nil }
            self = .shard(job, rank)
        }
    }

    struct PoolKey: Hashable {
        let owner: SegmentOwner
        let sizeBytes: UInt64
    }

    struct PooledFile {
        let path: String
        /// The daemon's mapping, kept alive so a reused segment needs no new
        /// page-table entries either (nil for files adopted at start).
        let segment: MappedSegment?
    }

    /// Pooled files by owner and capacity.
    struct Pool {
        var files: [PoolKey: [PooledFile]] = [:]
        var pooledBytes: UInt64 = 0
        var counter = 0

        /// Takes a file of `key` out of the pool, if one is there.
        mutating func take(_ key: PoolKey) -> PooledFile? {
            guard let file = files[key]?.popLast() else { return nil }
            pooledBytes -= key.sizeBytes
            return file
        }

        /// Takes out a file of the same size that belongs to another owner.
        mutating func takeOtherOwners(sizeBytes: UInt64) -> PooledFile? {
            guard let other = files.first(where: { $0.key.sizeBytes == sizeBytes && !$0.value.isEmpty })?.key else { return nil }
            return take(other)
        }
    }

    private let pool = Mutex(Pool())
    /// Serializes a step directory's first file against its removal.
    private let directories = Mutex(())
    public var pooledBytes: UInt64 { pool.withLock { $0.pooledBytes } }

    public init(root: String, logger: Logger) throws {
        self.root = root
        self.logger = logger
        for directory in [root, root + "/jobs", root + "/pool"] {
            if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw IOError("mkdir(\(directory))") }
        }
        var info = stat()
        guard stat(root, &info) == 0 else { throw IOError("stat(\(root))") }
        guard info.st_uid == geteuid() else {
            throw IOError("arena directory \(root) is owned by uid \(info.st_uid), not this daemon (\(geteuid()))", errno: EPERM)
        }
        chmod(root, 0o700)
        adoptPool()
    }

    // MARK: Paths

    func stepDirectory(_ job: JobID, _ step: Step) -> String {
        "\(root)/jobs/\(job)/" + String(repeating: "0", count: max(0, 20 - String(step).count)) + String(step)
    }

    func segmentPath(_ key: ShardKey) -> String { stepDirectory(key.job, key.step) + "/rank-\(key.rank).seg" }
    func manifestPath(_ key: ShardKey) -> String { stepDirectory(key.job, key.step) + "/rank-\(key.rank).manifest" }
    func markerPath(_ job: JobID, _ step: Step) -> String { stepDirectory(job, step) + "/COMMITTED" }
    func paritySegmentPath(_ key: ParityKey) -> String { stepDirectory(key.job, key.step) + "/parity-\(key.stripe).seg" }

    // MARK: Segments

    /// A writable mapping of a fresh or pooled segment of exactly `sizeBytes`.
    public func createSegment(_ key: ShardKey, sizeBytes: UInt64) throws -> MappedSegment {
        try createSegment(path: segmentPath(key), job: key.job, step: key.step, sizeBytes: sizeBytes, owner: .shard(key.job, key.rank))
    }

    /// A parity segment, all zeroes: parity accumulates into it.
    public func createParitySegment(_ key: ParityKey, sizeBytes: UInt64) throws -> MappedSegment {
        let segment = try createSegment(path: paritySegmentPath(key), job: key.job, step: key.step, sizeBytes: sizeBytes, owner: .parity)
        if let base = segment.base { memset(base, 0, segment.sizeBytes) }  // a pooled segment holds old bytes
        return segment
    }

    public func mapParitySegment(_ key: ParityKey, sizeBytes: UInt64) throws -> MappedSegment {
        try mapSegment(path: paritySegmentPath(key), sizeBytes: Int(sizeBytes), writable: true)
    }

    public func releaseParity(_ key: ParityKey, segment: MappedSegment, poolLimitBytes: UInt64) {
        release(path: paritySegmentPath(key), segment: segment, poolLimitBytes: poolLimitBytes, owner: .parity)
        removeStepDirectoryIfEmpty(key.job, key.step)
    }

    private func createSegment(path: String, job: JobID, step: Step, sizeBytes: UInt64, owner: SegmentOwner) throws -> MappedSegment {
        let (own, other) = pool.withLock { pool -> (PooledFile?, PooledFile?) in
            if let own = pool.take(PoolKey(owner: owner, sizeBytes: sizeBytes)) { return (own, nil) }
            return (nil, pool.takeOtherOwners(sizeBytes: sizeBytes))
        }
        // Another owner's pooled segment of this size is not handed over:
        // it is dropped, so the memory it held comes back to the tmpfs.
        if let other { unlink(other.path) }
        // The file appears in its step directory while the directory cannot
        // be removed under it (another rank's release removes it once empty).
        let created = try withStepDirectory(job, step) { () throws -> Int32? in
            unlink(path)
            if let own {
                if rename(own.path, path) == 0 { return nil }
                unlink(own.path)  // cannot be reused: its memory goes back to the tmpfs
            }
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw IOError("create(\(path))") }
            return fd
        }
        if let fd = created {
            defer { close(fd) }
            // Reserve the memory now (outside every lock: this zeroes the
            // pages): a full tmpfs fails here, with a clear error, instead of
            // as SIGBUS inside the trainer's memcpy.
            let result = posix_fallocate(fd, 0, off_t(sizeBytes))
            guard result == 0 else {
                unlink(path)
                throw IOError("reserve \(sizeBytes) bytes for \(path)", errno: result)
            }
        } else if let segment = own?.segment {
            return segment
        }
        return try mapSegment(path: path, sizeBytes: Int(sizeBytes), writable: true)
    }

    public func mapSegment(_ key: ShardKey, sizeBytes: UInt64) throws -> MappedSegment {
        try mapSegment(path: segmentPath(key), sizeBytes: Int(sizeBytes), writable: true)
    }

    private func mapSegment(path: String, sizeBytes: Int, writable: Bool) throws -> MappedSegment {
        let fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw IOError("open(\(path))") }
        var info = stat()
        guard fstat(fd, &info) == 0, Int(info.st_size) == sizeBytes else {
            close(fd)
            throw IOError("segment \(path) is not \(sizeBytes) bytes", errno: EINVAL)
        }
        return try MappedSegment(fd: fd, sizeBytes: sizeBytes, writable: writable)
    }

    /// A read-only descriptor for a restoring client (it cannot write through it).
    public func openReadOnly(_ key: ShardKey) throws -> Int32 {
        let fd = open(segmentPath(key), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw IOError("open(\(segmentPath(key)))") }
        return fd
    }

    /// Frees a shard's files: the segment (and the daemon's mapping of it)
    /// goes to the pool while the pool and the held bytes fit the budget, else
    /// it is unlinked.
    public func release(_ key: ShardKey, segment: MappedSegment, poolLimitBytes: UInt64) {
        unlink(manifestPath(key))
        release(path: segmentPath(key), segment: segment, poolLimitBytes: poolLimitBytes, owner: .shard(key.job, key.rank))
        removeStepDirectoryIfEmpty(key.job, key.step)
    }

    private func release(path: String, segment: MappedSegment, poolLimitBytes: UInt64, owner: SegmentOwner) {
        let sizeBytes = UInt64(segment.sizeBytes)
        // The bytes are counted as pooled before the rename, so two releases
        // at once cannot both fit under the limit.
        let number = pool.withLock { pool -> Int? in
            guard pool.pooledBytes + sizeBytes <= poolLimitBytes else { return nil }
            pool.pooledBytes += sizeBytes
            pool.counter += 1
            return pool.counter
        }
        guard let number else {
            unlink(path)
            return
        }
        let pooled = "\(root)/pool/\(sizeBytes).\(getpid()).\(number).\(owner.tag).seg"
        let renamed = rename(path, pooled) == 0
        pool.withLock { pool in
            if renamed {
                pool.files[PoolKey(owner: owner, sizeBytes: sizeBytes), default: []].append(PooledFile(path: pooled, segment: segment))
            } else {
                pool.pooledBytes -= sizeBytes
            }
        }
    }

    /// Drops pooled segments until at most `limitBytes` remain pooled.
    public func trimPool(toBytes limitBytes: UInt64) {
        let dropped = pool.withLock { pool -> [PooledFile] in
            var dropped: [PooledFile] = []
            for key in pool.files.keys.sorted(by: { $0.sizeBytes > $1.sizeBytes }) where pool.pooledBytes > limitBytes {
                while pool.pooledBytes > limitBytes, let file = pool.take(key) { dropped.append(file) }
            }
            return dropped
        }
        for file in dropped { unlink(file.path) }
    }

    private func adoptPool() {
        let directory = root + "/pool"
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
            let path = directory + "/" + name
            // <capacity>.<pid>.<n>.<owner>.seg; the owner's job may itself contain dots.
            let fields = name.split(separator: ".", maxSplits: 3)
            guard name.hasSuffix(".seg"), fields.count == 4, let capacity = UInt64(fields[0]),
                capacity > 0, capacity % SegmentLayout.segmentGranularityBytes == 0,
                let owner = SegmentOwner(tag: fields[3].dropLast(".seg".count))
            else {
                unlink(path)  // an older daemon's pool file, or not one of ours: no owner is known
                continue
            }
            pool.withLock { pool in
                pool.files[PoolKey(owner: owner, sizeBytes: capacity), default: []].append(PooledFile(path: path, segment: nil))
                pool.pooledBytes += capacity
            }
        }
    }

    // MARK: Manifests and markers

    public func writeManifest(_ manifest: ManifestFile) throws {
        try writeAtomically(manifest.encoded(), to: manifestPath(manifest.key))
    }

    /// The marker lists what this node holds of the step, so a restart knows
    /// which manifests and parity segments to expect.
    public func writeCommitMarker(job: JobID, step: Step, world: UInt32, ranks: [Rank], parity: [Int: ParityRecord]) throws {
        var text = "world=\(world)\nranks=\(ranks.sorted().map(String.init).joined(separator: ","))\n"
        let entries = parity.sorted { $0.key < $1.key }.compactMap { stripe, record in
            record.crc32c.map { "\(stripe):\(record.row):\(record.fragmentSizeBytes):\($0)" }
        }
        text += "parity=\(entries.joined(separator: ","))\n"
        try withStepDirectory(job, step) { try writeAtomically(Array(text.utf8), to: markerPath(job, step)) }
    }

    public func removeCommitMarker(job: JobID, step: Step) {
        unlink(markerPath(job, step))
    }

    private func writeAtomically(_ bytes: [UInt8], to path: String) throws {
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw IOError("create(\(temporary))") }
        let socket = Socket(fd: fd)
        defer { socket.close() }
        try bytes.withUnsafeBytes { b in
            var done = 0
            while done < b.count {
                let n = write(fd, b.baseAddress! + done, b.count - done)
                guard n > 0 else { throw IOError("write(\(temporary))") }
                done += n
            }
        }
        guard rename(temporary, path) == 0 else { throw IOError("rename(\(temporary))") }
    }

    /// Runs `body` (which puts a file in the step's directory) with the
    /// directory in place: creating a step's first file and removing its
    /// empty directory are serialized, so neither can undo the other.
    private func withStepDirectory<Result>(_ job: JobID, _ step: Step, _ body: () throws -> Result) throws -> Result {
        try directories.withLock { _ in
            for directory in ["\(root)/jobs/\(job)", stepDirectory(job, step)] {
                if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw IOError("mkdir(\(directory))") }
            }
            return try body()
        }
    }

    private func removeStepDirectoryIfEmpty(_ job: JobID, _ step: Step) {
        directories.withLock { _ in _ = rmdir(stepDirectory(job, step)) }  // only succeeds once empty
    }

    // MARK: Restart

    /// A committed step found on disk: what of it is intact, and which of
    /// its files were set aside.
    public struct RecoveredStep: Sendable {
        public var job: JobID
        public var step: Step
        public var world: UInt32
        public var shards: [Rank: ShardRecord]
        public var parity: [Int: ParityRecord]
        /// Ranks and parity stripes the marker names whose files were missing or bad.
        public var quarantinedRanks: [Rank] = []
        public var quarantinedStripes: [Int] = []
        public var isComplete: Bool { quarantinedRanks.isEmpty && quarantinedStripes.isEmpty }
    }

    /// Finds every committed step. A step without a COMMITTED marker was
    /// half-written before a crash and is removed. In a committed step, a
    /// shard or parity fragment whose files are missing, unreadable or the
    /// wrong size is quarantined (moved under `quarantine/`, never deleted)
    /// and the rest of the step is kept: one bad file must not cost the
    /// others. A marker that does not parse quarantines the whole step.
    public func scan() -> [RecoveredStep] {
        var recovered: [RecoveredStep] = []
        let jobsDirectory = root + "/jobs"
        for jobName in ((try? FileManager.default.contentsOfDirectory(atPath: jobsDirectory)) ?? []).sorted() {
            guard let job = try? JobID(jobName) else { continue }
            for stepName in ((try? FileManager.default.contentsOfDirectory(atPath: "\(jobsDirectory)/\(jobName)")) ?? []).sorted() {
                guard let step = Step(stepName) else { continue }
                guard FileManager.default.fileExists(atPath: markerPath(job, step)) else {
                    logger.warning("discarding an uncommitted step found at start (half-written before a crash)", metadata: ["job": "\(job)", "step": "\(step)"])
                    try? FileManager.default.removeItem(atPath: stepDirectory(job, step))
                    continue
                }
                if let found = recoverStep(job, step) {
                    recovered.append(found)
                } else {
                    quarantine(stepDirectory(job, step), as: "\(job)-\(step)", reason: "its COMMITTED marker does not parse")
                }
            }
        }
        return recovered
    }

    /// Moves `path` under `quarantine/` (kept for inspection, never served).
    public func quarantine(_ path: String, as name: String, reason: String) {
        let directory = root + "/quarantine"
        if mkdir(directory, 0o700) != 0 && errno != EEXIST { logger.error("cannot create the quarantine directory", metadata: ["directory": "\(directory)"]) }
        let target = "\(directory)/\(name)-\(UInt64(monotonicMilliseconds()))-\((path as NSString).lastPathComponent)"
        if rename(path, target) == 0 {
            logger.error("file quarantined", metadata: ["file": "\(path)", "to": "\(target)", "reason": "\(reason)"])
        } else {
            logger.error("cannot quarantine a bad file; leaving it in place, unserved", metadata: ["file": "\(path)", "reason": "\(reason)"])
        }
    }

    /// Quarantines shard `key`'s segment and manifest.
    public func quarantineShard(_ key: ShardKey, reason: String) {
        for path in [segmentPath(key), manifestPath(key)] where FileManager.default.fileExists(atPath: path) {
            quarantine(path, as: "\(key.job)-\(key.step)", reason: reason)
        }
    }

    private func recoverStep(_ job: JobID, _ step: Step) -> RecoveredStep? {
        guard let marker = FileManager.default.contents(atPath: markerPath(job, step)) else { return nil }
        var fields: [String: String] = [:]
        for line in String(decoding: marker, as: UTF8.self).split(separator: "\n") {
            guard let equals = line.firstIndex(of: "=") else { continue }
            fields[String(line[..<equals])] = String(line[line.index(after: equals)...])
        }
        guard let world = fields["world"].flatMap({ UInt32($0) }), world > 0 else { return nil }
        let ranks = fields["ranks"].map { $0.split(separator: ",").compactMap { Rank($0) } } ?? Array(0..<world)
        var found = RecoveredStep(job: job, step: step, world: world, shards: [:], parity: [:])
        for rank in ranks {
            let key = ShardKey(job: job, step: step, rank: rank)
            var info = stat()
            guard let data = FileManager.default.contents(atPath: manifestPath(key)),
                let manifest = try? ManifestFile(decoding: Array(data)), manifest.key == key, manifest.world == world,
                stat(segmentPath(key), &info) == 0, UInt64(info.st_size) == manifest.shard.segmentSizeBytes
            else {
                quarantineShard(key, reason: "its manifest is missing or invalid, or its segment is missing or the wrong size")
                found.quarantinedRanks.append(rank)
                continue
            }
            found.shards[rank] = manifest.shard
        }
        for entry in (fields["parity"] ?? "").split(separator: ",") {
            let parts = entry.split(separator: ":").compactMap { UInt64($0) }
            guard parts.count == 4, let stripe = Int(exactly: parts[0]), let row = Int(exactly: parts[1]), let crc = UInt32(exactly: parts[3]),
                let size = SegmentLayout.fragmentSegmentBytes(parts[2])
            else { return nil }
            var info = stat()
            let key = ParityKey(job: job, step: step, stripe: stripe)
            guard stat(paritySegmentPath(key), &info) == 0, UInt64(info.st_size) == size else {
                if FileManager.default.fileExists(atPath: paritySegmentPath(key)) {
                    quarantine(paritySegmentPath(key), as: "\(job)-\(step)", reason: "parity segment is the wrong size")
                }
                found.quarantinedStripes.append(stripe)
                continue
            }
            found.parity[stripe] = ParityRecord(row: row, fragmentSizeBytes: parts[2], segmentSizeBytes: size, crc32c: crc)
        }
        return found
    }
}
