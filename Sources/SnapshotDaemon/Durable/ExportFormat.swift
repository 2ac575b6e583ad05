import ErasureCoding
import Foundation
public import SnapshotProtocol
import SnapshotCore

/// The export format, shared by `snapshotctl export` and the durable tier
/// (docs/operations.md, "The durable tier"): a step is a directory
///
///     <root>/<job>/step-<step, 20 digits>/
///         rank-<rank, 5 digits>.safetensors   the rank's tensors
///         rank-<rank, 5 digits>.json          the rank's manifest (RankManifest)
///         manifest.json                       the step (StepManifest)
///
/// Plain safetensors, so Python's `safetensors` and torch users read it
/// without snapshotd; the JSON keeps what safetensors cannot say (tensor
/// kinds, exact dtypes, CRCs, topology, metadata). A rank's JSON is written
/// after its safetensors file, so its presence says the rank is whole.
public enum ExportLayout {
    public static func stepDirectory(root: String, job: JobID, step: Step) -> String {
        "\(root)/\(job)/" + stepDirectoryName(step)
    }

    public static func stepDirectoryName(_ step: Step) -> String {
        let digits = String(step)
        return "step-" + String(repeating: "0", count: max(0, 20 - digits.count)) + digits
    }

    /// The step a directory name stands for, or nil for anything else.
    public static func step(directoryName name: String) -> Step? {
        guard name.hasPrefix("step-"), name.count == 25 else { return nil }
        return Step(name.dropFirst(5))
    }

    public static func tensorFile(rank: Rank) -> String { "rank-\(padded(rank)).safetensors" }
    public static func rankManifestFile(rank: Rank) -> String { "rank-\(padded(rank)).json" }
    public static let stepManifestFile = "manifest.json"

    private static func padded(_ rank: Rank) -> String {
        let digits = String(rank)
        return String(repeating: "0", count: max(0, 5 - digits.count)) + digits
    }
}

/// `manifest.json`: the step as a whole. It depends only on the job, step
/// and world, so every node that flushes part of the step writes the same bytes.
public struct StepManifest: Codable, Equatable, Sendable {
    public static let formatName = "snapshotd-export"
    public var format = formatName
    public var version = 1
    public var job: String
    public var step: Step
    public var world: UInt32
    /// One entry per rank, in rank order: its tensor file and its manifest.
    public var ranks: [RankFiles]

    public struct RankFiles: Codable, Equatable, Sendable {
        public var rank: Rank
        public var tensors: String
        public var manifest: String
    }

    public init(job: JobID, step: Step, world: UInt32) {
        self.job = job.rawValue
        self.step = step
        self.world = world
        ranks = (0..<world).map { RankFiles(rank: $0, tensors: ExportLayout.tensorFile(rank: $0), manifest: ExportLayout.rankManifestFile(rank: $0)) }
    }
}

/// `rank-N.json`: one rank's shard, tensors in the order the trainer saved them.
public struct RankManifest: Codable, Equatable, Sendable {
    public var job: String
    public var step: Step
    public var rank: Rank
    public var world: UInt32
    public var topology: TopologyRecord
    public var gradientNorm: Double?
    /// The trainer's opaque metadata, base64.
    public var metadata: String
    /// Set when the shard was rebuilt approximately (CheckFree): how.
    public var approximate: String?
    public var tensors: [Tensor]

    public struct TopologyRecord: Codable, Equatable, Sendable {
        public var pipelineStage: UInt32
        public var tensorParallelIndex: UInt32
        public var dataParallelIndex: UInt32
    }

    public struct Tensor: Codable, Equatable, Sendable {
        public var name: String
        public var kind: String
        /// The safetensors dtype ("F32", "BF16", …).
        public var dtype: String
        /// snapshotd's own dtype: safetensors says "U8" for both raw bytes and uint8.
        public var snapshotdDtype: String
        public var shape: [Int64]
        public var bytes: UInt64
        public var crc32c: UInt32
    }

    public init(key: ShardKey, world: UInt32, shard: ShardRecord) {
        job = key.job.rawValue
        step = key.step
        rank = key.rank
        self.world = world
        topology = TopologyRecord(
            pipelineStage: shard.topology.pipelineStage, tensorParallelIndex: shard.topology.tensorParallelIndex,
            dataParallelIndex: shard.topology.dataParallelIndex)
        gradientNorm = shard.gradientNorm
        metadata = Data(shard.metadata).base64EncodedString()
        approximate = shard.reconstruction.map { "\($0)" }
        tensors = shard.manifest.map { entry in
            Tensor(
                name: entry.spec.name, kind: "\(entry.spec.kind)", dtype: entry.spec.dtype.description, snapshotdDtype: entry.spec.dtype.name,
                shape: entry.spec.shape, bytes: entry.spec.byteLength, crc32c: entry.crc32c)
        }
    }

    /// The manifest entries this file describes, each checked as a begin-save is.
    public func entries() throws -> [ManifestEntry] {
        try tensors.map { tensor in
            guard let dtype = DType.allCases.first(where: { $0.name == tensor.snapshotdDtype }) else {
                throw StoreError(.invalidRequest, "tensor '\(tensor.name)': unknown dtype '\(tensor.snapshotdDtype)'")
            }
            guard let kind = TensorKind.allCases.first(where: { "\($0)" == tensor.kind }) else {
                throw StoreError(.invalidRequest, "tensor '\(tensor.name)': unknown kind '\(tensor.kind)'")
            }
            do {
                return ManifestEntry(spec: try TensorSpec(name: tensor.name, dtype: dtype, shape: tensor.shape, kind: kind, byteLength: tensor.bytes), crc32c: tensor.crc32c)
            } catch {
                throw StoreError(.invalidRequest, "tensor '\(tensor.name)': \(error)")
            }
        }
    }

