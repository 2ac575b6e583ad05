import ErasureCoding
@testable import SnapshotCore
import SnapshotProtocol

/// A deterministic simulation of a snapshotd cluster, in the spirit of
/// FoundationDB's simulator and TigerBeetle's VOPR: the daemon's real
/// decision machines (``ProtectionMachine``, ``ClusterMonitor``,
/// ``SnapshotStore``) of n nodes, wired through a simulated network and clock
/// that one seed drives — random delays, reordering, dropped and duplicated
/// messages, nodes killed at any point (with and without their arena),
/// restarts, replacements, trainers attaching late or dying mid-save, peers
/// frozen for a while. Parity bytes are real (ISA-L folds real fragments).
///
/// After every event that can break one it checks the invariants
/// (``violations``); the same seed replays the same run exactly.
final class SimulatedCluster {
    struct Scenario: CustomStringConvertible {
        var nodes: Int
        var parity: Int
        var ranksPerNode: [Int]
        var steps: Int
        var stepIntervalMilliseconds: Int64
        /// The node whose trainers attach late on the first step, and by how much.
        var lateNode: Int
        var lateMilliseconds: Int64
        var crashes: [(atMilliseconds: Int64, node: Int, losesArena: Bool, downMilliseconds: Int64)]
        var freeze: (atMilliseconds: Int64, node: Int, forMilliseconds: Int64)?
        /// Kill the first node that commits this step, at that instant (arena lost), down this long.
        var killAtCommit: (step: Step, downMilliseconds: Int64)?
        var trainerDeathProbability: Double
        var dropProbability: Double
        var duplicateProbability: Double

        var description: String {
            "n=\(nodes) m=\(parity) ranks=\(ranksPerNode) steps=\(steps) late=node \(lateNode)+\(lateMilliseconds)ms killAtCommit=\(killAtCommit.map { "step \($0.step), down \($0.downMilliseconds)ms" } ?? "none") crashes=\(crashes.map { "node \($0.node)@\($0.atMilliseconds)ms\($0.losesArena ? " (arena lost)" : "") down \($0.downMilliseconds)ms" }) freeze=\(freeze.map { "node \($0.node)@\($0.atMilliseconds)ms for \($0.forMilliseconds)ms" } ?? "none") drop=\(dropProbability) dup=\(duplicateProbability)"
        }

        /// A random scenario: every m < n the layout allows, crashes never
        /// taking more than m nodes at once.
        static func random(_ rng: inout SplitMix64) -> Scenario {
            let nodes = Int(rng.next(below: 7)) + 2
            let parity = Int(rng.next(below: UInt64(nodes - 1))) + 1
            var ranks = (0..<nodes).map { _ in Int(rng.next(below: 3)) }
            if ranks.allSatisfy({ $0 == 0 }) { ranks[0] = 1 }
            let steps = Int(rng.next(below: 4)) + 3
            let interval = Int64(rng.next(below: 600)) + 200
            let horizon = Int64(steps) * interval
            var crashes: [(Int64, Int, Bool, Int64)] = []
            var at: Int64 = 0
            for _ in 0..<Int(rng.next(below: UInt64(parity + 2))) {
                // One loss at a time, each after the previous one had time to heal: at most m down or rebuilding.
                at += Int64(rng.next(below: UInt64(horizon))) + 100
                let down = Int64(rng.next(below: 1500)) + 100
                crashes.append((at, Int(rng.next(below: UInt64(nodes))), rng.chance(0.7), down))
                at += down + 6000
            }
            let freeze: (Int64, Int, Int64)? = rng.chance(0.3) ? (Int64(rng.next(below: UInt64(horizon))), Int(rng.next(below: UInt64(nodes))), Int64(rng.next(below: 1200)) + 100) : nil
            // The worst moment to die, aimed at (buggify): right after committing, in runs with no other loss.
            let killAtCommit: (Step, Int64)? = crashes.isEmpty && rng.chance(0.4) ? (Step(rng.next(below: UInt64(steps)) + 1), Int64(rng.next(below: 1400)) + 100) : nil
            return Scenario(
                nodes: nodes, parity: parity, ranksPerNode: ranks, steps: steps, stepIntervalMilliseconds: interval,
                lateNode: Int(rng.next(below: UInt64(nodes))), lateMilliseconds: Int64(rng.next(below: 2000)),
                crashes: crashes, freeze: freeze, killAtCommit: killAtCommit, trainerDeathProbability: rng.chance(0.3) ? 0.05 : 0,
                dropProbability: rng.chance(0.5) ? 0.02 : 0, duplicateProbability: rng.chance(0.5) ? 0.02 : 0)
        }
    }

    // MARK: World

    let seed: UInt64
    let scenario: Scenario
    let configuration: ClusterConfiguration
    let layout: StripeLayout
    let code: ReedSolomon
    let job: JobID
    let world: UInt32
    let faults: ProtectionMachine.Faults
    let keptSteps = 2
    var rng: SplitMix64
    var now: Int64 = 0
    private var queue = EventQueue()
    var nodes: [SimulatedNode] = []
    /// Every version of every rank's bytes ever saved, by CRC.
    var versions: [ShardKey: [UInt32: [UInt8]]] = [:]
    /// The readiness reports of every step some node committed, as the first committer saw them.
    var committed: [Step: [NodeID: StepReady]] = [:]
    /// Ground truth of availability, for the failure-detection invariant.
    var lastUnavailableMilliseconds: [NodeID: Int64] = [:]
    /// When each node was last killed: what it sent in the moments before
    /// never left its queues (the daemon sends from worker pools).
    var killedAtMilliseconds: [NodeID: Int64] = [:]
    static let unsentWindowMilliseconds: Int64 = 5
    var violations: [String] = []
    var eventsRun = 0
    /// With `tracing`, what happened, for replaying a failing seed.
    var tracing = false
    var trace: [String] = []

    func note(_ text: @autoclosure () -> String) {
        if tracing { trace.append("\(now) ms: \(text())") }
    }
    private var nextRequestID: UInt64 = 1

    /// How large a page of cluster state may be: whole views, one report per
    /// page, or a few (from the seed without drawing from its generator, so
    /// a third of the seeds run exactly as before paging existed).
    let statePageBytes: Int

    private func knownReports(_ id: NodeID) -> Set<ReportID> { Set(nodes[Int(id)].machine.ledger.knownReports) }

