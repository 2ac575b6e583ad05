// The functions of include/snapshotd.h (Sources/CSnapshotd/include).
import CSnapshotd
import Foundation
import Glibc
import SnapshotClient
import SnapshotIO
import SnapshotProtocol

@_cdecl("snapshotd_last_error")
public func cLastError() -> UnsafePointer<CChar> { LastError.current }

// MARK: Client

@_cdecl("snapshotd_client_open")
public func cClientOpen(
    _ job: UnsafePointer<CChar>?, _ rank: UInt32, _ world: UInt32,
    _ options: UnsafePointer<snapshotd_client_options>?, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    withStatus {
        guard let out else { throw ArgumentError("out is NULL") }
        out.pointee = nil
        let jobID = try JobID(try string(job, "job"))
        guard world > 0, world <= ProtocolLimits.maximumWorldSize else { throw ArgumentError("world \(world) outside 1...\(ProtocolLimits.maximumWorldSize)") }
        guard rank < world else { throw ArgumentError("rank \(rank) outside 0..<\(world)") }
        let options = options?.pointee ?? snapshotd_client_options()
        let endpoint: Endpoint
        if let host = options.host {
            guard options.port > 0 else { throw ArgumentError("host given without a port") }
            let secretPath = try string(options.secret_file, "secret_file (required with host)")
            guard let secret = Authentication.secret(fromFile: secretPath) else { throw ArgumentError("cannot read secret file \(secretPath)") }
            guard !secret.isEmpty else { throw ArgumentError("secret file \(secretPath) is empty") }
            switch try options.transport.map({ try string($0, "transport") }) ?? "tcp" {
            case "tcp": endpoint = .tcp(host: try string(host, "host"), port: options.port, secret: secret)
            case "rdma":
                let source = try options.rdma_source.map { try string($0, "rdma_source") }
                endpoint = .rdma(host: try string(host, "host"), port: options.port, secret: secret, source: source)
            case let other: throw ArgumentError("transport \"\(other)\" is not \"tcp\" or \"rdma\"")
            }
        } else {
            endpoint = .unix(path: options.socket_path == nil ? Endpoint.defaultUnixSocketPath : try string(options.socket_path, "socket_path"))
        }
        guard options.reply_timeout_ms >= 0 else { throw ArgumentError("reply_timeout_ms \(options.reply_timeout_ms) is negative") }
        let topology = Topology(pipelineStage: options.pipeline_stage, tensorParallelIndex: options.tensor_parallel_index, dataParallelIndex: options.data_parallel_index)
        let client = try SnapshotClient(
            endpoint: endpoint, job: jobID, rank: Rank(rank), world: world, localWorld: options.local_world, topology: topology,
            replyTimeoutMilliseconds: options.reply_timeout_ms == 0 ? SnapshotClient.defaultReplyTimeoutMilliseconds : options.reply_timeout_ms)
        out.pointee = retain(client)
    }
}

@_cdecl("snapshotd_client_close")
public func cClientClose(_ client: OpaquePointer?) { release(client, as: SnapshotClient.self) }

@_cdecl("snapshotd_client_is_local")
public func cClientIsLocal(_ client: OpaquePointer?) -> Int32 {
    guard let client else { return 0 }
    return borrow(client, as: SnapshotClient.self).usesSharedMemory ? 1 : 0
}

// MARK: Save

@_cdecl("snapshotd_save_begin")
public func cSaveBegin(
    _ client: OpaquePointer?, _ step: UInt64, _ tensors: UnsafePointer<snapshotd_tensor_spec>?, _ count: Int,
    _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    withStatus {
        guard let client, let out else { throw ArgumentError("client or out is NULL") }
        out.pointee = nil
        guard count >= 0, count <= ProtocolLimits.maximumTensorsPerShard else { throw ArgumentError("\(count) tensors; a shard holds at most \(ProtocolLimits.maximumTensorsPerShard)") }
        guard count == 0 || tensors != nil else { throw ArgumentError("tensors is NULL") }
        let specs = try (0..<count).map { index in try spec(tensors![index], index: index) }
        let owner = borrow(client, as: SnapshotClient.self)
        let pending = try owner.beginSave(step: Step(step), specs: specs)
        do {
            out.pointee = retain(try SaveBox(client: owner, pending: pending))
        } catch {
            try? owner.abortSave(step: Step(step))
            throw error
        }
    }
}

