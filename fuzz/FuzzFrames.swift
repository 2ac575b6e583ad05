// libFuzzer target over everything snapshotd decodes from the network before
// trusting it: frame headers, every message type's payload, tensor specs and
// the layout arithmetic of a begin-save (the daemon's own SegmentLayout). Built by fuzz/run.sh with
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

/// The arithmetic a daemon runs on a begin-save's sizes before its budget
/// check (``SegmentLayout``, the daemon's own code): an overflow must be a
/// refusal (nil), never a trap, and what it accepts must be consistent.
private func checkLayout(_ specs: [TensorSpec]) {
    guard let (offsets, size) = SegmentLayout.offsets(for: specs) else { return }
    precondition(offsets.count == specs.count && size <= SegmentLayout.maximumSegmentBytes && size % SegmentLayout.segmentGranularityBytes == 0)
    for (offset, spec) in zip(offsets, specs) {
        precondition(offset % SegmentLayout.tensorAlignmentBytes == 0 && offset + spec.byteLength <= size, "tensor outside its segment")
    }
}
