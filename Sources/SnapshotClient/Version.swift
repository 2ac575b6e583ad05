public enum SnapshotClientVersion { public static let string = "0.1.0" }
