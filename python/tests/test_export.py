"""`snapshotctl export` and the durable tier, read back with Python's own
`safetensors` (no snapshotd code on the reading side)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from snapshotd import Client

from conftest import REPOSITORY, daemon_binary, start_daemon

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed (python/run-tests.sh installs it)")

SEED = 20261126


def snapshotctl(*arguments: str) -> subprocess.CompletedProcess[str]:
    binary = Path(os.environ.get("SNAPSHOTD_BINARY", str(daemon_binary()))).with_name("snapshotctl")
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True, timeout=120, check=False)


def state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "layers.0.weight": rng.standard_normal((64, 33), dtype=np.float32),
        "layers.0.bias": rng.standard_normal(33).astype(np.float16),
        "layers.1.weight": rng.standard_normal((7, 5)),
        "embedding.indices": rng.integers(-(2**62), 2**62, size=(5, 4), dtype=np.int64),
        "mask": rng.integers(0, 2, size=(3, 7)).astype(bool),
        "counts": rng.integers(0, 256, size=300, dtype=np.uint8),
        "scalar": np.array(3.5, dtype=np.float64),
    }


def test_export_is_readable_by_safetensors_byte_identical(daemon) -> None:
    print(f"seed {SEED}")
    rng = np.random.default_rng(SEED)
    saved = {rank: state(rng) for rank in range(2)}
    for rank in range(2):
        with Client("export-job", rank, 2, socket=daemon.socket) as client:
            client.save(3, saved[rank], metadata={"epoch": 1}, gradient_norm=0.5)
    with Client("export-job", 0, 2, socket=daemon.socket) as client:
        assert client.wait_committed(3) == 3
    target = daemon.directory / "export"
    run = snapshotctl("export", "--socket", daemon.socket, "--job", "export-job", "--to", str(target), "--json")
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    step_directory = target / "export-job" / "step-00000000000000000003"
    assert reply == {"job": "export-job", "step": 3, "ranks": 2, "directory": str(step_directory),
                     "bytes": sum(a.nbytes for s in saved.values() for a in s.values())}
    manifest = json.loads((step_directory / "manifest.json").read_text())
    assert manifest["job"] == "export-job" and manifest["step"] == 3 and manifest["world"] == 2
    assert [r["tensors"] for r in manifest["ranks"]] == ["rank-00000.safetensors", "rank-00001.safetensors"]
    for rank in range(2):
        loaded = safetensors_numpy.load_file(str(step_directory / f"rank-{rank:05d}.safetensors"))
        assert sorted(loaded) == sorted(saved[rank])
        for name, array in saved[rank].items():
            assert loaded[name].dtype == array.dtype, name
            assert loaded[name].shape == array.shape, name
            assert loaded[name].tobytes() == array.tobytes(), name
        described = json.loads((step_directory / f"rank-{rank:05d}.json").read_text())
        assert described["rank"] == rank and described["gradient_norm"] == 0.5
        assert [t["name"] for t in described["tensors"]] == list(saved[rank])
        assert {t["name"]: t["snapshotd_dtype"] for t in described["tensors"]}["layers.0.bias"] == "float16"


def test_bfloat16_exports_for_torch(daemon) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import snapshotd.torch

    model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    with Client("bf16-job", 0, 1, socket=daemon.socket) as client:
        snapshotd.torch.snapshot(client, 1, model=model)
        assert client.wait_committed(1) == 1  # the save returns after the copy; export needs the commit
    target = daemon.directory / "export"
    run = snapshotctl("export", "--socket", daemon.socket, "--job", "bf16-job", "--to", str(target))
    assert run.returncode == 0, run.stderr
    assert "exported step 1 of bf16-job: 1 rank(s)" in run.stdout
    loaded = safetensors_torch.load_file(str(target / "bf16-job" / "step-00000000000000000001" / "rank-00000.safetensors"))
    weights = {name: tensor for name, tensor in loaded.items() if tensor.dtype == torch.bfloat16}
    assert len(weights) == 2
    for tensor in weights.values():
        assert any(torch.equal(tensor, parameter.detach()) for parameter in model.parameters())


def test_restart_with_an_empty_arena_restores_from_the_durable_tier() -> None:
    directory = Path(tempfile.mkdtemp(prefix="snapshotd-py-durable-"))
    durable = directory / "durable"
    daemon = start_daemon(directory, extra=["--flush-directory", str(durable), "--flush-every-steps", "2"])
    try:
        rng = np.random.default_rng(SEED)
        steps = {step: state(rng) for step in (1, 2, 3)}
        with Client("durable-job", 0, 1, socket=daemon.socket) as client:
            for step, tensors in steps.items():
                client.save(step, tensors)
                client.wait_committed(step)
        deadline = time.monotonic() + 30
        while not (durable / "durable-job" / "step-00000000000000000002" / "manifest.json").exists():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        daemon.process.kill()
        daemon.process.wait()
        shutil.rmtree(directory / "arena")
        (directory / "snapshotd.sock").unlink()
        daemon = start_daemon(directory, extra=["--flush-directory", str(durable), "--flush-every-steps", "2"], fresh=False)
        with Client("durable-job", 0, 1, socket=daemon.socket) as client:
            step, shard = client.restore()
        assert step == 2
        assert shard.durable_source == str(durable / "durable-job" / "step-00000000000000000002" / "rank-00000.safetensors")
        for name, array in steps[2].items():
            assert shard[name].tobytes() == array.tobytes(), name
    finally:
        daemon.process.kill()
        daemon.process.wait()
        shutil.rmtree(directory, ignore_errors=True)
