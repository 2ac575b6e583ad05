public enum SnapshotDaemonVersion { public static let string = "0.1.0" }