    init(seed: UInt64, faults: ProtectionMachine.Faults = []) throws {
        self.seed = seed
        statePageBytes = [Int.max, 1, 1500][Int(seed % 3)]
        self.faults = faults
        rng = SplitMix64(seed: seed)
        scenario = Scenario.random(&rng)
        configuration = try ClusterConfiguration(
            nodes: (0..<scenario.nodes).map { ClusterConfiguration.Node(id: NodeID($0), host: "127.0.0.1", port: UInt16(7000 + $0)) },
            groups: [ClusterConfiguration.Group(index: 0, nodes: (0..<scenario.nodes).map { NodeID($0) }, parity: scenario.parity)],
            heartbeatIntervalMilliseconds: 100, failureTimeoutMilliseconds: 1500)
        layout = configuration.groups[0].layout
        code = try ReedSolomon(dataFragmentCount: layout.dataFragmentCount, parityFragmentCount: layout.parityCount)
        job = try JobID("sim-job")
        world = UInt32(scenario.ranksPerNode.reduce(0, +))
        var first: UInt32 = 0
        for index in 0..<scenario.nodes {
            let ranks = (0..<scenario.ranksPerNode[index]).map { first + UInt32($0) }
            first += UInt32(ranks.count)
            nodes.append(try SimulatedNode(id: NodeID(index), ranks: ranks, configuration: configuration, keptSteps: keptSteps, faults: faults, now: 0, discovered: true))
        }
    }

    // MARK: Running

    /// Runs the scenario, heals every fault, and lets the cluster settle.
    func run() {
        for node in nodes { schedule(at: 1 + Int64(node.id), .tick(node.id)) }
        for step in 1...scenario.steps {
            let base = Int64(step) * scenario.stepIntervalMilliseconds
            for node in nodes {
                for rank in node.ranks {
                    let late = step == 1 && Int(node.id) == scenario.lateNode ? scenario.lateMilliseconds : 0
                    schedule(at: base + late + Int64(rng.next(below: 50)), .trainerSave(node.id, rank, Step(step)))
                }
            }
        }
        for crash in scenario.crashes {
            schedule(at: crash.atMilliseconds, .crash(NodeID(crash.node), losesArena: crash.losesArena))
            schedule(at: crash.atMilliseconds + crash.downMilliseconds, .start(NodeID(crash.node)))
        }
        if let freeze = scenario.freeze { schedule(at: freeze.atMilliseconds, .freeze(NodeID(freeze.node), until: freeze.atMilliseconds + freeze.forMilliseconds)) }
        let lastFault = max(scenario.crashes.map { $0.atMilliseconds + $0.downMilliseconds }.max() ?? 0, Int64(scenario.steps + 1) * scenario.stepIntervalMilliseconds + 2500)
        let end = lastFault + 12_000
        while let event = queue.pop(), event.time <= end, violations.isEmpty {
            now = event.time
            eventsRun += 1
            handle(event.event, sentAt: event.sentAt)
        }
        if violations.isEmpty { checkSettled() }
    }

    private func schedule(at time: Int64, _ event: SimulationEvent, sentAt: Int64 = -1) {
        queue.push(time: time, sentAt: sentAt, event: event)
    }

    private func handle(_ event: SimulationEvent, sentAt: Int64) {
        switch event {
        case .tick(let id):
            guard nodes[Int(id)].isUp else { return }
            if nodes[Int(id)].isFrozen(at: now) { return schedule(at: nodes[Int(id)].frozenUntil, .tick(id)) }
            tick(id)
            schedule(at: now + configuration.heartbeatIntervalMilliseconds, .tick(id))
        case .deliver(let to, let from, let message):
            let node = nodes[Int(to)]
            guard node.isUp, sentAt >= node.startedAtMilliseconds else { return }  // a connection to a dead process
            if let killed = killedAtMilliseconds[from], killed >= sentAt, killed - sentAt <= Self.unsentWindowMilliseconds { return }
            if node.isFrozen(at: now) { return schedule(at: node.frozenUntil + Int64(rng.next(below: 5)), .deliver(to: to, from: from, message), sentAt: sentAt) }
            receive(message, at: to, from: from)
        case .timeout(let id, let requestID):
            guard nodes[Int(id)].isUp else { return }
            if nodes[Int(id)].isFrozen(at: now) { return schedule(at: nodes[Int(id)].frozenUntil, .timeout(id, requestID)) }
            timedOut(requestID, at: id)
        case .trainerSave(let id, let rank, let step):
            trainerSave(node: id, rank: rank, step: step)
        case .crash(let id, let losesArena):
            guard nodes[Int(id)].isUp else { return }
            note("node \(id) killed\(losesArena ? ", arena lost" : "")")
            nodes[Int(id)].crash(losesArena: losesArena)
            lastUnavailableMilliseconds[id] = now
            killedAtMilliseconds[id] = now
        case .start(let id):
            start(id)
            lastUnavailableMilliseconds[id] = now
        case .freeze(let id, let until):
            guard nodes[Int(id)].isUp else { return }
            nodes[Int(id)].frozenUntil = until
            lastUnavailableMilliseconds[id] = until
        }
    }

    // MARK: Network

    private func send(_ message: SimulationMessage, from: NodeID, to: NodeID) {
        guard from != to else { return receive(message, at: to, from: from) }
        if rng.chance(scenario.dropProbability) { return }
        schedule(at: now + Int64(rng.next(below: 40)) + 1, .deliver(to: to, from: from, message), sentAt: now)
        if rng.chance(scenario.duplicateProbability) {
            schedule(at: now + Int64(rng.next(below: 80)) + 1, .deliver(to: to, from: from, message), sentAt: now)
        }
    }

    private func request(_ message: SimulationMessage, from: NodeID, to: NodeID, purpose: PendingRequest) -> UInt64 {
        let id = nextRequestID
        nextRequestID += 1
        nodes[Int(from)].pending[id] = purpose
        send(message, from: from, to: to)
        schedule(at: now + 750, .timeout(from, id))
        return id
    }

