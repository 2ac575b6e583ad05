/// The one version of snapshotd: the daemon, `snapshotctl`, the C library
/// (`SNAPSHOTD_VERSION` in snapshotd.h) and the Python package carry it;
/// `VersionTests` fails when any of them says otherwise.
public enum SnapshotdVersion {
    public static let string = "0.5.0"
}
