// swift-tools-version: 6.0
// snapshotd: in-memory fault tolerance for large distributed training jobs.
// Module map and the reasons for each module's boundaries: docs/architecture.md ("Modules and what each may touch").
import PackageDescription

/// Swift 6 language mode is the default for tools 6.0; strict concurrency comes with it.
let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "snapshotd",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ErasureCoding", targets: ["ErasureCoding"]),
        .library(name: "SnapshotProtocol", targets: ["SnapshotProtocol"]),
        .library(name: "SnapshotCore", targets: ["SnapshotCore"]),
        .library(name: "SnapshotDaemon", targets: ["SnapshotDaemon"]),
        .library(name: "SnapshotClient", targets: ["SnapshotClient"]),
        // The C interface (Sources/CSnapshotd/include/snapshotd.h) as libsnapshotdclient.so, for C, C++ and Python.
        .library(name: "snapshotdclient", type: .dynamic, targets: ["SnapshotClientC"]),
        .executable(name: "snapshotd", targets: ["snapshotd"]),
        .executable(name: "snapshotctl", targets: ["snapshotctl"]),
        .executable(name: "snapshot-bench", targets: ["snapshot-bench"]),
        .executable(name: "snapshot-trainer", targets: ["snapshot-trainer"]),
        .executable(name: "snapshot-demo", targets: ["snapshot-demo"]),
        // The RDMA transport's checks, run inside the Soft-RoCE guest (Tests/rdma-guest/run.sh).
        .executable(name: "rdma-guest-test", targets: ["rdma-guest-test"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        // System libraries (Debian: libisal-dev, libibverbs-dev, librdmacm-dev).
        .systemLibrary(name: "CISAL", pkgConfig: "libisal", providers: [.apt(["libisal-dev"])]),
        .systemLibrary(name: "CRDMA", pkgConfig: "libibverbs", providers: [.apt(["libibverbs-dev", "librdmacm-dev"])]),

        // Reed-Solomon, CRCs and the stripe layout. Pure computation, no I/O.
        .target(name: "ErasureCoding", dependencies: ["CISAL"], swiftSettings: strictSettings),
        // Wire format, identifiers, manifest, limits. Pure value types, no I/O.
        .target(name: "SnapshotProtocol", dependencies: ["ErasureCoding"], swiftSettings: strictSettings),
        // CheckFree stage reconstruction: the planner (reports in, plan or
        // refusal out) and the averaging kernels. Pure computation, no I/O.
        .target(name: "CStageAveraging"),
        .target(name: "CheckFree", dependencies: ["SnapshotProtocol", "CStageAveraging"], swiftSettings: strictSettings),
        // Sockets, framed connections, fd passing, mapped segments, HMAC auth:
        // the I/O shared by daemon, client and CLI.
        .target(name: "CSocketShim"),
        .target(
            name: "SnapshotIO",
            dependencies: ["CSocketShim", "SnapshotProtocol", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: strictSettings
        ),
        // RDMA over libibverbs and librdmacm: rdma_cm connections, registered
        // memory, SEND/RECV messages and RDMA WRITE, every failure a typed error.
        // RDMAStream: the same byte stream as a socket, with bulk bytes moved by RDMA WRITE.
        .target(name: "RDMATransport", dependencies: ["CRDMA", "SnapshotIO"], swiftSettings: strictSettings),
        .executableTarget(
            name: "rdma-guest-test", dependencies: ["RDMATransport", "SnapshotProtocol", "SnapshotIO", "SnapshotClient", "ErasureCoding"], swiftSettings: strictSettings),
        // The daemon's decisions: store bookkeeping, protection and commit,
        // rebuild, failure detection, the cluster map, limits. Value types and
        // state machines, time passed in; it imports no I/O module (no
        // SnapshotIO, RDMATransport, Glibc, Dispatch, Logging), so the compiler keeps it pure.
        .target(name: "SnapshotCore", dependencies: ["ErasureCoding", "SnapshotProtocol"], swiftSettings: strictSettings),
        // The daemon as a library: the core's decisions carried out (arena
        // files, sockets, peers, threads).
        .target(
            name: "SnapshotDaemon",
            dependencies: [
                "ErasureCoding", "SnapshotProtocol", "SnapshotCore", "SnapshotIO", "CRDMA", "RDMATransport", "CheckFree",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ],
            swiftSettings: strictSettings
        ),
        // The trainer-side library.
        .target(name: "SnapshotClient", dependencies: ["SnapshotProtocol", "SnapshotIO", "RDMATransport"], swiftSettings: strictSettings),
        // The C interface over it: the header's home (CSnapshotd) and its Swift implementation.
        .target(name: "CSnapshotd"),
        .target(name: "SnapshotClientC", dependencies: ["CSnapshotd", "SnapshotClient", "SnapshotProtocol", "SnapshotIO"], swiftSettings: strictSettings),

        .executableTarget(
            name: "snapshotd",
            dependencies: [
                "SnapshotDaemon",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "snapshotctl",
            dependencies: ["SnapshotClient", "SnapshotDaemon", "SnapshotIO", "SnapshotProtocol", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strictSettings
        ),

        // Drives deploy/local-cluster.sh: for the demo, the cluster benchmark and the tests.
        .target(name: "LocalCluster", dependencies: ["SnapshotClient"], swiftSettings: strictSettings),
        // The README's first command: a local multi-node demo, end to end.
        .executableTarget(
            name: "snapshot-demo",
            dependencies: ["LocalCluster", "SnapshotClient", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strictSettings
        ),
        // A synthetic trainer rank for tests and the demo.
        .executableTarget(
            name: "snapshot-trainer",
            dependencies: ["SnapshotClient", "SnapshotIO", "LocalCluster", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strictSettings
        ),

        // Benchmarks: the C reference calls ISA-L directly so Swift can be compared in the same run.
        .target(name: "CISALReference", dependencies: ["CISAL"], cSettings: [.unsafeFlags(["-O3"])]),
        .executableTarget(
            name: "snapshot-bench",
            dependencies: [
                "ErasureCoding", "CISALReference", "SnapshotDaemon", "SnapshotClient", "LocalCluster", "CheckFree",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),

        .testTarget(name: "RDMATransportTests", dependencies: ["RDMATransport"], swiftSettings: strictSettings),
        .testTarget(name: "ErasureCodingTests", dependencies: ["ErasureCoding", "SnapshotProtocol"], swiftSettings: strictSettings),
        .testTarget(name: "SnapshotProtocolTests", dependencies: ["SnapshotProtocol"], swiftSettings: strictSettings),
        .testTarget(name: "CheckFreeTests", dependencies: ["CheckFree"], swiftSettings: strictSettings),
        .testTarget(name: "SnapshotCoreTests", dependencies: ["SnapshotCore"], swiftSettings: strictSettings),
        .testTarget(name: "SnapshotDaemonTests", dependencies: ["SnapshotDaemon", "SnapshotCore"], swiftSettings: strictSettings),
        // Real processes: depends on the executables so `swift test` builds them.
        .testTarget(
            name: "SnapshotIntegrationTests",
            dependencies: ["SnapshotClient", "SnapshotIO", "LocalCluster", "CheckFree", "snapshotd", "snapshot-trainer", "snapshotctl"],
            swiftSettings: strictSettings
        ),
    ]
)