    private func receive(_ message: SimulationMessage, at id: NodeID, from: NodeID) {
        let index = Int(id)
        switch message {
        case .control(.heartbeat(let beat)):
            lastHeard(beat, at: id)
        case .control(.stepReady(let ready)):
            execute(nodes[index].machine.received(ready, store: nodes[index].store, nowMilliseconds: now), at: id)
        case .control(.stepProtected(let report)):
            execute(nodes[index].machine.received(report, store: nodes[index].store), at: id)
        case .control(.rebuildOrder):
            orderRebuild(id)
        case .control:
            break
        case .stateRequest(let requestID, let known):
            guard nodes[index].discovered else { return }  // a joining node has no view to give
            send(.stateReply(requestID, nodes[index].machine.ledger.clusterState(omitting: known, pageBytes: statePageBytes), known: known), from: id, to: from)
        case .stateReply(let requestID, let state, let known):
            guard let purpose = nodes[index].pending.removeValue(forKey: requestID) else { return }
            execute(nodes[index].machine.merge(state, store: nodes[index].store, nowMilliseconds: now), at: id)
            // Like the daemon: the next page, before the view counts as learned.
            guard state.complete else {
                let sent = state.steps.flatMap { step in step.ready.map { ReportID(job: step.job, step: step.step, node: $0.nodeID) } }
                _ = request(.stateRequest(nextRequestID, known: known.union(knownReports(id)).union(sent)), from: id, to: from, purpose: purpose)
                return
            }
            if case .rebuildState = purpose { rebuildStateAnswered(at: id) }
            if !nodes[index].discovered {
                nodes[index].discovered = true
                let sealed = nodes[index].sealedBeforeDiscovery
                nodes[index].sealedBeforeDiscovery = []
                for step in sealed { shareSealed(node: id, step: step) }
                refreshNeed(id)
                executeRebuild(nodes[index].rebuilder.discovered(rebuildable: nodes[index].machine.rebuildableSteps(store: nodes[index].store)), at: id)
            }
        case .put(let requestID, let put, let bytes):
            let reply = holderReceives(put, bytes: bytes, at: id)
            send(.putReply(requestID, reply), from: id, to: from)
        case .putReply(let requestID, let refusal):
            guard case .fragment(let step, let key)? = nodes[index].pending.removeValue(forKey: requestID) else { return }
            fragmentReplied(step: step, key: key, refusal: refusal, at: id)
        case .get(let requestID, let fragment):
            send(.getReply(requestID, serve(fragment, at: id)), from: id, to: from)
        case .getReply(let requestID, let bytes):
            guard case .rebuildFetch(let step, let stripe, let index, _)? = nodes[Int(id)].pending.removeValue(forKey: requestID) else { return }
            fetched(step: step, stripe: stripe, index: index, bytes: bytes, at: id)
        }
    }

    private func timedOut(_ requestID: UInt64, at id: NodeID) {
        guard let purpose = nodes[Int(id)].pending.removeValue(forKey: requestID) else { return }
        switch purpose {
        case .state:
            if !nodes[Int(id)].discovered { discover(id) }
        case .rebuildState:
            rebuildStateAnswered(at: id)
        case .fragment(let step, let key):
            fragmentReplied(step: step, key: key, refusal: "timed out", at: id)
        case .rebuildFetch(let step, let stripe, let slot, let attempt):
            // Like the daemon's fetch: a lost request is tried again before the source counts as unavailable.
            if attempt < 3, let holder = try? holderOf(stripe: stripe, slot: slot) {
                _ = request(.get(nextRequestID, FragmentID(job: job, step: step, stripe: UInt16(stripe), index: UInt16(slot))), from: id, to: NodeID(holder), purpose: .rebuildFetch(step, stripe, slot, attempt: attempt + 1))
            } else {
                fetched(step: step, stripe: stripe, index: slot, bytes: nil, at: id)
            }
        }
    }

    // MARK: Nodes

    private func start(_ id: NodeID) {
        let index = Int(id)
        guard !nodes[index].isUp else { return }
        do {
            try nodes[index].restart(now: now)
        } catch {
            return violations.append("node \(id) could not restart: \(error)")
        }
        schedule(at: now + 1, .tick(id))
        discover(id)
    }

    private func discover(_ id: NodeID) {
        for peer in configuration.nodeIDs where peer != id {
            let requestID = nextRequestID
            _ = request(.stateRequest(requestID, known: knownReports(id)), from: id, to: peer, purpose: .state)
        }
    }

    private func tick(_ id: NodeID) {
        let index = Int(id)
        refreshNeed(id)
        let beat = Heartbeat(nodeID: id, incarnation: nodes[index].incarnation, needsRebuild: nodes[index].needsRebuild)
        for peer in configuration.nodeIDs where peer != id { send(.control(.heartbeat(beat)), from: id, to: peer) }
        perform(nodes[index].monitor.handle(.tick(nowMilliseconds: now)), at: id)
        execute(nodes[index].machine.tick(nowMilliseconds: now, liveNodes: Set(nodes[index].monitor.liveNodes), store: nodes[index].store), at: id)
    }

    private func lastHeard(_ beat: Heartbeat, at id: NodeID) {
        perform(nodes[Int(id)].monitor.handle(.heartbeat(from: beat.nodeID, incarnation: beat.incarnation, needsRebuild: beat.needsRebuild, nowMilliseconds: now)), at: id)
    }

    private func perform(_ actions: [ClusterMonitor.Action], at id: NodeID) {
        for action in actions {
            switch action {
            case .declaredDead(let peer):
                // Invariant: no node is declared dead while it answers.
                let since = lastUnavailableMilliseconds[peer] ?? -1
                if since < now - configuration.failureTimeoutMilliseconds + 200, nodes[Int(peer)].isUp, !nodes[Int(peer)].isFrozen(at: now) {
                    violations.append("node \(id) declared node \(peer) dead at \(now) ms, but it has answered throughout (last unavailable at \(since) ms)")
                }
            case .orderRebuild(let target, _):
                // Invariant: only the coordinator (the lowest node id that is really up) decides.
                let lower = configuration.nodeIDs.filter { $0 < id && nodes[Int($0)].isUp && !nodes[Int($0)].isFrozen(at: now) && (lastUnavailableMilliseconds[$0] ?? -1) < now - configuration.failureTimeoutMilliseconds - 200 }
                if !lower.isEmpty { violations.append("node \(id) ordered a rebuild of node \(target) at \(now) ms while node \(lower[0]) was up throughout") }
                if target == id { orderRebuild(id) } else { send(.control(.rebuildOrder(RebuildOrder(nodeID: target, coordinator: id))), from: id, to: target) }
            case .declaredAlive, .becameCoordinator, .coordinatorChanged, .beyondTolerance, .resumedAfterPause:
                break
            }
        }
    }

