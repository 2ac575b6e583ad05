"""Builds (or finds) libsnapshotdclient.so and ships it inside the package.

`pip install ./python` runs this in the repository checkout. The library
comes from, in order: $SNAPSHOTD_LIBRARY (a path to a built
libsnapshotdclient.so), or `swift build -c release --product snapshotdclient`
in the repository root (the Swift toolchain of the README's setup step).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

LIBRARY = "libsnapshotdclient.so"


def find_or_build_library() -> Path:
    given = os.environ.get("SNAPSHOTD_LIBRARY")
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"SNAPSHOTD_LIBRARY={given} is not a file")
        return path
    root = Path(__file__).resolve().parent.parent
    if not (root / "Package.swift").is_file():
        raise SystemExit(
            "snapshotd: cannot build libsnapshotdclient.so: no Package.swift above python/; "
            "set SNAPSHOTD_LIBRARY to a built library"
        )
    swift = shutil.which("swift")
    if swift is None:
        raise SystemExit("snapshotd: `swift` is not on PATH; install the toolchain (README) or set SNAPSHOTD_LIBRARY")
    subprocess.run([swift, "build", "-c", "release", "--product", "snapshotdclient"], cwd=root, check=True)
    return root / ".build" / "release" / LIBRARY


class BuildWithLibrary(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "snapshotd" / LIBRARY
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(find_or_build_library(), target)


class BinaryDistribution(Distribution):
    """The wheel holds a native library: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
