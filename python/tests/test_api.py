"""The package's shape: the resumed step's save skipped, enums, Shard's
constructor, context managers and lifetimes, an acyclic import graph."""

from __future__ import annotations

import ast
import gc
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import snapshotd
import snapshotd.client
from snapshotd import Client, DaemonUnavailableError, DType, ErrorCode, Kind, SaveHandle, Shard, SnapshotdError

from conftest import start_daemon

PACKAGE = Path(snapshotd.__file__).resolve().parent


# The resumed loop: a save of the step just restored is skipped.

def test_a_save_of_the_step_just_restored_is_skipped_without_contacting_the_daemon(daemon, caplog) -> None:
    state = {"w": np.arange(6, dtype=np.float32)}
    with Client("resume-job", 0, 1, socket=daemon.socket) as client:
        assert not client.save(2, state).skipped
        client.wait_committed(2)
        step, shard = client.restore()
        shard.close()
        assert step == 2
        with caplog.at_level(logging.INFO, logger="snapshotd"):
            handle = client.save_async(2, state)
        assert handle.skipped and handle.done() and handle.step == 2
        handle.wait()  # the fence returns at once
        assert [record.getMessage() for record in caplog.records] == [
            "snapshotd: resume-job rank 0 resumed at step 2: its snapshot is the state just restored (committed already); not saved again"]
        daemon.process.kill()
        daemon.process.wait()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="snapshotd"):
            assert client.save(2, state).skipped  # the daemon is gone: this never reached it
        assert len(caplog.records) == 1
        with pytest.raises(DaemonUnavailableError):
            client.save(3, state)  # any other step goes to the daemon


def test_only_the_restored_step_is_skipped_and_only_until_another_is_saved(daemon) -> None:
    state = {"w": np.zeros(3)}
    with Client("resume-job", 0, 1, socket=daemon.socket) as client:
        for step in (1, 2):
            client.save(step, state)
        client.wait_committed(2)
        assert client.restore(1)[0] == 1  # an older step, restored on purpose
        with pytest.raises(SnapshotdError) as older:
            client.save(0, state)
        assert older.value.code == ErrorCode.INVALID_REQUEST and "not newer than committed step 2" in older.value.message
        client.restore()
        assert client.save(2, state).skipped and client.save(2, state).skipped  # until this client saves another step
        client.save(3, state)
        client.wait_committed(3)
        with pytest.raises(SnapshotdError) as again:
            client.save(2, state)  # the resumed loop has moved on: a real (refused) save
        assert again.value.code == ErrorCode.INVALID_REQUEST


def test_wait_committed_lets_this_clients_async_save_land_first(daemon) -> None:
    # The library serves one call of a client at a time: a wait that went first would starve the save.
    with Client("resume-job", 0, 1, socket=daemon.socket) as client:
        handle = client.save_async(1, {"w": np.ones(4 << 20, dtype=np.float32)})
        assert client.wait_committed(1, timeout=30) == 1
        assert handle.done()
        handle.wait()


# Enums mirror the header (test_header.py checks the values against the C compiler).

def test_kinds_dtypes_and_codes_are_int_enums() -> None:
    assert (snapshotd.PARAMETER, snapshotd.OPTIMIZER, snapshotd.RNG, snapshotd.EXTRA, snapshotd.CARRIED) == tuple(Kind)
    assert snapshotd.RNG is Kind.RNG and Kind.RNG == 2 and isinstance(Kind.CARRIED, int)
    assert DType.BFLOAT16 == 11 and DType.BFLOAT16.type_name == "bfloat16" and DType.FLOAT64.itemsize == 8
    assert ErrorCode(8) is ErrorCode.OVER_BUDGET


def test_a_kind_that_is_not_a_kind_is_refused_before_anything_is_sent(daemon) -> None:
    with Client("kinds-job", 0, 1, socket=daemon.socket) as client:
        with pytest.raises(ValueError, match=r"kinds\['w'\]: 9 is not a snapshotd.Kind"):
            client.save(1, {"w": np.ones(2)}, kinds={"w": 9})
        client.save(1, {"w": np.ones(2)}, kinds={"w": 3})  # a plain int of a real kind is fine


def test_a_restored_shard_reports_kinds_and_dtypes_as_saved(daemon) -> None:
    state = {"w": np.ones(2, dtype=np.float16), "m": np.zeros(2), "seed": np.arange(3, dtype=np.uint8)}
    with Client("kinds-job", 0, 1, socket=daemon.socket) as client:
        client.save(1, state, kinds={"m": Kind.OPTIMIZER, "seed": snapshotd.RNG})
        client.wait_committed(1)
        _, shard = client.restore()
        with shard:
            assert shard.kinds == {"w": Kind.PARAMETER, "m": Kind.OPTIMIZER, "seed": Kind.RNG}
            assert all(type(kind) is Kind for kind in shard.kinds.values())
            assert shard.dtypes == {"w": "float16", "m": "float64", "seed": "uint8"}


# Shard is built by its constructor.

def test_a_shard_is_built_by_its_constructor() -> None:
    arrays = {"w": np.ones(3)}
    shard = Shard(arrays, step=7, metadata=b"{}", gradient_norm=0.5, dtypes={"w": "float64"}, kinds={"w": Kind.PARAMETER})
    assert dict(shard) == arrays and shard.step == 7 and shard.metadata == b"{}" and shard.gradient_norm == 0.5
    assert shard.dtypes == {"w": "float64"} and shard.kinds == {"w": Kind.PARAMETER}
    assert shard.reconstruction is None and not shard.approximate and shard.durable_source is None
    bare = Shard(step=1)
    assert len(bare) == 0 and bare.metadata == b"" and bare.gradient_norm is None and bare.dtypes == {}
    with pytest.raises(TypeError):
        Shard(arrays)  # type: ignore[call-arg]  # a shard always has its step


