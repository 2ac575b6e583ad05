import ErasureCoding
public import SnapshotProtocol

/// What this node knows about every step across the cluster: each node's
/// readiness report (its data size and shard manifests) and protection report.
/// Pure bookkeeping: it decides when a step is committed, what fragment size a
/// group uses, which fragments a holder expects, and what is lost when nodes die.
public struct ClusterLedger: Sendable {
    public let configuration: ClusterConfiguration

    public struct StepEntry: Sendable, Equatable {
        public var world: UInt32
        public var ready: [NodeID: StepReady] = [:]
        public var protectedNodes: Set<NodeID> = []
        /// Nodes known to hold every node's protected report (see ``StepProtected/stable``).
        public var stableNodes: Set<NodeID> = []
        public var committed = false
        /// Ranks covered by the manifests in the readiness reports.
        public var ranksByNode: [NodeID: [Rank]] = [:]
    }

    public struct StepID: Hashable, Sendable, Comparable {
        public let job: JobID
        public let step: Step
        public init(job: JobID, step: Step) {
            self.job = job
            self.step = step
        }
        public static func < (a: StepID, b: StepID) -> Bool { (a.job, a.step) < (b.job, b.step) }
    }

    public private(set) var steps: [StepID: StepEntry] = [:]

    public init(configuration: ClusterConfiguration) { self.configuration = configuration }

    // MARK: Reports

    /// Records a node's readiness report; `ranks` are the ranks its manifests cover.
    public mutating func recordReady(_ ready: StepReady, ranks: [Rank]) {
        let id = StepID(job: ready.job, step: ready.step)
        if steps[id] == nil { steps[id] = StepEntry(world: ready.world) }
        steps[id]!.ready[ready.nodeID] = ready
        steps[id]!.ranksByNode[ready.nodeID] = ranks
    }

    public mutating func recordProtected(job: JobID, step: Step, node: NodeID) {
        let id = StepID(job: job, step: step)
        guard steps[id] != nil else { return }
        steps[id]!.protectedNodes.insert(node)
    }

    /// `node` holds every node's protected report for the step (so it is protected too).
    public mutating func recordStable(job: JobID, step: Step, node: NodeID) {
        let id = StepID(job: job, step: step)
        guard steps[id] != nil else { return }
        steps[id]!.protectedNodes.insert(node)
        steps[id]!.stableNodes.insert(node)
    }

    /// Every node of the cluster reported ready and protected, and their
    /// shards cover ranks 0..<world exactly: the step can commit once every
    /// node knows it (``commitIfComplete(job:step:requireStable:)``).
    public func isFullyProtected(job: JobID, step: Step) -> Bool {
        guard let entry = entry(job: job, step: step) else { return false }
        let nodes = Set(configuration.nodeIDs)
        guard Set(entry.ready.keys) == nodes, entry.protectedNodes.isSuperset(of: nodes) else { return false }
        let ranks = entry.ranksByNode.values.flatMap { $0 }
        return ranks.count == Int(entry.world) && Set(ranks) == Set(0..<entry.world)
    }

    /// Whether the step is now committed: every node of the cluster reported
    /// ready and protected (a node with an empty share too: its report says
    /// it holds the parity it owes the step), and their shards cover ranks 0..<world exactly.
    /// Returns true once, on the transition.
    ///
    /// Stable votes are needed from every node but `excused` ones (declared
    /// dead): a dead node's knowledge cannot be lost with it once every live
    /// node knows every protected report, and waiting for its vote would stall
    /// the commit until a replacement arrives.
    public mutating func commitIfComplete(job: JobID, step: Step, requireStable: Bool = true, excused: Set<NodeID> = []) -> Bool {
        let id = StepID(job: job, step: step)
        guard let entry = steps[id], !entry.committed, isFullyProtected(job: job, step: step) else { return false }
        guard !requireStable || entry.stableNodes.union(excused).isSuperset(of: configuration.nodeIDs) else { return false }
        steps[id]!.committed = true
        return true
    }