    private func refreshNeed(_ id: NodeID) {
        let index = Int(id)
        let need = !nodes[index].discovered || !nodes[index].machine.missingSteps(store: nodes[index].store).isEmpty
        nodes[index].needsRebuild = need
        nodes[index].monitor.setSelfNeedsRebuild(need && nodes[index].discovered)
    }

    // MARK: Trainers

    private func trainerSave(node id: NodeID, rank: Rank, step: Step) {
        let index = Int(id)
        guard nodes[index].isUp, !nodes[index].isFrozen(at: now) else { return }  // a trainer of a dead node saves nothing
        // Like the daemon: saves are taken while joining; their report waits for discovery.
        guard nodes[index].machine.refusalOfSave(job: job, step: step) == nil else { return note("node \(id) rank \(rank) step \(step): save refused") }
        let key = ShardKey(job: job, step: step, rank: rank)
        // Bytes differ by incarnation: a re-save after a restart need not match.
        var bytesRandom = SplitMix64(seed: seed ^ (UInt64(step) << 40) ^ (UInt64(rank) << 20) ^ nodes[index].incarnation)
        let bytes = (0..<(Int(bytesRandom.next(below: 48)) + 1)).map { _ in UInt8(truncatingIfNeeded: bytesRandom.next(below: 256)) }
        let crc = CRC32C.checksum(bytes)
        versions[key, default: [:]][crc] = bytes
        do {
            let session = nodes[index].session(for: rank)
            if nodes[index].store.jobs[job]?.sessions[rank] != session {
                try nodes[index].store.attach(session: session, job: job, rank: rank, world: world, localWorld: UInt32(nodes[index].ranks.count))
            }
            let spec = try TensorSpec(name: "layers.0.weight", dtype: .bytes, shape: [Int64(bytes.count)], kind: .parameter)
            _ = try nodes[index].store.beginSave(session: session, key: key, specs: [spec], topology: Topology())
            if rng.chance(scenario.trainerDeathProbability) {
                // The trainer dies mid-save: its session ends with the shard unfinished.
                let effects = nodes[index].store.detach(session: session)
                nodes[index].apply(effects)
                nodes[index].sessionGeneration[rank, default: 0] += 1
                return
            }
            _ = try nodes[index].store.commit(session: session, key: key, clientChecksums: nil, gradientNorm: nil, metadata: [])
            nodes[index].shares[step, default: [:]][rank] = bytes
            let effects = nodes[index].store.sealed(key: key, checksums: [crc])
            nodes[index].apply(effects)
            for (_, sealedStep) in effects.localComplete { shareSealed(node: id, step: sealedStep) }
        } catch {
            note("node \(id) rank \(rank) step \(step): \(error)")
            // Refused saves (a step not newer than the committed one, an interrupted step) are the trainer's problem.
        }
    }

    private func shareSealed(node id: NodeID, step: Step) {
        let index = Int(id)
        guard nodes[index].discovered else { return nodes[index].sealedBeforeDiscovery.append(step) }
        let shards = nodes[index].store.localShards(job: job, step: step)
        let manifests = shards.map { ManifestFile(key: ShardKey(job: job, step: step, rank: $0.rank), world: world, shard: $0.shard).encoded() }
        let ready = StepReady(job: job, step: step, nodeID: id, world: world, dataSizeBytes: UInt64(nodes[index].shareBytes(step: step).count), manifests: manifests)
        execute(nodes[index].machine.shareSealed(ready, store: nodes[index].store, nowMilliseconds: now), at: id)
    }

    // MARK: Executing the machine's actions

    private func execute(_ actions: [ProtectionMachine.Action], at id: NodeID) {
        let index = Int(id)
        var pending = actions[...]
        while let action = pending.popFirst() {
            switch action {
            case .broadcast(let message):
                for peer in configuration.nodeIDs where peer != id { send(.control(message), from: id, to: peer) }
            case .send(let message, let peers):
                for peer in peers { send(.control(message), from: id, to: peer) }
            case .pullState(let peers):
                for peer in peers { _ = request(.stateRequest(nextRequestID, known: knownReports(id)), from: id, to: peer, purpose: .state) }
            case .holdParity(_, let step, let size):
                pending += holdParity(step: step, fragmentSizeBytes: size, at: id)
            case .sendFragments(_, let step, let size):
                sendFragments(step: step, fragmentSizeBytes: size, at: id)
            case .commit(_, let step, let world):
                nodes[index].apply(nodes[index].store.markCommitted(job: job, step: step, world: world))
                if let oldest = nodes[index].store.jobs[job]?.committedSteps.first { nodes[index].machine.forget(job: job, olderThan: oldest) }
                if nodes[index].store.isCommitted(job: job, step: step) { stepCommitted(step, at: id) }
            case .discardShare(_, let step, _):
                nodes[index].apply(nodes[index].store.dropUncommittedStep(job: job, step: step))
            case .log(_, let text, _, let step):
                note("node \(id) step \(step): \(text)")
            }
        }
    }

    private func holdParity(step: Step, fragmentSizeBytes size: UInt64, at id: NodeID) -> [ProtectionMachine.Action] {
        let index = Int(id)
        guard !nodes[index].store.isCommitted(job: job, step: step), let stripes = try? layout.parityStripes(node: index) else { return [] }
        var actions: [ProtectionMachine.Action] = []
        for (stripe, row) in stripes {
            let key = ParityKey(job: job, step: step, stripe: stripe)
            guard ensureParity(key, row: row, size: size, at: id) else {
                // Refused only for a step a newer commit superseded here.
                if step > nodes[index].store.latestCommitted(job: job) ?? 0 { violations.append("node \(id) could not hold parity \(key) of \(size) bytes") }
                return []
            }
            if let record = nodes[index].store.parity(key), !record.isComplete, nodes[index].machine.isParityComplete(job: job, step: step, stripe: stripe, record: record) {
                actions += seal(key, at: id)
            }
        }
        return actions
    }

    private func ensureParity(_ key: ParityKey, row: Int, size: UInt64, at id: NodeID) -> Bool {
        let index = Int(id)
        if let record = nodes[index].store.parity(key) { return record.fragmentSizeBytes == size }
        guard (try? nodes[index].store.reserveParity(key, row: row, fragmentSizeBytes: size, world: world)) != nil else { return false }
        nodes[index].parity[key] = [UInt8](repeating: 0, count: Int(size))
        return true
    }

