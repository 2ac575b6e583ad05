"""Real snapshotd daemons for the tests: started as processes, killed after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def daemon_binary() -> Path:
    """$SNAPSHOTD_BINARY, else the repository's release or debug build, else PATH."""
    given = os.environ.get("SNAPSHOTD_BINARY")
    candidates = [Path(given)] if given else []
    candidates += [REPOSITORY / ".build" / "release" / "snapshotd", REPOSITORY / ".build" / "debug" / "snapshotd"]
    on_path = shutil.which("snapshotd")
    candidates += [Path(on_path)] if on_path else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.exit("no snapshotd binary: run `swift build` in the repository or set SNAPSHOTD_BINARY", returncode=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Daemon:
    directory: Path
    socket: str
    address: str
    secret_file: str
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return (self.directory / "snapshotd.log").read_text(errors="replace")


def start_daemon(directory: Path, budget: str = "2GiB", keep: int = 2, extra: list[str] | None = None, fresh: bool = True) -> Daemon:
    """Starts snapshotd in `directory`; `fresh=False` restarts one there (keeping its secret and log)."""
    arena = directory / "arena"
    arena.mkdir(parents=True, exist_ok=not fresh)
    secret = directory / "secret"
    if fresh:
        secret.write_text("python-test-secret-0123456789abcdef\n")
        secret.chmod(0o600)
    port = free_port()
    log = open(directory / "snapshotd.log", "ab")
    process = subprocess.Popen(
        [str(daemon_binary()), "--node-id", "0", "--unix-socket", str(directory / "snapshotd.sock"),
         "--arena-directory", str(arena), "--memory-budget", budget, "--keep", str(keep),
         "--tcp-listen", f"127.0.0.1:{port}", "--shared-secret-file", str(secret), *(extra or [])],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not (directory / "snapshotd.sock").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("snapshotd did not start:\n" + (directory / "snapshotd.log").read_text())
        time.sleep(0.05)
    return Daemon(directory, str(directory / "snapshotd.sock"), f"127.0.0.1:{port}", str(secret), process)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="snapshotd-py-"))
    started = start_daemon(directory)
    yield started
    started.process.kill()
    started.process.wait()
    if started.process.returncode not in (-9, 0):
        print(started.log())
    shutil.rmtree(directory, ignore_errors=True)
