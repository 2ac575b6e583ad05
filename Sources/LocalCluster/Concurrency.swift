import Foundation
public import SnapshotClient

/// Runs `body(0..<count)` each on its own thread (bodies may block on each
/// other, e.g. ranks waiting for a job-wide commit, so a bounded pool could
/// deadlock) and rethrows the first error once all have finished.
public func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) throws -> Void) throws {
    let group = DispatchGroup()
    let firstError = FirstError()
    for index in 0..<count {
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            do { try body(index) } catch { firstError.record(error) }
        }
    }
    group.wait()
    if let error = firstError.error { throw error }
}

final class FirstError: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: (any Error)?
    func record(_ error: any Error) { lock.withLock { if stored == nil { stored = error } } }
    var error: (any Error)? { lock.withLock { stored } }
}

/// Whether a restored shard holds exactly `tensors`: same manifest specs, same bytes.
public func restored(_ shard: RestoredShard, matches tensors: [TensorData]) -> Bool {
    guard shard.entries.map(\.spec) == tensors.map(\.spec) else { return false }
    for (index, tensor) in tensors.enumerated() {
        let bytes = shard.tensor(at: index)
        guard bytes.count == tensor.bytes.count else { return false }
        if bytes.count > 0, memcmp(bytes.baseAddress!, tensor.bytes.baseAddress!, bytes.count) != 0 { return false }
    }
    return true
}