    private func seal(_ key: ParityKey, at id: NodeID) -> [ProtectionMachine.Action] {
        let index = Int(id)
        guard let bytes = nodes[index].parity[key] else { return [] }
        let crc = CRC32C.checksum(bytes)
        nodes[index].store.updateParity(key) { $0.crc32c = crc }
        // Invariant: sealed parity equals the encoding of the data it protects.
        if let expected = expectedParity(key, row: nodes[index].store.parity(key)!.row, at: id), expected != bytes {
            violations.append("node \(id) sealed parity \(key) that is not the encoding of the step's data")
        }
        return nodes[index].machine.paritySealed(job: key.job, step: key.step, store: nodes[index].store)
    }

    private func sendFragments(step: Step, fragmentSizeBytes size: UInt64, at id: NodeID) {
        let index = Int(id)
        let data = nodes[index].shareBytes(step: step)
        let fragmentSize = Int(size)
        var outstanding = 0
        for fragment in 0..<layout.dataFragmentCount where fragment * fragmentSize < data.count {
            guard let placement = try? layout.placement(node: index, fragment: fragment) else { continue }
            let bytes = Self.slice(data, offset: fragment * fragmentSize, count: fragmentSize)
            let put = FragmentPut(fragment: FragmentID(job: job, step: step, stripe: UInt16(placement.stripe), index: UInt16(placement.slot)), sourceNode: id, fragmentSizeBytes: size, crc32c: CRC32C.checksum(bytes))
            for holder in placement.parityHolders {
                let key = SendKey(holder: NodeID(holder), stripe: placement.stripe)
                nodes[index].sends[step, default: [:]][key] = PendingFragment(put: put, bytes: bytes, attempts: 1)
                _ = request(.put(nextRequestID, put, bytes), from: id, to: NodeID(holder), purpose: .fragment(step, key))
                outstanding += 1
            }
        }
        if outstanding == 0 { execute(nodes[index].machine.fragmentsAcknowledged(job: job, step: step, store: nodes[index].store), at: id) }
    }

    private func fragmentReplied(step: Step, key: SendKey, refusal: String?, at id: NodeID) {
        let index = Int(id)
        guard var pending = nodes[index].sends[step]?[key] else { return }
        if let refusal {
            // Like the daemon: a refusal or three failed attempts fail the protection.
            if refusal == "timed out", pending.attempts < 3 {
                pending.attempts += 1
                nodes[index].sends[step]![key] = pending
                _ = request(.put(nextRequestID, pending.put, pending.bytes), from: id, to: key.holder, purpose: .fragment(step, key))
                return
            }
            nodes[index].sends[step] = nil
            return execute(nodes[index].machine.protectionFailed(job: job, step: step, reason: refusal), at: id)
        }
        nodes[index].sends[step]![key] = nil
        if nodes[index].sends[step]!.isEmpty {
            nodes[index].sends[step] = nil
            execute(nodes[index].machine.fragmentsAcknowledged(job: job, step: step, store: nodes[index].store), at: id)
        }
    }

    /// The holder's side of a fragment put; nil is an acknowledgement.
    private func holderReceives(_ put: FragmentPut, bytes: [UInt8], at id: NodeID) -> String? {
        let index = Int(id)
        let stripe = Int(put.fragment.stripe)
        guard case .parity(let row)? = try? layout.role(node: index, stripe: stripe) else { return "not a holder" }
        let key = ParityKey(job: job, step: put.fragment.step, stripe: stripe)
        switch nodes[index].machine.admit(put, record: nodes[index].store.parity(key), store: nodes[index].store) {
        case .refuse(let error): return error.message
        case .duplicate: return nil
        case .fold: break
        }
        guard ensureParity(key, row: row, size: put.fragmentSizeBytes, at: id) else { return "over budget" }
        bytes.withUnsafeBytes { data in
            nodes[index].parity[key]!.withUnsafeMutableBytes { parity in
                try? code.accumulate(dataIndex: Int(put.fragment.index), data: data, parityRow: row, parity: parity)
            }
        }
        nodes[index].store.updateParity(key) { $0.foldedSlots[Int(put.fragment.index)] = put.crc32c }
        if let record = nodes[index].store.parity(key), nodes[index].machine.isParityComplete(job: job, step: put.fragment.step, stripe: stripe, record: record) {
            execute(seal(key, at: id), at: id)
        }
        return nil
    }

    private func stepCommitted(_ step: Step, at id: NodeID) {
        note("node \(id) committed step \(step)")
        if let kill = scenario.killAtCommit, kill.step == step, committed[step] == nil {
            schedule(at: now, .crash(id, losesArena: true))
            schedule(at: now + kill.downMilliseconds, .start(id))
        }
        let entry = nodes[Int(id)].machine.ledger.entry(job: job, step: step)?.ready ?? [:]
        // Invariant: every node that commits a step agrees on what it is.
        if let first = committed[step] {
            if first != entry { violations.append("node \(id) committed step \(step) with reports that differ from another node's") }
        } else {
            committed[step] = entry
        }
        checkNewestCommittedIsSafe()
    }

    // MARK: Rebuild

    /// The daemon's rebuild machine, executed over the simulated network.
    private func orderRebuild(_ id: NodeID) {
        let index = Int(id)
        executeRebuild(nodes[index].rebuilder.ordered(discovered: nodes[index].discovered, rebuildable: nodes[index].machine.rebuildableSteps(store: nodes[index].store)), at: id)
    }

    private func executeRebuild(_ actions: [RebuildMachine.Action], at id: NodeID) {
        let index = Int(id)
        for action in actions {
            switch action {
            case .pullState:
                let peers = configuration.nodeIDs.filter { $0 != id }
                nodes[index].rebuildStatePulls = peers.count
                for peer in peers { _ = request(.stateRequest(nextRequestID, known: knownReports(id)), from: id, to: peer, purpose: .rebuildState) }
            case .rebuild(let stepID):
                startRebuild(stepID.step, at: id)
            case .finished:
                nodes[index].rebuilder.reported()
                refreshNeed(id)
            }
        }
    }

    private func rebuildStateAnswered(at id: NodeID) {
        let index = Int(id)
        nodes[index].rebuildStatePulls -= 1
        guard nodes[index].rebuildStatePulls == 0 else { return }
        executeRebuild(nodes[index].rebuilder.statePulled(rebuildable: nodes[index].machine.rebuildableSteps(store: nodes[index].store)), at: id)
    }

