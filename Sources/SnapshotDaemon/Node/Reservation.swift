/// What a piece of work has taken while it goes reserve → allocate →
/// install: budget bytes in the store, segment files in the arena, markers
/// on disk. Saves, parity and rebuilds each hold one; every step records how
/// to undo itself, and unless the work reaches ``installed()`` the undos run
/// (newest first) when the reservation goes out of scope, so a throw at any
/// point leaves nothing behind: no segment file, no reserved byte.
///
/// Noncopyable: exactly one owner ends it. An undo must not run under the
/// state lock (each takes what it needs itself): keep the reservation alive
/// outside `withLock` closures.
struct Reservation: ~Copyable {
    private var undos: [() -> Void] = []

    init() {}

    /// Records how to give back what was just taken.
    mutating func took(_ undo: @escaping () -> Void) { undos.append(undo) }

    /// The work is installed: what it took is now owned by the node's state.
    consuming func installed() { undos.removeAll() }

    deinit { for undo in undos.reversed() { undo() } }
}
