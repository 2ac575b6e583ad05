"""The C interface: examples/c/save_restore.c, compiled against the header and
linked with the same libsnapshotdclient.so the package loads, run against a real daemon."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from snapshotd import _lib

from conftest import REPOSITORY


def test_the_c_example_saves_and_restores_through_the_shared_library(daemon, tmp_path) -> None:
    compiler = shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler (cc or clang) on PATH")
    library = Path(_lib.lib._name)
    program = tmp_path / "save_restore"
    subprocess.run(
        [compiler, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(REPOSITORY / "Sources/CSnapshotd/include"),
         str(REPOSITORY / "examples/c/save_restore.c"), str(library), f"-Wl,-rpath,{library.parent}", "-o", str(program)],
        check=True,
    )
    result = subprocess.run([str(program), daemon.socket, "c-job", "7"], capture_output=True, text=True, timeout=120)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "save and restore of step 7 byte-identical" in result.stdout
    assert "restore of an unknown step refused: 10:" in result.stdout  # the daemon's notCommitted code