private func spec(_ tensor: snapshotd_tensor_spec, index: Int) throws -> TensorSpec {
    let name = try string(tensor.name, "tensors[\(index)].name")
    guard let dtype = UInt8(exactly: tensor.dtype).flatMap(DType.init(rawValue:)) else { throw ArgumentError("tensor '\(name)': unknown dtype \(tensor.dtype)") }
    guard let kind = UInt8(exactly: tensor.kind).flatMap(TensorKind.init(rawValue:)) else { throw ArgumentError("tensor '\(name)': unknown kind \(tensor.kind)") }
    guard tensor.ndim >= 0, tensor.ndim <= ProtocolLimits.maximumShapeRank else { throw ArgumentError("tensor '\(name)': \(tensor.ndim) dimensions, at most \(ProtocolLimits.maximumShapeRank)") }
    guard tensor.ndim == 0 || tensor.shape != nil else { throw ArgumentError("tensor '\(name)': shape is NULL") }
    let shape = (0..<Int(tensor.ndim)).map { tensor.shape![$0] }
    return try TensorSpec(name: name, dtype: dtype, shape: shape, kind: kind)
}

@_cdecl("snapshotd_save_buffer")
public func cSaveBuffer(_ save: OpaquePointer?, _ index: Int, _ byteLength: UnsafeMutablePointer<UInt64>?) -> UnsafeMutableRawPointer? {
    byteLength?.pointee = 0
    guard let save else { return nil }
    let box = borrow(save, as: SaveBox.self)
    guard index >= 0, index < box.pending.specs.count else { return nil }
    byteLength?.pointee = box.pending.specs[index].byteLength
    guard box.pending.specs[index].byteLength > 0 else { return nil }
    return box.buffer(index)?.baseAddress
}

@_cdecl("snapshotd_save_commit")
public func cSaveCommit(_ save: OpaquePointer?, _ gradientNorm: Double, _ metadata: UnsafeRawPointer?, _ metadataLength: Int) -> Int32 {
    withStatus {
        guard let save else { throw ArgumentError("save is NULL") }
        let box = borrow(save, as: SaveBox.self)
        guard !box.finished else { throw ArgumentError("save of step \(box.pending.step) was already committed") }
        guard metadataLength >= 0, metadataLength <= ProtocolLimits.maximumMetadataBytes else { throw ArgumentError("metadata of \(metadataLength) bytes; at most \(ProtocolLimits.maximumMetadataBytes)") }
        guard metadataLength == 0 || metadata != nil else { throw ArgumentError("metadata is NULL") }
        let bytes = metadataLength == 0 ? [] : Array(UnsafeRawBufferPointer(start: metadata, count: metadataLength))
        try box.commit(gradientNorm: gradientNorm.isNaN ? nil : gradientNorm, metadata: bytes)
    }
}

@_cdecl("snapshotd_save_free")
public func cSaveFree(_ save: OpaquePointer?) {
    guard let save else { return }
    let box = borrow(save, as: SaveBox.self)
    if !box.finished { try? box.client.abortSave(step: box.pending.step) }
    release(save, as: SaveBox.self)
}

// MARK: Commit state

@_cdecl("snapshotd_wait_committed")
public func cWaitCommitted(_ client: OpaquePointer?, _ step: UInt64, _ timeoutMilliseconds: UInt32, _ committed: UnsafeMutablePointer<UInt64>?) -> Int32 {
    withStatus {
        guard let client else { throw ArgumentError("client is NULL") }
        let result = try borrow(client, as: SnapshotClient.self).waitCommitted(step: Step(step), timeoutMilliseconds: timeoutMilliseconds)
        committed?.pointee = UInt64(result)
    }
}

@_cdecl("snapshotd_latest_committed")
public func cLatestCommitted(_ client: OpaquePointer?, _ found: UnsafeMutablePointer<Int32>?, _ step: UnsafeMutablePointer<UInt64>?) -> Int32 {
    withStatus {
        guard let client else { throw ArgumentError("client is NULL") }
        let latest = try borrow(client, as: SnapshotClient.self).latestCommittedStep()
        found?.pointee = latest == nil ? 0 : 1
        step?.pointee = latest ?? 0
    }
}

// MARK: Restore

