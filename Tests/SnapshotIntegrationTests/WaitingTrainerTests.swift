import Foundation
import Glibc
import LocalCluster
import SnapshotClient
import SnapshotIO
import SnapshotProtocol
import Testing

/// A trainer that dies while the daemon holds it in waitCommitted: the daemon
/// must notice that the client is gone and detach its rank at once, so the
/// rank's restarted trainer is not refused as a duplicate until the wait's
/// timeout (up to an hour).
@Suite("A trainer killed while waiting for a commit", .serialized)
struct WaitingTrainerTests {
    /// How soon the dead trainer's waiting session must end after it is reaped.
    static let reconnectLimitMilliseconds: Int64 = 1000

    /// A real `snapshot-trainer` (rank 0 of a job of world 2) saves step 1 and
    /// blocks in waitCommitted(step: 1) with a 10-minute timeout; rank 1 never
    /// saves, so step 1 never commits. kill -9 of the trainer frees rank 0
    /// for the very next connection. Over the Unix socket (the daemon sees a hang-up) and
    /// over TCP (it sees a FIN).
    @Test(arguments: ["unix", "tcp"])
    func killedWhileWaitingFreesTheRankAtOnce(transport: String) throws {
        let daemon = try DaemonProcess()
        let job = try JobID("waiting-trainer")
        let endpoint = transport == "tcp"
            ? ["--tcp", "127.0.0.1:\(daemon.tcpPort)", "--secret-file", daemon.secretPath]
            : ["--socket", daemon.socketPath]
        let trainer = try TrainerProcess(arguments: endpoint + [
            "--job", "waiting-trainer", "--rank", "0", "--world", "2", "--steps", "1",
            "--tensor-bytes", "16,65536", "--wait-step", "1", "--wait-timeout-ms", "600000",
        ])
        try trainer.waitForLine("WAITING step=1")
        // The request is on its way when WAITING is printed; it reaches the
        // daemon within microseconds. Give it ample time, then check that the
        // trainer is blocked in the wait and still holds its rank.
        usleep(300_000)
        #expect(trainer.process.isRunning, "the trainer's wait ended although step 1 cannot commit")
        do {
            _ = try daemon.unixClient(job: job, rank: 0, world: 2)
            Issue.record("a second session for rank 0 was accepted while the trainer was waiting")
        } catch let error as SnapshotClientError {
            #expect(error.code == .duplicateRank, "\(error)")
        }

        // Reaped means its sockets are closed: the restarted trainer's first
        // attempt gets the rank, with no retry (before the fix, 1 run in 2
        // was refused as a duplicate by the dead trainer's waiting session).
        trainer.kill9()
        // (Either the attach found the holder's socket closed and took the
        // rank over, logging "rank handed over", or the holder's wait had
        // looked at its socket first and ended: both leave the rank free.)
        let client = try daemon.unixClient(job: job, rank: 0, world: 2)
        // The dead trainer's wait ends because its client went away, not by a timeout.
        let deadline = monotonicMilliseconds() + Self.reconnectLimitMilliseconds
        while !daemon.log().contains("client closed the connection while waiting for step 1"), monotonicMilliseconds() < deadline { usleep(10_000) }
        #expect(daemon.log().contains("client closed the connection while waiting for step 1"))
        // The new session works, and the step the dead trainer waited for is still not committed.
        #expect(try client.latestCommittedStep() == nil)
        let step1 = try #require(try client.status().jobs.first?.steps.first { $0.step == 1 })
        #expect(step1.committed == false && step1.completeRanks == 1)
    }

    /// The check the daemon makes between wait slices: a peer that is gone
    /// counts as closed; a live peer does not, even with bytes waiting unread.
    @Test func peerHasClosedSeesAGonePeerButNotWaitingBytes() throws {
        // Unix stream socket pair.
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        let (local, remote) = (Socket(fd: fds[0]), Socket(fd: fds[1]))
        defer { local.close() }
        #expect(!local.peerHasClosed(), "idle live peer")
        try remote.writeAll(Array("hello".utf8), deadlineMilliseconds: monotonicMilliseconds() + 5000)
        #expect(!local.peerHasClosed(), "live peer with bytes waiting")
        remote.close()
        #expect(local.peerHasClosed(), "Unix peer closed with bytes still waiting")

        // TCP on loopback: a closing peer sends a FIN, not a hang-up.
        let listener = try Socket.listenTCP(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let port = try #require(listener.localPort())
        let client = try Socket.connectTCP(host: "127.0.0.1", port: port)
        let served = try listener.accept()
        defer { served.close() }
        #expect(!served.peerHasClosed(), "idle live TCP peer")
        try client.writeAll(Array("request".utf8), deadlineMilliseconds: monotonicMilliseconds() + 5000)
        usleep(50_000)
        #expect(!served.peerHasClosed(), "live TCP peer with bytes waiting")
        client.close()
        // The FIN crosses loopback at once; allow a moment.
        let deadline = monotonicMilliseconds() + 1000
        while !served.peerHasClosed(), monotonicMilliseconds() < deadline { usleep(5_000) }
        #expect(served.peerHasClosed(), "TCP peer closed with bytes still waiting")
    }
}