    private func rebuildFinished(_ step: Step, _ outcome: RebuildMachine.Outcome, at id: NodeID) {
        let index = Int(id)
        if case .notRebuildable(let reason) = outcome { nodes[index].machine.stepLost(job: job, step: step, reason: reason) }
        refreshNeed(id)
        let rebuildable = nodes[index].machine.rebuildableSteps(store: nodes[index].store)
        executeRebuild(nodes[index].rebuilder.stepFinished(.init(job: job, step: step), outcome, rebuildable: rebuildable), at: id)
    }

    /// Asks the holders of every other fragment of every stripe.
    private func startRebuild(_ step: Step, at id: NodeID) {
        let index = Int(id)
        guard let size = nodes[index].machine.ledger.fragmentSizeBytes(job: job, step: step, group: configuration.groups[0]) else {
            return rebuildFinished(step, .failed(reason: "the cluster state of the step is incomplete"), at: id)
        }
        nodes[index].rebuild = RebuildInFlight(step: step, fragmentSizeBytes: size, fragments: [:], outstanding: 0)
        for stripe in 0..<layout.stripeCount {
            for slot in 0..<layout.groupSize {
                guard let holder = try? holderOf(stripe: stripe, slot: slot), holder != index else { continue }
                nodes[index].rebuild!.outstanding += 1
                _ = request(.get(nextRequestID, FragmentID(job: job, step: step, stripe: UInt16(stripe), index: UInt16(slot))), from: id, to: NodeID(holder), purpose: .rebuildFetch(step, stripe, slot, attempt: 1))
            }
        }
    }

    private func holderOf(stripe: Int, slot: Int) throws -> Int {
        slot < layout.dataFragmentCount ? try layout.dataSource(stripe: stripe, slot: slot) : try layout.parityHolder(stripe: stripe, row: slot - layout.dataFragmentCount)
    }

    /// A survivor serves a fragment it holds: data of a step it committed, or sealed parity.
    private func serve(_ fragment: FragmentID, at id: NodeID) -> [UInt8]? {
        let index = Int(id)
        guard nodes[index].discovered, let size = nodes[index].machine.ledger.fragmentSizeBytes(job: job, step: fragment.step, group: configuration.groups[0]) else { return nil }
        let slot = Int(fragment.index)
        if slot < layout.dataFragmentCount {
            guard nodes[index].store.isCommitted(job: job, step: fragment.step), case .data(_, let number)? = try? layout.role(node: index, stripe: Int(fragment.stripe)) else { return nil }
            return Self.slice(nodes[index].shareBytes(step: fragment.step), offset: number * Int(size), count: Int(size))
        }
        let key = ParityKey(job: job, step: fragment.step, stripe: Int(fragment.stripe))
        guard let record = nodes[index].store.parity(key), record.isComplete else { return nil }
        return nodes[index].parity[key]
    }

    private func fetched(step: Step, stripe: Int, index slot: Int, bytes: [UInt8]?, at id: NodeID) {
        let index = Int(id)
        guard var rebuild = nodes[index].rebuild, rebuild.step == step else { return }
        rebuild.outstanding -= 1
        if let bytes { rebuild.fragments[FragmentKey(stripe: stripe, slot: slot)] = bytes }
        nodes[index].rebuild = rebuild
        guard rebuild.outstanding == 0 else { return }
        nodes[index].rebuild = nil
        finishRebuild(rebuild, at: id)
    }

    private func finishRebuild(_ rebuild: RebuildInFlight, at id: NodeID) {
        let index = Int(id)
        let size = Int(rebuild.fragmentSizeBytes)
        guard let entry = nodes[index].machine.ledger.entry(job: job, step: rebuild.step), let own = entry.ready[id],
            nodes[index].machine.missingSteps(store: nodes[index].store).contains(.init(job: job, step: rebuild.step))
        else { return rebuildFinished(rebuild.step, .failed(reason: "no longer missing"), at: id) }
        // Decode this node's fragment of every stripe from k survivors.
        var mine: [Int: [UInt8]] = [:]
        for stripe in 0..<layout.stripeCount {
            var buffers: [[UInt8]?] = (0..<layout.groupSize).map { rebuild.fragments[FragmentKey(stripe: stripe, slot: $0)] }
            let target = (0..<layout.groupSize).first { (try? holderOf(stripe: stripe, slot: $0)) == index }!
            let available = buffers.enumerated().filter { $0.offset != target && $0.element != nil }.count
            guard available >= layout.dataFragmentCount else {  // retried on the coordinator's next order
                return rebuildFinished(rebuild.step, .failed(reason: "stripe \(stripe): \(available) fragments read"), at: id)
            }
            var survivors = 0
            for slot in 0..<layout.groupSize where slot != target && buffers[slot] != nil {
                survivors += 1
                if survivors > layout.dataFragmentCount { buffers[slot] = nil }
            }
            buffers[target] = [UInt8](repeating: 0, count: size)
            let output = buffers.map { $0 ?? [] }
            let pointers = output.indices.map { slot -> UnsafeMutableRawPointer? in buffers[slot] == nil ? nil : UnsafeMutableRawPointer.allocate(byteCount: max(1, size), alignment: 64) }
            defer { pointers.forEach { $0?.deallocate() } }
            for slot in output.indices where pointers[slot] != nil { output[slot].withUnsafeBytes { pointers[slot]!.copyMemory(from: $0.baseAddress!, byteCount: size) } }
            do {
                try pointers.withUnsafeBufferPointer { try code.reconstruct(fragments: $0, rebuilding: [target], fragmentSizeBytes: size) }
            } catch {
                violations.append("node \(id) could not decode stripe \(stripe) of step \(rebuild.step): \(error)")
                return rebuildFinished(rebuild.step, .failed(reason: "\(error)"), at: id)
            }
            mine[stripe] = [UInt8](UnsafeRawBufferPointer(start: pointers[target]!, count: size))
        }
        // Data: this node's fragments in order, cut back into its ranks' shards and checked against their manifests.
        var data: [UInt8] = []
        for fragment in 0..<layout.dataFragmentCount {
            guard let placement = try? layout.placement(node: index, fragment: fragment) else { return rebuildFinished(rebuild.step, .failed(reason: "no placement"), at: id) }
            data += mine[placement.stripe]!
        }
        let manifests = own.manifests.compactMap { try? ManifestFile(decoding: $0) }.sorted { $0.key.rank < $1.key.rank }
        var shards: [Rank: [UInt8]] = [:]
        var offset = 0
        for manifest in manifests {
            let length = Int(manifest.shard.specs[0].byteLength)
            let bytes = Array(data[offset..<offset + length])
            offset += length
            guard CRC32C.checksum(bytes) == manifest.shard.checksums?.first else {
                return rebuildFinished(rebuild.step, .notRebuildable(reason: "rank \(manifest.key.rank) failed its CRC after decoding"), at: id)
            }
            shards[manifest.key.rank] = bytes
        }
        var parity: [Int: ParityRecord] = [:]
        for (stripe, row) in (try? layout.parityStripes(node: index)) ?? [] {
            parity[stripe] = ParityRecord(row: row, fragmentSizeBytes: rebuild.fragmentSizeBytes, segmentSizeBytes: 1 << 20, crc32c: CRC32C.checksum(mine[stripe]!))
        }
        for stripe in (nodes[index].store.jobs[job]?.parity[rebuild.step] ?? [:]).keys.sorted() {
            nodes[index].apply(nodes[index].store.releaseParity(ParityKey(job: job, step: rebuild.step, stripe: stripe)))
        }
        nodes[index].store.adoptCommitted(job: job, step: rebuild.step, world: entry.world, shards: Dictionary(uniqueKeysWithValues: manifests.map { ($0.key.rank, $0.shard) }), parity: parity)
        nodes[index].shares[rebuild.step] = shards
        for stripe in parity.keys { nodes[index].parity[ParityKey(job: job, step: rebuild.step, stripe: stripe)] = mine[stripe]! }
        nodes[index].machine.stepRebuilt(job: job, step: rebuild.step)
        execute(nodes[index].machine.paritySealed(job: job, step: rebuild.step, store: nodes[index].store), at: id)
        checkNewestCommittedIsSafe()
        rebuildFinished(rebuild.step, .rebuilt, at: id)
    }

