import Glibc
public import SnapshotClient
import SnapshotProtocol

/// Deterministic tensors for (seed, rank, step): parameters, optimizer state
/// and an RNG blob, filled by ``SplitMix64``. Sendable: the buffers are only read after init.
public struct SyntheticState: @unchecked Sendable {
    let buffers: [UnsafeMutableRawBufferPointer]
    public let tensors: [TensorData]

    public init(seed: UInt64, rank: UInt32, step: UInt64, sizes: [Int]) {
        var specs: [TensorSpec] = []
        for (index, size) in sizes.enumerated() {
            let kind: TensorKind = index == 0 ? .rng : (index % 2 == 1 ? .parameter : .optimizer)
            let name = index == 0 ? "rng.state" : "layers.\(index / 2).\(kind == .parameter ? "weight" : "weight.exp_avg")"
            specs.append(size % 4 == 0
                ? try! TensorSpec(name: name, dtype: .float32, shape: [Int64(size / 4)], kind: kind)
                : try! TensorSpec.blob(name: name, byteCount: size, kind: kind))
        }
        buffers = sizes.map { UnsafeMutableRawBufferPointer.allocate(byteCount: max($0, 1), alignment: 64) }
        var random = SplitMix64(seed: seed &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(rank) << 32 ^ step)
        for (buffer, size) in zip(buffers, sizes) { random.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size])) }
        tensors = zip(specs, zip(buffers, sizes)).map { TensorData(spec: $0, bytes: UnsafeRawBufferPointer(rebasing: $1.0[0..<$1.1])) }
    }

    public var totalBytes: Int { tensors.reduce(0) { $0 + $1.bytes.count } }

    /// Whether a restored shard holds exactly these tensors.
    public func matches(_ shard: RestoredShard) -> Bool { restored(shard, matches: tensors) }

    public func deallocate() { buffers.forEach { $0.deallocate() } }
}