@_cdecl("snapshotd_restore_open")
public func cRestoreOpen(_ client: OpaquePointer?, _ hasStep: Int32, _ step: UInt64, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    withStatus {
        guard let client, let out else { throw ArgumentError("client or out is NULL") }
        out.pointee = nil
        let owner = borrow(client, as: SnapshotClient.self)
        let shard = try owner.restore(step: hasStep != 0 ? Step(step) : nil)
        out.pointee = retain(RestoreBox(client: owner, shard: shard))
    }
}

@_cdecl("snapshotd_restore_step")
public func cRestoreStep(_ restore: OpaquePointer?) -> UInt64 {
    guard let restore else { return 0 }
    return UInt64(borrow(restore, as: RestoreBox.self).shard.step)
}

@_cdecl("snapshotd_restore_count")
public func cRestoreCount(_ restore: OpaquePointer?) -> Int {
    guard let restore else { return 0 }
    return borrow(restore, as: RestoreBox.self).shard.entries.count
}

@_cdecl("snapshotd_restore_tensor")
public func cRestoreTensor(_ restore: OpaquePointer?, _ index: Int, _ out: UnsafeMutablePointer<snapshotd_tensor_info>?) -> Int32 {
    withStatus {
        guard let restore, let out else { throw ArgumentError("restore or out is NULL") }
        let box = borrow(restore, as: RestoreBox.self)
        guard index >= 0, index < box.shard.entries.count else { throw ArgumentError("tensor index \(index) outside 0..<\(box.shard.entries.count)") }
        let entry = box.shard.entries[index]
        var info = snapshotd_tensor_info()
        info.name = UnsafePointer(box.names[index])
        info.dtype = Int32(entry.spec.dtype.rawValue)
        info.kind = Int32(entry.spec.kind.rawValue)
        info.ndim = Int32(entry.spec.shape.count)
        info.shape = UnsafePointer(box.shapes[index].baseAddress)
        info.byte_length = entry.spec.byteLength
        info.crc32c = entry.crc32c
        info.data = entry.spec.byteLength == 0 ? nil : box.shard.tensor(at: index).baseAddress
        out.pointee = info
    }
}

@_cdecl("snapshotd_restore_metadata")
public func cRestoreMetadata(_ restore: OpaquePointer?, _ length: UnsafeMutablePointer<Int>?) -> UnsafeRawPointer? {
    length?.pointee = 0
    guard let restore else { return nil }
    let box = borrow(restore, as: RestoreBox.self)
    length?.pointee = box.metadata.count
    return box.metadata.count == 0 ? nil : UnsafeRawPointer(box.metadata.baseAddress)
}

@_cdecl("snapshotd_restore_gradient_norm")
public func cRestoreGradientNorm(_ restore: OpaquePointer?) -> Double {
    guard let restore else { return .nan }
    return borrow(restore, as: RestoreBox.self).shard.gradientNorm ?? .nan
}

@_cdecl("snapshotd_restore_reconstruction")
public func cRestoreReconstruction(_ restore: OpaquePointer?, _ out: UnsafeMutablePointer<snapshotd_reconstruction>?) -> Int32 {
    var info = snapshotd_reconstruction()
    defer { out?.pointee = info }
    guard let restore, let r = borrow(restore, as: RestoreBox.self).shard.reconstruction else { return 0 }
    info.method = Int32(r.method.rawValue)
    info.source_count = UInt32(r.sourceStages.count)
    _ = withUnsafeMutableBytes(of: &info.source_stages) { $0.bindMemory(to: UInt32.self).update(fromContentsOf: r.sourceStages.prefix(2)) }
    _ = withUnsafeMutableBytes(of: &info.source_ranks) { $0.bindMemory(to: UInt32.self).update(fromContentsOf: r.sourceRanks.prefix(2)) }
    _ = withUnsafeMutableBytes(of: &info.weights) { $0.bindMemory(to: Double.self).update(fromContentsOf: r.weights.prefix(2)) }
    info.source_step = r.sourceStep
    info.optimizer_reset = r.optimizerReset ? 1 : 0
    info.learning_rate_factor = r.learningRateFactor
    return 1
}

@_cdecl("snapshotd_restore_durable_source")
public func cRestoreDurableSource(_ restore: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let restore else { return nil }
    return borrow(restore, as: RestoreBox.self).durableSource.map { UnsafePointer($0) }
}

@_cdecl("snapshotd_restore_close")
public func cRestoreClose(_ restore: OpaquePointer?) { release(restore, as: RestoreBox.self) }
