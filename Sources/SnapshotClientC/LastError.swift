import Glibc

/// The per-thread message behind snapshotd_last_error(): a C string this
/// thread owns, replaced by the next failure on the same thread.
enum LastError {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        // The destructor frees a thread's message when the thread exits.
        let created = pthread_key_create(&key) { free($0) }
        precondition(created == 0, "pthread_key_create failed: \(created)")
        return key
    }()

    private static let empty: StaticString = ""

    /// Records `message` for this thread and returns `status`, for `return LastError.set(…)`.
    @discardableResult
    static func set(_ status: Int32, _ message: String) -> Int32 {
        free(pthread_getspecific(key))
        pthread_setspecific(key, strdup(message))
        return status
    }

    static var current: UnsafePointer<CChar> {
        if let message = pthread_getspecific(key) { return UnsafePointer(message.assumingMemoryBound(to: CChar.self)) }
        return UnsafeRawPointer(empty.utf8Start).assumingMemoryBound(to: CChar.self)
    }
}
