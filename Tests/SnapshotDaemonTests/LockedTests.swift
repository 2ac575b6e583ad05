import Foundation
@testable import SnapshotCore
@testable import SnapshotDaemon
import SnapshotProtocol
import Synchronization
import Testing

/// Polls `condition` until it holds or `seconds` pass; whether it held.
private func eventually(within seconds: TimeInterval, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
        guard Date() < deadline else { return false }
        usleep(1_000)
    }
    return true
}

@Suite("Locked: one value, its waiters woken by broadcast")
struct LockedTests {
    @Test func broadcastWakesEveryWaiter() {
        let locked = Locked(0)
        let answers = Mutex<[Int]>([])
        let group = DispatchGroup()
        let started = Date()
        for _ in 0..<4 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                let answer = locked.withLock(waitingUntil: Date().addingTimeInterval(60)) { value -> Int? in value > 0 ? value : nil }
                answers.withLock { $0.append(answer ?? -1) }
            }
        }
        #expect(eventually(within: 10) { locked.parkedWaiters == 4 }, "the waiters never parked")
        locked.withLock { $0 = 7 }
        locked.broadcast()
        #expect(group.wait(timeout: .now() + 30) == .success, "a waiter slept through the broadcast")
        #expect(answers.withLock { $0 } == [7, 7, 7, 7])
        #expect(Date().timeIntervalSince(started) < 30, "woken by their deadline, not the broadcast")
        #expect(locked.parkedWaiters == 0)
    }

    /// Waiters for something else, woken by an unrelated change, go back to sleep.
    @Test func aWaiterWokenTooEarlyWaitsAgain() {
        let locked = Locked(0)
        let answer = Mutex<Int?>(nil)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let got = locked.withLock(waitingUntil: Date().addingTimeInterval(60)) { value -> Int? in value >= 2 ? value : nil }
            answer.withLock { $0 = got }
            done.signal()
        }
        #expect(eventually(within: 10) { locked.parkedWaiters == 1 })
        locked.withLock { $0 = 1 }
        locked.broadcast()
        #expect(eventually(within: 10) { locked.parkedWaiters == 1 }, "the waiter did not park again")
        #expect(answer.withLock { $0 } == nil)
        locked.withLock { $0 = 2 }
        locked.broadcast()
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(answer.withLock { $0 } == 2)
    }

    /// With no broadcast, the wait ends at the deadline with `decide`'s answer then.
    @Test func aPassedDeadlineReturnsDecidesLastAnswer() {
        let locked = Locked(0)
        let deadline = Date().addingTimeInterval(0.2)
        let late = locked.withLock(waitingUntil: deadline) { _ -> String? in Date() >= deadline ? "late" : nil }
        #expect(late == "late")
        #expect(Date() >= deadline)

        let calls = Mutex(0)
        let started = Date()
        let none = locked.withLock(waitingUntil: started.addingTimeInterval(0.2)) { _ -> Int? in
            calls.withLock { $0 += 1 }
            return nil
        }
        #expect(none == nil)
        #expect(Date().timeIntervalSince(started) >= 0.2)
        #expect(calls.withLock { $0 } == 2, "once before the wait, once at the deadline")
        #expect(locked.parkedWaiters == 0, "a waiter that timed out stays registered")

        // A deadline already past: no sleep, `decide` still has its say.
        let past = locked.withLock(waitingUntil: Date().addingTimeInterval(-1)) { value -> Int? in value == 0 ? nil : value }
        #expect(past == nil)
        #expect(locked.parkedWaiters == 0)
    }

    @Test func decideMayThrow() {
        struct Refused: Error {}
        let locked = Locked(0)
        #expect(throws: Refused.self) {
            try locked.withLock(waitingUntil: Date().addingTimeInterval(60)) { _ throws -> Int? in throw Refused() }
        }
        #expect(locked.parkedWaiters == 0)
    }

    /// The change and its broadcast land anywhere around the waiter's look and
    /// its sleep (a random short delay first, the broadcast inside the lock or
    /// after it); the waiter always wakes well before its deadline.
    @Test func aBroadcastRacingTheWaitIsNotLost() {
        let seed = ProcessInfo.processInfo.environment["SNAPSHOTD_TEST_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64(UInt32.max))
        print("[aBroadcastRacingTheWaitIsNotLost] seed \(seed) (replay with SNAPSHOTD_TEST_SEED=\(seed))")
        var random = SplitMix64(seed: seed)
        var lost: Int?
        for iteration in 0..<3_000 {
            let locked = Locked(false)
            let delayMicroseconds = useconds_t(random.next() % 60)
            let insideLock = random.next() % 2 == 0
            let setterDone = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                if delayMicroseconds > 0 { usleep(delayMicroseconds) }
                if insideLock {
                    locked.withLock { value in
                        value = true
                        locked.broadcast()
                    }
                } else {
                    locked.withLock { $0 = true }
                    locked.broadcast()
                }
                setterDone.signal()
            }
            let deadline = Date().addingTimeInterval(5)
            let seen = locked.withLock(waitingUntil: deadline) { value -> Bool? in value ? true : nil }
            setterDone.wait()
            if seen != true || Date() >= deadline {
                lost = iteration
                break
            }
        }
        #expect(lost == nil, "wake-up lost in iteration \(lost ?? -1) (seed \(seed))")
    }
}

