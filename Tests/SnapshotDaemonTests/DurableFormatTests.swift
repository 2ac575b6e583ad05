import Foundation
import SnapshotProtocol
import Testing

@testable import SnapshotCore
@testable import SnapshotDaemon

@Suite("Durable tier: flush cadence and the export format")
struct DurableFormatTests {
    @Test func everyNthStepIsDueAndAFlusherBehindSkipsToTheNewest() {
        let policy = FlushPolicy(everySteps: 2, intervalMilliseconds: 0)
        let start = FlushPolicy.Progress(lastStep: nil, lastFlushMilliseconds: 0)
        #expect(policy.stepToFlush(committed: [1], progress: start, nowMilliseconds: 10) == nil)
        #expect(policy.stepToFlush(committed: [1, 2], progress: start, nowMilliseconds: 10) == 2)
        let after2 = FlushPolicy.Progress(lastStep: 2, lastFlushMilliseconds: 10)
        #expect(policy.stepToFlush(committed: [2, 3], progress: after2, nowMilliseconds: 20) == nil)
        #expect(policy.stepToFlush(committed: [4, 5, 6, 7], progress: after2, nowMilliseconds: 20) == 6, "4 is skipped: only the newest due step")
    }

    @Test func byTimeTheNewestCommittedStepIsDueOnceTheIntervalPassed() {
        let policy = FlushPolicy(everySteps: 0, intervalMilliseconds: 1000)
        let progress = FlushPolicy.Progress(lastStep: 3, lastFlushMilliseconds: 5000)
        #expect(policy.stepToFlush(committed: [3, 4, 5], progress: progress, nowMilliseconds: 5999) == nil)
        #expect(policy.stepToFlush(committed: [3, 4, 5], progress: progress, nowMilliseconds: 6000) == 5)
        #expect(policy.stepToFlush(committed: [3], progress: progress, nowMilliseconds: 9000) == nil, "nothing newer than the last flush")
        let both = FlushPolicy(everySteps: 10, intervalMilliseconds: 1000)
        #expect(both.stepToFlush(committed: [10, 11], progress: progress, nowMilliseconds: 5500) == 10, "by count before the interval")
        #expect(both.stepToFlush(committed: [10, 11], progress: progress, nowMilliseconds: 7000) == 11, "by time, the newest")
    }

    static func specs() throws -> [TensorSpec] {
        [
            try TensorSpec.blob(name: "rng \"state\"\\n", byteCount: 7, kind: .rng),
            try TensorSpec(name: "w", dtype: .bfloat16, shape: [3, 5], kind: .parameter),
            try TensorSpec(name: "m", dtype: .float64, shape: [2], kind: .optimizer),
            try TensorSpec(name: "empty", dtype: .float32, shape: [0, 4], kind: .parameter),
            try TensorSpec(name: "step", dtype: .int64, shape: [], kind: .extra),
        ]
    }

    @Test func theLayoutAlignsEveryTensorToItsElementSizeAndParsesBack() throws {
        let specs = try Self.specs()
        let layout = Safetensors.layout(specs, metadata: ["snapshotd.job": "j"])
        #expect(layout.header.count % Safetensors.alignmentBytes == 0)
        #expect(zip(specs, layout.offsets).allSatisfy { $1 % $0.dtype.elementSizeBytes == 0 })
        #expect(layout.offsets[2] == UInt64(layout.header.count), "the 8-byte float64 comes first")
        var file = layout.header + [UInt8](repeating: 0, count: Int(layout.fileSizeBytes) - layout.header.count)
        for (spec, offset) in zip(specs, layout.offsets) {
            for i in 0..<Int(spec.byteLength) { file[Int(offset) + i] = UInt8(truncatingIfNeeded: i &+ spec.name.count) }
        }
        let parsed = try file.withUnsafeBytes { try Safetensors.parse($0) }
        #expect(parsed.count == specs.count)
        for (spec, offset) in zip(specs, layout.offsets) {
            let entry = try #require(parsed[spec.name], "\(spec.name) (escaped in JSON) parses back")
            #expect(entry.range == offset..<offset + spec.byteLength)
            #expect(entry.dtype == spec.dtype.description)
            #expect(entry.shape == spec.shape)
        }
    }

