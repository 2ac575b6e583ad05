import Glibc

/// A memory mapping of a whole segment file. Owns the descriptor and the
/// mapping; both go when the object does.
public final class MappedSegment: @unchecked Sendable {
    public let fd: Int32
    public let sizeBytes: Int
    public let base: UnsafeMutableRawPointer?
    public let writable: Bool

    /// - Parameter populate: pre-fault the page tables (MAP_POPULATE), so the
    ///   first writes into an already-resident tmpfs page do not fault one by one.
    public init(fd: Int32, sizeBytes: Int, writable: Bool, populate: Bool = false) throws {
        self.fd = fd
        self.sizeBytes = sizeBytes
        self.writable = writable
        guard sizeBytes > 0 else {
            base = nil
            return
        }
        let protection = writable ? PROT_READ | PROT_WRITE : PROT_READ
        let flags = MAP_SHARED | (populate ? MAP_POPULATE : 0)
        let pointer = mmap(nil, sizeBytes, protection, flags, fd, 0)
        guard let pointer, pointer != MAP_FAILED else {
            let error = IOError("mmap(\(sizeBytes) bytes)")
            Glibc.close(fd)
            throw error
        }
        base = pointer
        MappedMemory.shared.add(base: pointer, count: sizeBytes, writable: writable)
    }

    /// Private anonymous memory, pre-faulted: a receive buffer that does not
    /// take a page fault per 4 KiB while data streams in.
    public static func anonymous(sizeBytes: Int) throws -> MappedSegment {
        try MappedSegment(anonymousBytes: sizeBytes)
    }

    private init(anonymousBytes sizeBytes: Int) throws {
        fd = -1
        self.sizeBytes = sizeBytes
        writable = true
        guard sizeBytes > 0 else {
            base = nil
            return
        }
        let pointer = mmap(nil, sizeBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        guard let pointer, pointer != MAP_FAILED else { throw IOError("mmap(anonymous, \(sizeBytes) bytes)") }
        base = pointer
        MappedMemory.shared.add(base: pointer, count: sizeBytes, writable: true)
    }

    public func bytes(offset: Int, count: Int) -> UnsafeMutableRawBufferPointer {
        precondition(offset >= 0 && count >= 0 && offset + count <= sizeBytes, "range outside the segment")
        guard let base else { return UnsafeMutableRawBufferPointer(start: nil, count: 0) }
        return UnsafeMutableRawBufferPointer(start: base + offset, count: count)
    }

    deinit {
        if let base {
            MappedMemory.shared.remove(base: base)  // registrations first: they pinned these pages
            munmap(base, sizeBytes)
        }
        if fd >= 0 { Glibc.close(fd) }
    }
}

/// (device, inode, size): identifies the file behind a descriptor, so a client
/// can keep a mapping across steps when the daemon hands it the same segment again.
public struct FileIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64
    public let sizeBytes: Int

    public init?(fd: Int32) {
        var info = stat()
        guard fstat(fd, &info) == 0 else { return nil }
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
        sizeBytes = Int(info.st_size)
    }
}
