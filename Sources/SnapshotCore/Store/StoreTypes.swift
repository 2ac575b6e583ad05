public import SnapshotProtocol

/// One rank's shard of one step.
/// A promise of budget bytes to work still allocating them (``SnapshotStore/reserve(bytes:for:)``).
public typealias ReservationID = UInt64

public struct ShardKey: Hashable, Sendable, CustomStringConvertible {
    public let job: JobID
    public let step: Step
    public let rank: Rank

    public init(job: JobID, step: Step, rank: Rank) {
        self.job = job
        self.step = step
        self.rank = rank
    }

    public var description: String { "\(job)/step \(step)/rank \(rank)" }
}

/// Identifies a client connection inside the daemon.
public typealias SessionID = UInt64

/// Everything the daemon knows about a shard.
public struct ShardRecord: Sendable, Equatable {
    public var state: ShardState
    public var specs: [TensorSpec]
    public var tensorOffsets: [UInt64]
    public var segmentSizeBytes: UInt64
    public var topology: Topology
    /// Set once sealed: CRC-32C of each tensor, computed by the daemon.
    public var checksums: [UInt32]?
    public var gradientNorm: Double?
    public var metadata: [UInt8]
    /// The session writing the shard while it is `receiving`.
    public var writer: SessionID?
    /// Set when CheckFree rebuilt the shard approximately from its pipeline neighbours.
    public var reconstruction: Reconstruction? = nil

    public var manifest: [ManifestEntry] {
        guard let checksums else { return [] }
        return zip(specs, checksums).map { ManifestEntry(spec: $0, crc32c: $1) }
    }
}

/// Why the store refused something; each maps to a wire error code.
public struct StoreError: Error, Equatable, Sendable, CustomStringConvertible {
    public let code: ErrorCode
    public let message: String

    public init(_ code: ErrorCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}

/// One parity fragment a node holds: row `row` of `stripe` for a step.
public struct ParityKey: Hashable, Sendable, CustomStringConvertible {
    public let job: JobID
    public let step: Step
    public let stripe: Int

    public init(job: JobID, step: Step, stripe: Int) {
        self.job = job
        self.step = step
        self.stripe = stripe
    }

    public var description: String { "\(job)/step \(step)/parity of stripe \(stripe)" }
}

public struct ParityRecord: Sendable, Equatable {
    public var row: Int
    public var fragmentSizeBytes: UInt64
    public var segmentSizeBytes: UInt64
    /// Data slots folded in so far, with the CRC-32C of the fragment each
    /// brought (a duplicate with other bytes is a conflict, not a retry).
    public var foldedSlots: [Int: UInt32]
    /// CRC-32C of the finished parity fragment.
    public var crc32c: UInt32?

    public var isComplete: Bool { crc32c != nil }

    public init(row: Int, fragmentSizeBytes: UInt64, segmentSizeBytes: UInt64, foldedSlots: [Int: UInt32] = [:], crc32c: UInt32? = nil) {
        self.row = row
        self.fragmentSizeBytes = fragmentSizeBytes
        self.segmentSizeBytes = segmentSizeBytes
        self.foldedSlots = foldedSlots
        self.crc32c = crc32c
    }
}
