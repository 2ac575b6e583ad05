@testable import SnapshotCore
import SnapshotProtocol
import Testing

/// Manifests travel between nodes in readiness reports, and CheckFree lays
/// out rebuilt shards by them: a layout that is not the one the tensors
/// imply, or a gradient norm that is not a norm, is refused at decoding.
@Suite struct ManifestFileTests {
    static let job = try! JobID("manifest-job")
    static let specs = [
        try! TensorSpec(name: "layers.0.weight", dtype: .bfloat16, shape: [64, 64], kind: .parameter),
        try! TensorSpec.blob(name: "rng", byteCount: 24, kind: .rng),
    ]

    static func manifest(offsets: [UInt64]? = nil, segmentSizeBytes: UInt64? = nil, norm: Double? = 0.5, reconstruction: Reconstruction? = nil) -> ManifestFile {
        let layout = SegmentLayout.offsets(for: specs)!
        var shard = ShardRecord(
            state: .localComplete, specs: specs, tensorOffsets: offsets ?? layout.offsets, segmentSizeBytes: segmentSizeBytes ?? layout.segmentSizeBytes,
            topology: Topology(pipelineStage: 2), checksums: [1, 2], gradientNorm: norm, metadata: [7], writer: nil)
        shard.reconstruction = reconstruction
        return ManifestFile(key: ShardKey(job: job, step: 3, rank: 5), world: 8, shard: shard)
    }

    @Test func roundTripsWithAndWithoutAReconstruction() throws {
        let exact = Self.manifest()
        #expect(try ManifestFile(decoding: exact.encoded()) == exact)
        #expect(exact.encoded()[4] == 1)  // version 1 where nothing needs 2: the previous release reads it
        let approximate = Self.manifest(norm: nil, reconstruction: Reconstruction(
            method: .averagedNeighbours, sourceStages: [1, 3], sourceRanks: [2, 6], weights: [0.4, 0.6], sourceStep: 3))
        #expect(try ManifestFile(decoding: approximate.encoded()) == approximate)
        #expect(approximate.encoded()[4] == 2)
    }

    @Test func aLayoutThatDoesNotMatchTheTensorsIsRefused() {
        let layout = SegmentLayout.offsets(for: Self.specs)!
        let reason = "tensor offsets or segment size do not match the tensors' layout"
        for bad in [
            Self.manifest(offsets: [0, 1 << 40]),
            Self.manifest(offsets: [0, 256 * 1024 * 1024]),
            Self.manifest(segmentSizeBytes: layout.segmentSizeBytes * 4),
            Self.manifest(segmentSizeBytes: 1 << 49),
        ] {
            #expect(throws: ProtocolError.invalidValue(field: "manifest", reason: reason)) { try ManifestFile(decoding: bad.encoded()) }
        }
    }

    @Test func aGradientNormThatIsNotANormIsRefused() {
        for norm in [Double.nan, -1, .infinity] {
            #expect(throws: ProtocolError.self, "\(norm)") { try ManifestFile(decoding: Self.manifest(norm: norm).encoded()) }
        }
    }
}
