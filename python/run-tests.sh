#!/usr/bin/env bash
# The Python package's tests against real daemons (part of the README's test
# command): a virtualenv, numpy, pytest, a CPU build of torch (the PyTorch
# tests are skipped with a printed reason where it cannot be installed), the
# package installed for real, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SNAPSHOTD_VENV:-.venv-python}
python3 -m venv "$venv"
venv=$(cd "$venv" && pwd)
"$venv/bin/pip" install -q numpy pytest mypy safetensors  # safetensors: reads what snapshotctl export writes
started=$(date +%s)
if "$venv/bin/pip" install -q "torch==2.13.0"; then
    echo "torch (CPU build) installed in $(( $(date +%s) - started )) s"
else
    echo "torch could not be installed: the PyTorch tests will be skipped"
fi
# Debug builds reuse `swift test`'s objects. (`pip install ./python` alone
# builds the library in release; SNAPSHOTD_LIBRARY points it at this one.)
swift build --product snapshotd
swift build --product snapshotctl  # the CheckFree training check drives the operator's CLI
swift build --product snapshotdclient
SNAPSHOTD_LIBRARY="$PWD/.build/debug/libsnapshotdclient.so" "$venv/bin/pip" install -q --force-reinstall --no-deps ./python
(cd python && "$venv/bin/mypy" src/snapshotd)  # the package's type hints hold
SNAPSHOTD_BINARY="$PWD/.build/debug/snapshotd" "$venv/bin/python" -m pytest -q -rs python/tests
