public enum SnapshotProtocolVersion { public static let string = "0.1.0" }