@Suite("WorkerPool: a fixed set of threads, a bounded queue")
struct WorkerPoolTests {
    @Test func runsEveryJob() {
        let pool = WorkerPool(name: "test-run", threads: 3)
        defer { pool.stop() }
        let ran = Mutex(0)
        let threads = Mutex<Set<pthread_t>>([])
        let group = DispatchGroup()
        for _ in 0..<1_000 {
            group.enter()
            pool.submit {
                ran.withLock { $0 += 1 }
                threads.withLock { _ = $0.insert(pthread_self()) }
                group.leave()
            }
        }
        #expect(group.wait(timeout: .now() + 60) == .success)
        #expect(ran.withLock { $0 } == 1_000)
        #expect(threads.withLock { $0.count } <= 3, "jobs ran on threads outside the pool")
    }

    /// With its one thread busy, the pool queues ``Limits/queuedJobsPerPool``
    /// jobs and refuses the rest; after ``WorkerPool/stop()`` the queued ones
    /// still run and new ones are refused.
    @Test func boundsItsQueueAndDrainsItAfterStop() {
        let pool = WorkerPool(name: "test-bound", threads: 1)
        let gate = DispatchSemaphore(value: 0)
        let busy = DispatchSemaphore(value: 0)
        pool.submit {
            busy.signal()
            gate.wait()
        }
        #expect(busy.wait(timeout: .now() + 30) == .success)
        let ran = Mutex(0)
        for _ in 0..<(Limits.queuedJobsPerPool + 3) { pool.submit { ran.withLock { $0 += 1 } } }
        pool.stop()
        pool.submit { ran.withLock { $0 += 1_000_000 } }
        gate.signal()
        #expect(eventually(within: 60) { ran.withLock { $0 } == Limits.queuedJobsPerPool }, "ran \(ran.withLock { $0 })")
        usleep(100_000)
        #expect(ran.withLock { $0 } == Limits.queuedJobsPerPool, "a job beyond the bound, or after stop, ran")
    }

    /// Stopped with every thread idle, each thread ends (none is left waiting
    /// for work that cannot come); a second stop changes nothing. Each thread
    /// holds the pool until it ends, so the pool going away says they all did.
    @Test func stopEndsIdleThreads() {
        weak var gone: WorkerPool?
        let ran = Mutex(0)
        do {
            let pool = WorkerPool(name: "test-stop", threads: 4)
            gone = pool
            let group = DispatchGroup()
            for _ in 0..<8 {
                group.enter()
                pool.submit {
                    ran.withLock { $0 += 1 }
                    group.leave()
                }
            }
            #expect(group.wait(timeout: .now() + 30) == .success)
            pool.stop()
            pool.stop()
            pool.submit { ran.withLock { $0 += 100 } }
        }
        #expect(eventually(within: 10) { gone == nil }, "a pool thread is still running")
        #expect(ran.withLock { $0 } == 8)
    }
}
