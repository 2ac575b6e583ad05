import Dispatch
import Foundation
import Logging
import SnapshotCore
import Synchronization

/// A fixed set of threads draining a bounded queue of jobs: the daemon's work
/// runs here, never on one new thread per event. Jobs do blocking I/O (with
/// deadlines), so the pools are sized by how much of it may be in flight.
final class WorkerPool: Sendable {
    /// Beyond ``Limits/queuedJobsPerPool`` queued jobs a submission is refused
    /// and logged. Every job the daemon queues is either retried by a periodic
    /// tick (reports, pulls) or only delays a commit (a protection), so
    /// refusing one never loses data; an unbounded queue could exhaust memory.
    private let queue = Mutex<(jobs: [@Sendable () -> Void], stopping: Bool)>(([], false))
    /// Signalled once per job queued and once per thread at ``stop()``, after
    /// the queue changed: a thread it wakes finds a job, or the pool stopping
    /// with none left.
    private let ready = DispatchSemaphore(value: 0)
    private let threads: Int
    private let name: String
    private let logger = Logger(label: "snapshotd.pool")

    init(name: String, threads: Int) {
        precondition(threads >= 1)
        self.name = name
        self.threads = threads
        for index in 0..<threads {
            let thread = Thread { [self] in run() }
            thread.name = "\(name)-\(index)"
            thread.start()
        }
    }

    func submit(_ job: @escaping @Sendable () -> Void) {
        let accepted = queue.withLock { queue in
            guard !queue.stopping, queue.jobs.count < Limits.queuedJobsPerPool else { return false }
            queue.jobs.append(job)
            return true
        }
        if accepted {
            ready.signal()
        } else {
            logger.error("work queue full or stopped; job dropped", metadata: ["pool": "\(name)", "limit": "\(Limits.queuedJobsPerPool)"])
        }
    }

    /// Lets queued jobs finish; takes no new ones.
    func stop() {
        let wasRunning = queue.withLock { queue in
            defer { queue.stopping = true }
            return !queue.stopping
        }
        if wasRunning { for _ in 0..<threads { ready.signal() } }
    }

    private func run() {
        while true {
            ready.wait()
            let job = queue.withLock { queue in queue.jobs.isEmpty ? nil : queue.jobs.removeFirst() }
            guard let job else { return }
            job()
        }
    }
}