    @Test func malformedFilesAreRefusedNotTrappedOn() throws {
        let layout = Safetensors.layout(try Self.specs(), metadata: [:])
        let whole = layout.header + [UInt8](repeating: 0, count: Int(layout.fileSizeBytes) - layout.header.count)
        func refusal(_ bytes: [UInt8]) -> String? {
            do {
                _ = try bytes.withUnsafeBytes { try Safetensors.parse($0) }
                return nil
            } catch {
                return "\(error)"
            }
        }
        #expect(refusal(Array(whole.prefix(5)))?.contains("has no header") == true)
        #expect(refusal(Array(whole.dropLast()))?.contains("lies outside the file") == true, "truncated")
        #expect(refusal(whole + [0])?.contains("ends at byte") == true, "trailing bytes")
        var huge = whole
        huge.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64.max.littleEndian) { Array($0) })
        #expect(refusal(huge)?.contains("does not fit") == true)
        var garbage = whole
        garbage[8] = UInt8(ascii: "[")
        #expect(refusal(garbage)?.contains("not a JSON object") == true)
        let gap = Array(#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#.utf8)
        let gapped = withUnsafeBytes(of: UInt64(gap.count).littleEndian) { Array($0) } + gap + [0, 0]
        #expect(refusal(gapped)?.contains("gap or an overlap") == true)
    }

    @Test func aRankManifestKeepsExactDtypesKindsAndChecksums() throws {
        let specs = try Self.specs() + [try TensorSpec(name: "u", dtype: .uint8, shape: [7], kind: .carried)]
        let shard = ShardRecord(
            state: .protected, specs: specs, tensorOffsets: specs.map { _ in 0 }, segmentSizeBytes: 4096, topology: Topology(pipelineStage: 2, tensorParallelIndex: 1),
            checksums: specs.indices.map { UInt32($0) &* 0x9E37_79B9 }, gradientNorm: 0.75, metadata: [0, 255, 7], writer: nil)
        let manifest = RankManifest(key: ShardKey(job: try JobID("j"), step: 12, rank: 3), world: 8, shard: shard)
        let decoded = try DurableFiles.decoder.decode(RankManifest.self, from: try DurableFiles.encoder.encode(manifest))
        #expect(decoded == manifest)
        #expect(try decoded.entries() == shard.manifest, "bytes and uint8 (both U8 in safetensors) stay apart")
        #expect(decoded.topologyValue == shard.topology)
        let json = String(decoding: try DurableFiles.encoder.encode(manifest), as: UTF8.self)
        #expect(json.contains("\"snapshotd_dtype\" : \"bfloat16\"") && json.contains("\"gradient_norm\" : 0.75"), "\(json)")
    }
}

@Suite("Transport selection")
struct TransportSelectionTests {
    static let rxe = RDMADevices.Device(name: "rxe0", activePorts: [1])

    @Test func autoFallsBackToTCPAndSaysWhy() throws {
        #expect(try TransportSelection.decide(.auto, devices: []).used == .tcp)
        #expect(try TransportSelection.decide(.auto, devices: []).logLine.contains("no RDMA device on this machine; falling back to TCP"))
        let withDevice = try TransportSelection.decide(.auto, devices: [Self.rxe])
        #expect(withDevice.used == .rdma)
        #expect(withDevice.logLine.contains("rxe0 (active ports [1])"))
    }

    @Test func rdmaWithoutADeviceIsRefusedAtStart() throws {
        #expect(throws: ConfigurationError.self) { try TransportSelection.decide(.rdma, devices: []) }
        #expect(try TransportSelection.decide(.tcp, devices: [Self.rxe]).used == .tcp)
    }
}