    public mutating func markCommitted(job: JobID, step: Step) {
        steps[StepID(job: job, step: step)]?.committed = true
    }

    /// Forgets steps the node no longer keeps.
    public mutating func forget(job: JobID, step: Step) { steps[StepID(job: job, step: step)] = nil }

    public func entry(job: JobID, step: Step) -> StepEntry? { steps[StepID(job: job, step: step)] }

    // MARK: Layout of a step

    /// Every member of `group` has reported: their data sizes fix the fragment size.
    public func fragmentSizeBytes(job: JobID, step: Step, group: ClusterConfiguration.Group) -> UInt64? {
        guard let entry = entry(job: job, step: step) else { return nil }
        var sizes: [Int] = []
        for node in group.nodes {
            // Reports are validated on arrival (``ProtectionMachine.validate(_:dataFragments:)``): sizes fit.
            guard let ready = entry.ready[node], let size = Int(exactly: ready.dataSizeBytes) else { return nil }
            sizes.append(size)
        }
        return (try? group.layout.fragmentSizeBytes(nodeDataSizesBytes: sizes)).flatMap { UInt64(exactly: $0) }
    }

    /// Data slots of `stripe` that carry bytes (a source whose data ends before
    /// its fragment contributes zeroes, which need not travel).
    public func nonZeroSlots(job: JobID, step: Step, group: ClusterConfiguration.Group, stripe: Int, fragmentSizeBytes: UInt64) -> Set<Int>? {
        guard let entry = entry(job: job, step: step) else { return nil }
        let layout = group.layout
        var slots = Set<Int>()
        for slot in 0..<layout.dataFragmentCount {
            guard let position = try? layout.dataSource(stripe: stripe, slot: slot), let ready = entry.ready[group.nodes[position]] else { return nil }
            guard case .data(_, let fragment)? = try? layout.role(node: position, stripe: stripe) else { continue }
            if UInt64(fragment) * fragmentSizeBytes < ready.dataSizeBytes { slots.insert(slot) }
        }
        return slots
    }

    // MARK: Recovery picture

    /// Per job: the newest committed step, the newest one every rank of which
    /// survives (a group loses nothing while at most m of its members are
    /// lost), and the ranks lost at the newest committed step. `lostShares`
    /// are shares a node could not rebuild (their surviving bytes were bad):
    /// lost whatever the group's tolerance.
    public func recovery(lostNodes: Set<NodeID>, lostShares: [StepID: NodeID] = [:]) -> [JobRecovery] {
        let jobs = Set(steps.keys.map(\.job)).sorted()
        return jobs.map { job in
            let committed = steps.filter { $0.key.job == job && $0.value.committed }.sorted { $0.key.step > $1.key.step }
            func lostRanks(_ id: StepID, _ entry: StepEntry) -> [Rank] { self.lostRanks(entry, id: id, lostNodes: lostNodes, lostShares: lostShares) }
            let latest = committed.first
            let restorable = committed.first { lostRanks($0.key, $0.value).isEmpty }
            let lost = latest.map { lostRanks($0.key, $0.value) } ?? []
            let summary: String
            if latest == nil {
                summary = "no committed step"
            } else if lost.isEmpty {
                summary = lostNodes.isEmpty ? "all ranks intact" : "recoverable: lost nodes \(lostNodes.sorted()) are within every group's tolerance"
            } else {
                let groups = configuration.groups.filter { g in g.nodes.filter(lostNodes.contains).count > g.parity }
                    .map { "group \($0.index) lost \($0.nodes.filter(lostNodes.contains)) of \($0.nodes.count), tolerates \($0.parity)" }
                let unrebuildable = lostShares.keys.filter { $0.job == job }.sorted().map { "step \($0.step) on node \(lostShares[$0]!)" }
                let causes = (groups.isEmpty ? [] : ["beyond tolerance: " + groups.joined(separator: "; ")])
                    + (unrebuildable.isEmpty ? [] : ["could not be rebuilt (surviving bytes failed their checksums): " + unrebuildable.joined(separator: ", ")])
                summary = causes.joined(separator: "; ") + "; ranks \(lost) of step \(latest!.key.step) are lost; "
                    + (restorable.map { "newest fully restorable step is \($0.key.step)" } ?? "no step is fully restorable from memory: fall back to the last persistent checkpoint")
            }
            return JobRecovery(job: job, latestCommitted: latest?.key.step, newestRestorable: restorable?.key.step, lostRanks: lost, summary: summary)
        }
    }