    // MARK: Invariants

    /// The newest step any node reported committed survives: at least k nodes
    /// of the group hold their part of it correctly (shards equal to what
    /// was saved, sealed parity equal to the encoding), so it can be restored
    /// byte-for-byte while at most m nodes are lost.
    private func checkNewestCommittedIsSafe() {
        guard let newest = committed.keys.max() else { return }
        let holding = nodes.filter { holdsCorrectly(newest, node: $0) }.count
        if holding < layout.dataFragmentCount {
            violations.append("committed step \(newest) is held correctly by \(holding) nodes; RS(\(layout.dataFragmentCount),\(layout.parityCount)) needs \(layout.dataFragmentCount)")
        }
    }

    func holdsCorrectly(_ step: Step, node: SimulatedNode) -> Bool {
        guard node.isUp, let reports = committed[step], let own = reports[node.id] else { return false }
        for manifest in own.manifests.compactMap({ try? ManifestFile(decoding: $0) }) {
            guard let bytes = node.shares[step]?[manifest.key.rank], CRC32C.checksum(bytes) == manifest.shard.checksums?.first else { return false }
        }
        for (stripe, row) in (try? layout.parityStripes(node: Int(node.id))) ?? [] {
            let key = ParityKey(job: job, step: step, stripe: stripe)
            guard let record = node.store.parity(key), record.isComplete, let bytes = node.parity[key], bytes == expectedParity(key, row: row, at: node.id) else { return false }
        }
        return true
    }

    /// The encoding of stripe `key.stripe`'s data, from the bytes the ranks saved.
    private func expectedParity(_ key: ParityKey, row: Int, at id: NodeID) -> [UInt8]? {
        let ledger = nodes[Int(id)].machine.ledger
        guard let entry = ledger.entry(job: job, step: key.step), let size = ledger.fragmentSizeBytes(job: job, step: key.step, group: configuration.groups[0]) else { return nil }
        var parity = [UInt8](repeating: 0, count: Int(size))
        for slot in 0..<layout.dataFragmentCount {
            guard let source = try? layout.dataSource(stripe: key.stripe, slot: slot), let ready = entry.ready[NodeID(source)],
                case .data(_, let fragment)? = try? layout.role(node: source, stripe: key.stripe)
            else { return nil }
            var share: [UInt8] = []
            for manifest in ready.manifests.compactMap({ try? ManifestFile(decoding: $0) }).sorted(by: { $0.key.rank < $1.key.rank }) {
                guard let crc = manifest.shard.checksums?.first, let bytes = versions[manifest.key]?[crc] else { return nil }
                share += bytes
            }
            let bytes = Self.slice(share, offset: fragment * Int(size), count: Int(size))
            bytes.withUnsafeBytes { data in parity.withUnsafeMutableBytes { try? code.accumulate(dataIndex: slot, data: data, parityRow: row, parity: $0) } }
        }
        return parity
    }

    /// After every fault has healed: recovery finished, every node agrees on
    /// the newest committed step and holds its part of it byte-for-byte.
    private func checkSettled() {
        for node in nodes {
            if !node.discovered || node.needsRebuild { violations.append("node \(node.id) never finished recovering (missing steps: \(node.machine.missingSteps(store: node.store).map(\.step)))") }
        }
        guard let newest = committed.keys.max() else { return }
        for node in nodes {
            let latest = node.store.latestCommitted(job: job)
            if latest != newest { violations.append("node \(node.id) says the newest committed step is \(latest.map(String.init) ?? "none"), another node committed \(newest)") }
            if !holdsCorrectly(newest, node: node) { violations.append("node \(node.id) does not hold committed step \(newest) byte-for-byte") }
        }
    }

    static func slice(_ data: [UInt8], offset: Int, count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        if offset < data.count {
            let end = min(data.count, offset + count)
            bytes.replaceSubrange(0..<(end - offset), with: data[offset..<end])
        }
        return bytes
    }
}

// MARK: - Nodes

struct SendKey: Hashable {
    let holder: NodeID
    let stripe: Int
}

struct FragmentKey: Hashable {
    let stripe: Int
    let slot: Int
}

struct PendingFragment {
    let put: FragmentPut
    let bytes: [UInt8]
    var attempts: Int
}

enum PendingRequest {
    case state
    case fragment(Step, SendKey)
    case rebuildFetch(Step, Int, Int, attempt: Int)
    /// A rebuild refreshing the node's view before it chooses steps.
    case rebuildState
}

