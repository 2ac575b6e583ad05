import CISAL

/// CRC-32C (Castagnoli, as in iSCSI and ext4) through ISA-L.
///
/// Chainable: `CRC32C.checksum(b, seed: CRC32C.checksum(a))` equals the
/// checksum of `a` followed by `b`. The seed/result are the finished
/// (post-inverted) values, so any result can seed the next call.
public enum CRC32C {
    /// ISA-L takes an `int` length; larger buffers are walked in chunks of this size.
    static let chunkSizeBytes = 1 << 30

    public static func checksum(_ buffer: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        var state = ~seed
        var offset = 0
        while offset < buffer.count {
            let length = min(chunkSizeBytes, buffer.count - offset)
            let chunk = UnsafeMutableRawPointer(mutating: buffer.baseAddress! + offset)
            state = crc32_iscsi(chunk.assumingMemoryBound(to: UInt8.self), Int32(length), state)
            offset += length
        }
        return ~state
    }

    public static func checksum(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, seed: seed) }
    }
}

/// CRC-64/XZ (ECMA-182 polynomial, reflected, inverted in and out) through ISA-L.
/// Chainable the same way as ``CRC32C``.
public enum CRC64 {
    public static func checksum(_ buffer: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return seed }
        // crc64_ecma_refl inverts on entry and exit itself, so seeds chain directly.
        return crc64_ecma_refl(seed, base.assumingMemoryBound(to: UInt8.self), UInt64(buffer.count))
    }

    public static func checksum(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { checksum($0, seed: seed) }
    }
}
