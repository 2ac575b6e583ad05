import Foundation
import Glibc

/// Progress of long work on stderr: a bar redrawn in place on a terminal;
/// elsewhere (logs, CI, pipes) one plain line whenever it moves.
struct Progress {
    let title: String
    private let isTerminal = isatty(STDERR_FILENO) == 1
    private var last = ""

    init(title: String) { self.title = title }

    mutating func update(done: Int, total: Int, detail: String) {
        let line = "\(title): \(done)/\(total) \(detail)"
        guard line != last else { return }
        last = line
        if isTerminal {
            let width = 30
            let filled = total == 0 ? width : min(width, done * width / total)
            let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled)
            FileHandle.standardError.write(Data("\r[\(bar)] \(line)\u{1B}[K".utf8))
        } else {
            FileHandle.standardError.write(Data("\(line)\n".utf8))
        }
    }

    /// Ends the bar's line on a terminal.
    func finish() {
        if isTerminal, !last.isEmpty { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}
