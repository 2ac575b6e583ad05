import Glibc
import SnapshotProtocol

/// Why receiving a frame failed. `framingIntact` tells whether the stream is
/// still positioned at a frame boundary (the bad frame was fully consumed), so
/// the session can answer with an error and keep serving, or must close.
public enum ConnectionError: Error, Sendable, CustomStringConvertible {
    case io(IOError)
    case malformed(ProtocolError, framingIntact: Bool, requestID: UInt64)

    public var description: String {
        switch self {
        case .io(let error): "\(error)"
        case .malformed(let error, _, _): "\(error)"
        }
    }
}

/// Frames over a ``ByteStream`` (a socket, or RDMA): header and control
/// payload; bulk bytes are moved by the caller straight between the stream
/// and their final memory.
public struct FramedConnection: Sendable {
    public let stream: any ByteStream
    /// Once a frame has started, the rest of it must arrive within this time.
    public let frameTimeoutMilliseconds: Int64

    public init(stream: any ByteStream, frameTimeoutMilliseconds: Int64 = 30_000) {
        self.stream = stream
        self.frameTimeoutMilliseconds = frameTimeoutMilliseconds
    }

    /// Sends one frame (header and control payload) within the frame timeout.
    public func send(_ message: Message, requestID: UInt64, bulkLength: UInt64 = 0, passing descriptors: [Int32] = []) throws {
        let frame = try Frame.encode(message, requestID: requestID, bulkLength: bulkLength)
        // A large frame (a manifests-carrying report) gets the bulk allowance on top.
        try stream.writeAll(frame, passing: descriptors, deadlineMilliseconds: bulkDeadline(UInt64(frame.count)))
    }

    /// Writes bulk bytes that follow a frame, within ``bulkDeadline(_:)``.
    public func sendBulk(_ buffer: UnsafeRawPointer, count: Int) throws {
        try stream.writeAll(buffer, count: count, deadlineMilliseconds: bulkDeadline(UInt64(count)))
    }

    /// Waits (without limit) for the next frame, then reads it under the frame deadline.
    /// `maximumPayloadBytes`: the most control payload accepted from this
    /// peer (large manifests-carrying messages only from authenticated daemons).
    public func receive(maximumPayloadBytes: Int = ProtocolLimits.maximumControlPayloadBytes) throws(ConnectionError) -> (header: FrameHeader, message: Message) {
        try receive(firstByteBy: nil, restBy: nil, maximumPayloadBytes: maximumPayloadBytes)
    }

    /// A reply that must start arriving by `deadlineMilliseconds` (monotonic):
    /// for request/reply between daemons, where waiting forever on a stuck
    /// peer would stall the caller (the idle wait suits only a server).
    public func receiveReply(deadlineMilliseconds: Int64, maximumPayloadBytes: Int = ProtocolLimits.maximumControlPayloadBytes) throws(ConnectionError) -> (header: FrameHeader, message: Message) {
        try receive(firstByteBy: deadlineMilliseconds, restBy: nil, maximumPayloadBytes: maximumPayloadBytes)
    }

    /// A whole frame by `deadlineMilliseconds`, with a payload of at most
    /// `maximumPayloadBytes`: what a server reads from a stranger before it
    /// has authenticated (it cannot hold a session open or buy memory).
    public func receiveBounded(deadlineMilliseconds: Int64, maximumPayloadBytes: Int) throws(ConnectionError) -> (header: FrameHeader, message: Message) {
        try receive(firstByteBy: deadlineMilliseconds, restBy: deadlineMilliseconds, maximumPayloadBytes: maximumPayloadBytes)
    }

    /// The first byte by `firstDeadline` (nil: as long as it takes, an idle
    /// trainer between saves), the rest of the header and the payload by
    /// `restDeadline` (nil: promptly, within the frame timeout).
    private func receive(firstByteBy firstDeadline: Int64?, restBy restDeadline: Int64?, maximumPayloadBytes: Int) throws(ConnectionError) -> (header: FrameHeader, message: Message) {
        var headerBytes = [UInt8](repeating: 0, count: FrameHeader.sizeBytes)
        do {
            try headerBytes.withUnsafeMutableBytes { b in
                try stream.readExact(into: b.baseAddress!, count: 1, deadlineMilliseconds: firstDeadline)
                try stream.readExact(into: b.baseAddress! + 1, count: FrameHeader.sizeBytes - 1, deadlineMilliseconds: restDeadline ?? deadline())
            }
        } catch { throw .io(Self.ioError(error)) }
        return try decodeRest(headerBytes, payloadDeadline: restDeadline, maximumPayloadBytes: maximumPayloadBytes)
    }

    /// As ``receive()``, also collecting file descriptors passed with the frame.
    public func receive(
        collecting descriptors: inout [Int32], acceptDescriptors: Bool = true, maximumPayloadBytes: Int = ProtocolLimits.maximumControlPayloadBytes
    ) throws(ConnectionError) -> (header: FrameHeader, message: Message) {
        guard acceptDescriptors else { return try receive(firstByteBy: nil, restBy: nil, maximumPayloadBytes: maximumPayloadBytes) }
        let headerBytes: [UInt8]
        do {
            headerBytes = try stream.readExact(count: FrameHeader.sizeBytes, collecting: &descriptors)
        } catch { throw .io(Self.ioError(error)) }
        return try decodeRest(headerBytes, payloadDeadline: nil, maximumPayloadBytes: maximumPayloadBytes)
    }

    /// Validates the header, then reads and decodes the payload (by
    /// `payloadDeadline`, or within the frame timeout).
    private func decodeRest(_ headerBytes: [UInt8], payloadDeadline: Int64?, maximumPayloadBytes: Int) throws(ConnectionError) -> (header: FrameHeader, message: Message) {
        let header: FrameHeader
        do {
            header = try FrameHeader(decoding: headerBytes)
        } catch { throw .malformed(error, framingIntact: false, requestID: 0) }
        guard Int(header.payloadLength) <= maximumPayloadBytes else {
            throw .malformed(.payloadTooLarge(claimedBytes: UInt64(header.payloadLength), limitBytes: UInt64(maximumPayloadBytes)), framingIntact: false, requestID: header.requestID)
        }
        let payload: [UInt8]
        do {
            payload = try stream.readExact(count: Int(header.payloadLength), deadlineMilliseconds: payloadDeadline ?? bulkDeadline(UInt64(header.payloadLength)))
        } catch { throw .io(Self.ioError(error)) }
        do {
            try header.validatePayload(payload)
            return (header, try Message(type: header.type, payload: payload))
        } catch {
            throw .malformed(error, framingIntact: header.bulkLength == 0, requestID: header.requestID)
        }
    }

    private static func ioError(_ error: any Error) -> IOError {
        error as? IOError ?? IOError("\(error)", errno: EIO)
    }

    public func deadline() -> Int64 { monotonicMilliseconds() + frameTimeoutMilliseconds }

    /// Time for `bytes` of bulk data: the frame timeout plus 10 ms per MiB
    /// (a 100 MiB/s floor), so a large transfer is not cut off by a timeout
    /// sized for one frame.
    public func bulkDeadline(_ bytes: UInt64) -> Int64 { deadline() + Int64(bytes >> 20) * 10 }

    public func close() { stream.close() }
}
