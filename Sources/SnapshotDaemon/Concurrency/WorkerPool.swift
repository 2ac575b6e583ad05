import Foundation
import Logging
import SnapshotCore

/// A fixed set of threads draining a bounded queue of jobs: the daemon's work
/// runs here, never on one new thread per event. Jobs do blocking I/O (with
/// deadlines), so the pools are sized by how much of it may be in flight.
final class WorkerPool: @unchecked Sendable {  // `jobs` and `stopping` are guarded by `condition`
    /// Beyond ``Limits/queuedJobsPerPool`` queued jobs a submission is refused
    /// and logged. Every job the daemon queues is either retried by a periodic
    /// tick (reports, pulls) or only delays a commit (a protection), so
    /// refusing one never loses data; an unbounded queue could exhaust memory.

    private let condition = NSCondition()
    private var jobs: [@Sendable () -> Void] = []
    private var stopping = false
    private let name: String
    private let logger = Logger(label: "snapshotd.pool")

    init(name: String, threads: Int) {
        precondition(threads >= 1)
        self.name = name
        for index in 0..<threads {
            let thread = Thread { [self] in run() }
            thread.name = "\(name)-\(index)"
            thread.start()
        }
    }

    func submit(_ job: @escaping @Sendable () -> Void) {
        let accepted = condition.withLock {
            guard !stopping, jobs.count < Limits.queuedJobsPerPool else { return false }
            jobs.append(job)
            condition.signal()
            return true
        }
        if !accepted { logger.error("work queue full or stopped; job dropped", metadata: ["pool": "\(name)", "limit": "\(Limits.queuedJobsPerPool)"]) }
    }

    /// Lets queued jobs finish; takes no new ones.
    func stop() {
        condition.withLock {
            stopping = true
            condition.broadcast()
        }
    }

    private func run() {
        while true {
            let job: (@Sendable () -> Void)? = condition.withLock {
                while jobs.isEmpty && !stopping { condition.wait() }
                return jobs.isEmpty ? nil : jobs.removeFirst()
            }
            guard let job else { return }
            job()
        }
    }
}