    /// Ranks of a step whose shards cannot be restored: those of groups that
    /// lost more members than they tolerate, and those of shares that could
    /// not be rebuilt.
    public func lostRanks(_ entry: StepEntry, id: StepID, lostNodes: Set<NodeID>, lostShares: [StepID: NodeID] = [:]) -> [Rank] {
        var ranks = Set<Rank>()
        for group in configuration.groups {
            let lost = group.nodes.filter { lostNodes.contains($0) && (entry.ready[$0]?.dataSizeBytes ?? 0) > 0 }
            let lostMembers = group.nodes.filter(lostNodes.contains)
            if lostMembers.count > group.parity { ranks.formUnion(lost.flatMap { entry.ranksByNode[$0] ?? [] }) }
        }
        if let node = lostShares[id] { ranks.formUnion(entry.ranksByNode[node] ?? []) }
        return ranks.sorted()
    }

    /// A page of this node's view: whole steps in order, without the reports
    /// the requester says it holds, while their reports fit `pageBytes`
    /// (``Limits/clusterStatePageBytes`` between daemons). A node's view of a
    /// large cluster at LLM scale is gigabytes of manifests; no message the
    /// daemon builds may exceed what it accepts, so the view travels in pages.
    public func clusterState(omitting known: Set<ReportID> = [], pageBytes: Int = Int.max) -> ClusterStateReply {
        var page: [ClusterStepState] = []
        var usedBytes = 0
        for (id, entry) in steps.sorted(by: { $0.key < $1.key }) {
            let missing = entry.ready.values.filter { !known.contains(ReportID(job: id.job, step: id.step, node: $0.nodeID)) }.sorted { $0.nodeID < $1.nodeID }
            var included: [StepReady] = []
            for ready in missing {
                let bytes = Self.encodedSizeEstimate(ready)
                // At least one report per page, so every page makes progress.
                guard usedBytes == 0 || usedBytes + bytes <= pageBytes else { break }
                included.append(ready)
                usedBytes += bytes
            }
            guard included.count == missing.count else {
                // The page ends inside this step: its reports so far travel as
                // plain reports. Its committed, protected and stable marks come
                // with the page that completes it, so no node ever holds a step
                // marked committed without the reports that say what it is.
                if !included.isEmpty { page.append(ClusterStepState(job: id.job, step: id.step, committed: false, ready: included, protectedNodes: [])) }
                return ClusterStateReply(steps: page, complete: false)
            }
            page.append(ClusterStepState(
                job: id.job, step: id.step, committed: entry.committed, ready: included,
                protectedNodes: entry.protectedNodes.sorted(), stableNodes: entry.stableNodes.sorted()))
        }
        return ClusterStateReply(steps: page, complete: true)
    }

    /// About how many bytes a report takes on the wire (its manifests dominate).
    static func encodedSizeEstimate(_ ready: StepReady) -> Int {
        ready.manifests.reduce(64) { $0 + $1.count + 4 }
    }

    /// The reports this node holds (for ``ClusterStateRequest/known``).
    public var knownReports: [ReportID] {
        steps.flatMap { id, entry in entry.ready.keys.map { ReportID(job: id.job, step: id.step, node: $0) } }
    }
}