struct RebuildInFlight {
    let step: Step
    let fragmentSizeBytes: UInt64
    var fragments: [FragmentKey: [UInt8]]
    var outstanding: Int
}

/// One simulated daemon: the real machines plus the bytes its arena would hold.
struct SimulatedNode {
    let id: NodeID
    let ranks: [Rank]
    let configuration: ClusterConfiguration
    let keptSteps: Int
    let faults: ProtectionMachine.Faults
    var incarnation: UInt64 = 1
    var isUp = true
    var startedAtMilliseconds: Int64 = 0
    var frozenUntil: Int64 = -1
    var discovered: Bool
    var needsRebuild = false
    var machine: ProtectionMachine
    var monitor: ClusterMonitor
    var store: SnapshotStore
    var shares: [Step: [Rank: [UInt8]]] = [:]
    var parity: [ParityKey: [UInt8]] = [:]
    var sends: [Step: [SendKey: PendingFragment]] = [:]
    var pending: [UInt64: PendingRequest] = [:]
    var rebuilder = RebuildMachine()
    var rebuildStatePulls = 0
    var rebuild: RebuildInFlight?
    var sealedBeforeDiscovery: [Step] = []
    var sessionGeneration: [Rank: UInt64] = [:]

    init(id: NodeID, ranks: [Rank], configuration: ClusterConfiguration, keptSteps: Int, faults: ProtectionMachine.Faults, now: Int64, discovered: Bool) throws {
        self.id = id
        self.ranks = ranks
        self.configuration = configuration
        self.keptSteps = keptSteps
        self.faults = faults
        self.discovered = discovered
        machine = try ProtectionMachine(selfID: id, configuration: configuration, keptStepsPerJob: keptSteps)
        machine.faults = faults
        monitor = ClusterMonitor(selfID: id, configuration: configuration, nowMilliseconds: now)
        store = SnapshotStore(budgetBytes: 1 << 40, snapshotsKeptPerJob: keptSteps, commitsLocally: false)
    }

    func isFrozen(at now: Int64) -> Bool { now < frozenUntil }

    /// A trainer's session id: new for each incarnation and each trainer restart.
    func session(for rank: Rank) -> SessionID { incarnation << 32 | UInt64(rank) << 8 | (sessionGeneration[rank] ?? 0) }

    /// The node's share of a step: its ranks' bytes in rank order.
    func shareBytes(step: Step) -> [UInt8] { (shares[step] ?? [:]).sorted { $0.key < $1.key }.flatMap(\.value) }

    mutating func apply(_ effects: SnapshotStore.Effects) {
        for key in effects.freed {
            shares[key.step]?[key.rank] = nil
            if shares[key.step]?.isEmpty == true { shares[key.step] = nil }
        }
        for key in effects.freedParity { parity[key] = nil }
    }

    /// kill -9: everything in memory is gone; the arena keeps committed steps unless the node is replaced.
    mutating func crash(losesArena: Bool) {
        isUp = false
        pending = [:]
        sends = [:]
        rebuild = nil
        rebuilder = RebuildMachine()
        rebuildStatePulls = 0
        sealedBeforeDiscovery = []
        if losesArena {
            shares = [:]
            parity = [:]
            store = SnapshotStore(budgetBytes: 1 << 40, snapshotsKeptPerJob: keptSteps, commitsLocally: false)
        } else {
            // What the daemon re-attaches to on restart: committed steps and their sealed parity.
            var kept = SnapshotStore(budgetBytes: 1 << 40, snapshotsKeptPerJob: keptSteps, commitsLocally: false)
            for (job, record) in store.jobs {
                for step in record.committedSteps {
                    let shards = record.steps[step] ?? [:]
                    let sealed = (record.parity[step] ?? [:]).filter { $0.value.isComplete }
                    kept.adoptCommitted(job: job, step: step, world: record.world, shards: shards, parity: sealed)
                }
            }
            let committed = Set(store.jobs.values.flatMap(\.committedSteps))
            shares = shares.filter { committed.contains($0.key) }
            parity = parity.filter { committed.contains($0.key.step) && kept.parity($0.key) != nil }
            store = kept
        }
    }

    mutating func restart(now: Int64) throws {
        incarnation += 1
        isUp = true
        startedAtMilliseconds = now
        frozenUntil = -1
        discovered = false
        needsRebuild = true
        machine = try ProtectionMachine(selfID: id, configuration: configuration, keptStepsPerJob: keptSteps)
        machine.faults = faults
        monitor = ClusterMonitor(selfID: id, configuration: configuration, nowMilliseconds: now)
    }
}

// MARK: - Events and messages

enum SimulationMessage {
    case control(Message)
    case stateRequest(UInt64, known: Set<ReportID>)
    /// With the request's known set, which the next page's request extends.
    case stateReply(UInt64, ClusterStateReply, known: Set<ReportID>)
    case put(UInt64, FragmentPut, [UInt8])
    case putReply(UInt64, String?)
    case get(UInt64, FragmentID)
    case getReply(UInt64, [UInt8]?)
}

enum SimulationEvent {
    case tick(NodeID)
    case deliver(to: NodeID, from: NodeID, SimulationMessage)
    case timeout(NodeID, UInt64)
    case trainerSave(NodeID, Rank, Step)
    case crash(NodeID, losesArena: Bool)
    case start(NodeID)
    case freeze(NodeID, until: Int64)
}

/// Events by time, ties in insertion order: the run is a function of the seed.
struct EventQueue {
    struct Entry {
        let time: Int64
        let sequence: UInt64
        let sentAt: Int64
        let event: SimulationEvent
    }

    private var heap: [Entry] = []
    private var sequence: UInt64 = 0

    mutating func push(time: Int64, sentAt: Int64, event: SimulationEvent) {
        sequence += 1
        heap.append(Entry(time: time, sequence: sequence, sentAt: sentAt, event: event))
        var child = heap.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard Self.before(heap[child], heap[parent]) else { break }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> Entry? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var first = parent
            if left < heap.count, Self.before(heap[left], heap[first]) { first = left }
            if right < heap.count, Self.before(heap[right], heap[first]) { first = right }
            guard first != parent else { return top }
            heap.swapAt(parent, first)
            parent = first
        }
    }

    private static func before(_ a: Entry, _ b: Entry) -> Bool { (a.time, a.sequence) < (b.time, b.sequence) }
}

