// libFuzzer target over everything snapshotd decodes from the network before
// trusting it: frame headers, every message type's payload, tensor specs and
// the layout arithmetic of a begin-save. Built by fuzz/run.sh with
// `-sanitize=fuzzer` (coverage-guided); any trap is a crash the fuzzer reports.
import ErasureCoding
import SnapshotProtocol

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    // 1. As a whole frame (header, then payload by type).
    if let (header, message, _) = try? Frame.decode(bytes) {
        // Whatever decodes must re-encode to the same payload.
        let payload = message.encodedPayload()
        precondition(payload == Array(bytes[FrameHeader.sizeBytes..<(FrameHeader.sizeBytes + Int(header.payloadLength))]), "decode/encode mismatch for \(header.type)")
        if case .beginSave(let save) = message { checkLayout(save.tensors) }
    }
    // 2. As a payload of each message type behind a valid header.
    if let first = bytes.first, let type = MessageType(rawValue: first) {
        let payload = Array(bytes.dropFirst())
        if let message = try? Message(type: type, payload: payload) {
            precondition(message.encodedPayload() == payload, "payload of \(type) re-encodes differently")
            if case .beginSave(let save) = message { checkLayout(save.tensors) }
        }
    }
    return 0
}

/// The arithmetic a daemon does on a begin-save's sizes before its budget
/// check (``SegmentLayout``, mirrored here without the daemon's module):
/// checked, so an overflow is a refusal.
private func checkLayout(_ specs: [TensorSpec]) {
    let limit: UInt64 = 1 << 50
    var cursor: UInt64 = 0
    for spec in specs {
        guard spec.byteLength <= limit - cursor else { return }
        cursor = (cursor + spec.byteLength + 255) / 256 * 256
    }
}
