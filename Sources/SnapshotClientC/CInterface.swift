// The C interface declared in include/snapshotd.h. Every function here is a
// thin adapter: arguments are checked (nothing from C may trap), the Swift
// client does the work, and errors become a status code plus a per-thread
// message. Handles are retained Swift objects passed as opaque pointers.
import Glibc
import SnapshotClient
import SnapshotProtocol
import SnapshotIO

// MARK: Status codes (include/snapshotd.h, snapshotd_status)

enum CStatus {
    static let ok: Int32 = 0
    static let connection: Int32 = 100
    static let invalidArgument: Int32 = 101
    static let protocolError: Int32 = 102
}

/// Runs `body`, turning any error into a status code and the thread's last-error message.
func withStatus(_ body: () throws -> Void) -> Int32 {
    do {
        try body()
        return CStatus.ok
    } catch let error as SnapshotClientError {
        let status: Int32 = if let code = error.code { Int32(code.rawValue) } else if error.message.hasPrefix("unexpected reply") { CStatus.protocolError } else { CStatus.connection }
        return LastError.set(status, error.message)
    } catch let error as ArgumentError {
        return LastError.set(CStatus.invalidArgument, error.message)
    } catch let error as ProtocolError {
        return LastError.set(CStatus.invalidArgument, "\(error)")
    } catch {
        return LastError.set(CStatus.connection, "\(error)")
    }
}

struct ArgumentError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

// MARK: Handles

/// A save in progress. Over TCP the tensors are staged in `staging` (one
/// anonymous buffer, tensors back to back) and streamed at commit.
final class SaveBox {
    let client: SnapshotClient
    let pending: PendingSave
    let staging: MappedSegment?
    let stagingOffsets: [Int]
    var finished = false

    init(client: SnapshotClient, pending: PendingSave) throws {
        self.client = client
        self.pending = pending
        guard !pending.writesInPlace else {
            staging = nil
            stagingOffsets = []
            return
        }
        var offsets: [Int] = []
        var total = 0
        for spec in pending.specs {
            offsets.append(total)
            guard let length = Int(exactly: spec.byteLength), case let (sum, false) = total.addingReportingOverflow(length) else {
                throw ArgumentError("save of \(pending.specs.count) tensors does not fit this process's address space")
            }
            total = sum
        }
        stagingOffsets = offsets
        staging = total > 0 ? try MappedSegment.anonymous(sizeBytes: total) : nil
    }

    func buffer(_ index: Int) -> UnsafeMutableRawBufferPointer? {
        if let direct = pending.destination(tensorIndex: index) { return direct }
        guard let staging else { return nil }
        return staging.bytes(offset: stagingOffsets[index], count: Int(pending.specs[index].byteLength))
    }

    func commit(gradientNorm: Double?, metadata: [UInt8]) throws {
        if !pending.writesInPlace {
            for index in pending.specs.indices {
                let bytes = buffer(index).map(UnsafeRawBufferPointer.init) ?? UnsafeRawBufferPointer(start: nil, count: 0)
                try pending.write(tensorIndex: index, from: bytes)
            }
        }
        try pending.commit(gradientNorm: gradientNorm, metadata: metadata)
        finished = true
    }
}

/// A restored shard, with C strings and shapes that live as long as the handle.
final class RestoreBox {
    let client: SnapshotClient
    let shard: RestoredShard
    let names: [UnsafeMutablePointer<CChar>]
    let shapes: [UnsafeMutableBufferPointer<Int64>]
    /// The commit's metadata, kept at a stable address for C.
    let metadata: UnsafeMutableRawBufferPointer
    /// ``RestoredShard/durableSource`` as a C string, when there is one.
    let durableSource: UnsafeMutablePointer<CChar>?

    init(client: SnapshotClient, shard: RestoredShard) {
        self.client = client
        self.shard = shard
        let metadata = UnsafeMutableRawBufferPointer.allocate(byteCount: shard.metadata.count, alignment: 16)
        shard.metadata.withUnsafeBytes { metadata.copyMemory(from: $0) }
        self.metadata = metadata
        names = shard.entries.map { strdup($0.spec.name)! }
        durableSource = shard.durableSource.map { strdup($0)! }
        shapes = shard.entries.map { entry in
            let buffer = UnsafeMutableBufferPointer<Int64>.allocate(capacity: max(1, entry.spec.shape.count))
            _ = buffer.initialize(from: entry.spec.shape)
            return buffer
        }
    }

    deinit {
        shard.release()
        names.forEach { free($0) }
        free(durableSource)
        shapes.forEach { $0.deallocate() }
        metadata.deallocate()
    }
}

func retain<T: AnyObject>(_ object: T) -> OpaquePointer { OpaquePointer(Unmanaged.passRetained(object).toOpaque()) }
func borrow<T: AnyObject>(_ pointer: OpaquePointer, as: T.Type) -> T { Unmanaged<T>.fromOpaque(UnsafeRawPointer(pointer)).takeUnretainedValue() }
func release<T: AnyObject>(_ pointer: OpaquePointer?, as: T.Type) {
    guard let pointer else { return }
    Unmanaged<T>.fromOpaque(UnsafeRawPointer(pointer)).release()
}

func string(_ pointer: UnsafePointer<CChar>?, _ field: String) throws -> String {
    guard let pointer else { throw ArgumentError("\(field) is NULL") }
    guard let value = String(validatingCString: pointer) else { throw ArgumentError("\(field) is not valid UTF-8") }
    return value
}