# Context managers and lifetimes.

class _CountingLibrary:
    """Forwards to the real library, counting restore handles closed."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.restores_closed = 0

    def snapshotd_restore_close(self, handle: int) -> None:
        self.restores_closed += 1
        self.real.snapshotd_restore_close(handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_leaving_a_shards_block_releases_the_daemons_memory_unless_an_array_is_still_in_use(daemon, monkeypatch) -> None:
    counting = _CountingLibrary(snapshotd.client.lib)
    monkeypatch.setattr(snapshotd.client, "lib", counting)
    with Client("lifetime-job", 0, 1, socket=daemon.socket) as client:
        client.save(1, {"w": np.arange(8.0), "v": np.ones(4)})
        client.wait_committed(1)
        with client.restore()[1] as shard:
            assert shard["w"][3] == 3.0
        assert len(shard) == 0 and counting.restores_closed == 1
        _, shard = client.restore()
        kept = shard["w"][2:]  # a view of the daemon's memory that outlives the shard
        shard.close()
        shard.close()  # idempotent
        assert counting.restores_closed == 1 and kept[0] == 2.0  # still pinned: the view reads valid memory
        del kept
        gc.collect()
        assert counting.restores_closed == 2


def test_a_pending_save_left_uncommitted_is_aborted_and_its_memory_freed(tmp_path) -> None:
    small = start_daemon(tmp_path / "small", budget="64MiB")
    big = {"w": np.ones(10 << 20, dtype=np.float32)}  # 40 MiB: two at once do not fit
    try:
        with Client("pending-job", 0, 1, socket=small.socket) as client:
            with client.begin_save(1, big) as pending:
                pending.fill(0)
            assert pending.closed and not pending.committed
            pending.close()  # idempotent
            with pytest.raises(RuntimeError, match="closed"):
                pending.destination(0)
            dropped = client.begin_save(2, big)  # never closed: the safety net frees it
            del dropped
            gc.collect()
            with client.begin_save(3, big) as pending:
                for index in range(len(pending.tensors)):
                    pending.fill(index)
                pending.commit()
            assert client.wait_committed(3) == 3
    finally:
        small.process.kill()
        small.process.wait()


def test_a_save_handle_block_waits_for_the_save(daemon) -> None:
    with Client("handle-job", 0, 1, socket=daemon.socket) as client:
        with client.save_async(1, {"w": np.ones(2 << 20, dtype=np.float32)}) as handle:
            pass
        assert handle.done() and handle.staging_seconds is not None
        handle.close()  # idempotent
        assert client.wait_committed(1) == 1
        with pytest.raises(SnapshotdError) as caught:
            with client.save_async(1, {"w": np.ones(2)}):  # step 1 again, after it committed: refused on leaving
                pass
        assert caught.value.code == ErrorCode.INVALID_REQUEST
        with pytest.raises(KeyError):  # the block's own error wins; the save's is left to its handle
            with client.save_async(2, {"w": np.ones(2)}) as failing:
                raise KeyError("the block's")
        assert failing.done()
        assert isinstance(client.save(3, {"w": np.ones(2)}), SaveHandle)


def test_a_client_block_closes_it_and_close_is_idempotent(daemon) -> None:
    with Client("close-job", 0, 1, socket=daemon.socket) as client:
        assert not client.closed
    assert client.closed
    client.close()
    client.__del__()  # the safety net does not raise
    with pytest.raises(SnapshotdError) as caught:
        client.latest_committed_step()
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT and "closed" in caught.value.message
    with Client("close-job", 0, 1, socket=daemon.socket) as again:  # the rank is free again
        assert again.latest_committed_step() is None


def test_a_client_that_failed_to_open_is_safe_to_collect(tmp_path) -> None:
    with pytest.raises(DaemonUnavailableError):
        Client("nobody", 0, 1, socket=str(tmp_path / "none.sock"))
    gc.collect()  # the half-built client's __del__ runs and raises nothing


# Imports.

def _imports(module: str) -> set[str]:
    """The snapshotd modules ``module`` imports, anywhere in its source (function bodies and TYPE_CHECKING included)."""
    path = PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py" if "." in module else "__init__.py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "snapshotd")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
                if base.split(".")[0] != "snapshotd":
                    continue
            else:
                base = "snapshotd" + (f".{node.module}" if node.module else "")
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE / f"{candidate.split('.', 1)[1].replace('.', '/')}.py").exists() else base)
    found.discard(module)
    found.discard("snapshotd")  # the package itself: importing a submodule runs it first, never the reverse edge
    return found


MODULES = sorted(f"snapshotd.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def test_the_import_graph_is_acyclic() -> None:
    graph = {module: _imports(module) for module in MODULES}
    assert graph["snapshotd.client"].isdisjoint({"snapshotd.torch", "snapshotd.dcp"}), graph["snapshotd.client"]
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    if module in {"snapshotd.torch", "snapshotd.dcp", "snapshotd._cuda"}:
        pytest.importorskip("torch", reason=f"torch is not installed: {module} needs it")
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