    public var topologyValue: Topology {
        Topology(pipelineStage: topology.pipelineStage, tensorParallelIndex: topology.tensorParallelIndex, dataParallelIndex: topology.dataParallelIndex)
    }
}

/// The safetensors container: an 8-byte little-endian header length, a JSON
/// header, then the tensors back to back. Tensors are placed largest element
/// first and the header is padded with spaces (which the format allows) to
/// ``alignmentBytes``, so every tensor starts aligned to its element size.
public enum Safetensors {
    public static let alignmentBytes = 64
    /// Headers larger than this are refused when reading (16,384 tensors with 256-byte names fit).
    public static let maximumHeaderBytes = 64 << 20

    /// Where each tensor goes: `offsets[i]` is tensor i's offset from the
    /// start of the file; `header` is the bytes before the first tensor.
    public struct Layout: Equatable, Sendable {
        public var header: [UInt8]
        public var offsets: [UInt64]
        public var fileSizeBytes: UInt64
    }

    public static func layout(_ specs: [TensorSpec], metadata: [String: String]) -> Layout {
        let order = specs.indices.sorted { a, b in
            let (x, y) = (specs[a].dtype.elementSizeBytes, specs[b].dtype.elementSizeBytes)
            return x != y ? x > y : a < b
        }
        var dataOffsets = [UInt64](repeating: 0, count: specs.count)
        var cursor: UInt64 = 0
        for index in order {
            dataOffsets[index] = cursor
            cursor += specs[index].byteLength
        }
        // JSON by hand: keys in file order, which JSONSerialization does not keep.
        var json = "{\"__metadata__\":{" + metadata.sorted { $0.key < $1.key }.map { "\(quoted($0.key)):\(quoted($0.value))" }.joined(separator: ",") + "}"
        for index in order {
            let spec = specs[index]
            json += ",\(quoted(spec.name)):{\"dtype\":\"\(spec.dtype.description)\",\"shape\":[\(spec.shape.map(String.init).joined(separator: ","))],"
                + "\"data_offsets\":[\(dataOffsets[index]),\(dataOffsets[index] + spec.byteLength)]}"
        }
        json += "}"
        var headerJSON = Array(json.utf8)
        let padding = (alignmentBytes - (8 + headerJSON.count) % alignmentBytes) % alignmentBytes
        headerJSON += [UInt8](repeating: 0x20, count: padding)
        var header = withUnsafeBytes(of: UInt64(headerJSON.count).littleEndian) { Array($0) }
        header += headerJSON
        let start = UInt64(header.count)
        return Layout(header: header, offsets: dataOffsets.map { $0 + start }, fileSizeBytes: start + cursor)
    }

    /// A parsed header: each tensor's name, safetensors dtype, shape and
    /// absolute byte range in the file.
    public struct Entry: Equatable, Sendable {
        public var dtype: String
        public var shape: [Int64]
        public var range: Range<UInt64>
    }

    /// Parses the header at the start of `file`, checking every range lies
    /// inside the file and the ranges cover the data without gaps or overlaps.
    public static func parse(_ file: UnsafeRawBufferPointer) throws -> [String: Entry] {
        guard file.count >= 8 else { throw StoreError(.invalidRequest, "safetensors file of \(file.count) bytes has no header") }
        let headerLength = UInt64(littleEndian: file.loadUnaligned(as: UInt64.self))
        guard headerLength <= UInt64(maximumHeaderBytes), 8 + headerLength <= UInt64(file.count) else {
            throw StoreError(.invalidRequest, "safetensors header of \(headerLength) bytes does not fit the file or the limit")
        }
        let start = 8 + headerLength
        let json = Data(UnsafeRawBufferPointer(rebasing: file[8..<Int(start)]))
        guard let object = try? JSONSerialization.jsonObject(with: json) as? [String: Any] else {
            throw StoreError(.invalidRequest, "safetensors header is not a JSON object")
        }
        var entries: [String: Entry] = [:]
        for (name, value) in object where name != "__metadata__" {
            guard let fields = value as? [String: Any], let dtype = fields["dtype"] as? String,
                let shape = (fields["shape"] as? [NSNumber])?.map(\.int64Value),
                let offsets = (fields["data_offsets"] as? [NSNumber])?.map(\.uint64Value), offsets.count == 2, offsets[0] <= offsets[1]
            else { throw StoreError(.invalidRequest, "safetensors header entry '\(name)' is malformed") }
            let (lower, upper) = offsets[0].addingReportingOverflow(start)
            let (end, overflow) = offsets[1].addingReportingOverflow(start)
            guard !upper, !overflow, end <= UInt64(file.count) else { throw StoreError(.invalidRequest, "tensor '\(name)' lies outside the file") }
            entries[name] = Entry(dtype: dtype, shape: shape, range: lower..<end)
        }
        var cursor = start
        for entry in entries.values.sorted(by: { ($0.range.lowerBound, $0.range.upperBound) < ($1.range.lowerBound, $1.range.upperBound) }) {
            guard entry.range.lowerBound == cursor else { throw StoreError(.invalidRequest, "safetensors data has a gap or an overlap at byte \(cursor)") }
            cursor = entry.range.upperBound
        }
        guard cursor == UInt64(file.count) else { throw StoreError(.invalidRequest, "safetensors data ends at byte \(cursor) of \(file.count)") }
        return entries
    }

    private static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
