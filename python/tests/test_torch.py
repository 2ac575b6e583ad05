"""PyTorch: whole training state in one call, and torch.distributed.checkpoint through the plugin."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the PyTorch tests need it (pip install 'torch==2.13.0')")
dcp = pytest.importorskip("torch.distributed.checkpoint")

import snapshotd.torch as snapshot_torch  # noqa: E402
from snapshotd import Client  # noqa: E402
from snapshotd.dcp import SnapshotdReader, SnapshotdWriter  # noqa: E402

from conftest import free_port  # noqa: E402

SEED = 1125


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 16)
        noise = float(np.random.rand()) + random.random()
        loss = (model(x) ** 2).mean() + noise * 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_training_state_round_trip_continues_bit_for_bit(daemon) -> None:
    print(f"seed {SEED}")
    model, optimizer, scheduler = model_and_optimizer()
    np.random.seed(SEED)
    random.seed(SEED)
    train_steps(model, optimizer, scheduler, 3)
    with Client("torch-job", 0, 1, socket=daemon.socket) as client:
        handle = snapshot_torch.snapshot(client, 3, model=model, optimizer=optimizer, scheduler=scheduler,
                                         extra={"epoch": 1, "loader_position": torch.tensor([42])}, asynchronous=True)
        handle.wait()
        handle.wait_committed()
        expected = train_steps(model, optimizer, scheduler, 3)
        expected_parameters = [p.detach().clone() for p in model.parameters()]

        fresh_model, fresh_optimizer, fresh_scheduler = model_and_optimizer()
        torch.manual_seed(0)  # scrambled: the restore brings the saved RNG state back
        np.random.seed(0)
        random.seed(0)
        restored = snapshot_torch.restore(client, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert restored.step == 3
    assert restored.extra["epoch"] == 1 and restored.extra["loader_position"].tolist() == [42]
    assert fresh_scheduler.last_epoch == 3
    assert train_steps(fresh_model, fresh_optimizer, fresh_scheduler, 3) == expected
    for mine, theirs in zip(fresh_model.parameters(), expected_parameters):
        assert torch.equal(mine, theirs)


def test_torch_dtypes_round_trip(daemon) -> None:
    generator = torch.Generator().manual_seed(SEED)
    state = {
        "bf16": torch.randn(33, 7, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(100, generator=generator).half(),
        "f32": torch.randn(4, 4, generator=generator),
        "i64": torch.randint(-1000, 1000, (9,), generator=generator),
        "u8": torch.randint(0, 255, (5,), generator=generator, dtype=torch.uint8),
        "bool": torch.rand(6, generator=generator) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(8, 8, generator=generator).t(),
    }
    with Client("torch-job", 0, 1, socket=daemon.socket) as client:
        client.save(1, state)
        client.wait_committed(1)
        _, shard = client.restore()
    assert shard.dtypes["bf16"] == "bfloat16" and shard["bf16"].dtype == np.uint16  # numpy's 2-byte view
    restored = snapshot_torch.to_torch(shard)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name


def test_dcp_save_and_load_through_the_plugin(daemon) -> None:
    model, optimizer, _ = model_and_optimizer()
    train_steps(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), 2)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": {"note": "dcp", "step": 7}}
    with Client("dcp-job", 0, 1, socket=daemon.socket) as client:
        dcp.save(state, storage_writer=SnapshotdWriter(client, step=7), no_dist=True)
        client.wait_committed(7)
        fresh_model, fresh_optimizer, _ = model_and_optimizer()
        train_steps(fresh_model, fresh_optimizer, torch.optim.lr_scheduler.StepLR(fresh_optimizer, 1), 1)
        target = {"model": fresh_model.state_dict(), "optimizer": fresh_optimizer.state_dict(), "meta": {"note": "", "step": 0}}
        dcp.load(target, storage_reader=SnapshotdReader(client), no_dist=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(target["model"][name], tensor), name
    assert target["meta"] == {"note": "dcp", "step": 7}
    fresh_optimizer.load_state_dict(target["optimizer"])
    for saved, loaded in zip(optimizer.state_dict()["state"].values(), fresh_optimizer.state_dict()["state"].values()):
        assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])


def test_dcp_async_save_stages_straight_into_the_daemon(daemon) -> None:
    model, _, _ = model_and_optimizer()
    state = {"model": model.state_dict()}
    expected = {name: tensor.clone() for name, tensor in state["model"].items()}
    with Client("dcp-job", 0, 1, socket=daemon.socket) as client:
        writer = SnapshotdWriter(client, step=9)
        future = dcp.async_save(state, storage_writer=writer, no_dist=True)
        with torch.no_grad():
            for tensor in state["model"].values():
                tensor.add_(1.0)  # after async_save returned: staging is done, the snapshot must not see this
        future.result()
        client.wait_committed(9)
        target = {"model": {name: torch.zeros_like(t) for name, t in expected.items()}}
        dcp.load(target, storage_reader=SnapshotdReader(client, step=9), no_dist=True)
    for name, tensor in expected.items():
        assert torch.equal(target["model"][name], tensor), name


def test_dcp_reads_honour_byte_ranges(daemon) -> None:
    """A load planned over a sub-range of a saved tensor gets exactly that range."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    saved = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    with Client("dcp-job", 0, 1, socket=daemon.socket) as client:
        dcp.save({"w": saved}, storage_writer=SnapshotdWriter(client, step=2), no_dist=True)
        client.wait_committed(2)
        reader = SnapshotdReader(client)
        metadata = reader.read_metadata()
        assert tuple(metadata.state_dict_metadata["w"].size) == (6, 8)
        target = torch.zeros(2, 3)

        class Planner:
            def resolve_tensor(self, request):
                return target

            def commit_tensor(self, request, tensor):
                pass

        request = ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex("w"), dest_offsets=torch.Size([0, 0]),
                           storage_index=MetadataIndex("w", torch.Size([0, 0])), storage_offsets=torch.Size([3, 4]),
                           lengths=torch.Size([2, 3]))
        reader.read_data(LoadPlan([request]), Planner()).wait()
    assert torch.equal(target, saved[3:5, 4:7])


TWO_RANK_JOB = r'''
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
import snapshotd
from snapshotd.dcp import SnapshotdReader, SnapshotdWriter
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
client = snapshotd.Client("dcp-two", socket=sys.argv[1])
shared = torch.arange(1000, dtype=torch.float32)             # replicated: DCP saves it on one rank only
own = torch.full((64,), float(rank + 1), dtype=torch.float64)  # this rank's own
dcp.save({"shared": shared, "own": own, "meta": {"rank": rank}}, storage_writer=SnapshotdWriter(client, step=3))
assert client.wait_committed(3) == 3
target = {"shared": torch.zeros(1000), "own": torch.zeros(64, dtype=torch.float64), "meta": {"rank": -1}}
dcp.load(target, storage_reader=SnapshotdReader(client))
assert torch.equal(target["shared"], shared) and torch.equal(target["own"], own) and target["meta"] == {"rank": rank}, target
print(f"rank {rank} OK")
dist.destroy_process_group()
'''


def test_dcp_with_two_gloo_ranks_loads_replicated_and_own_tensors_on_each(daemon, tmp_path) -> None:
    """DCP deduplicates a replicated tensor to one rank; each rank still restores it from its own shard."""
    import os
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_JOB)
    port = free_port()
    ranks = [
        subprocess.Popen([sys.executable, str(script), daemon.socket], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in ranks]
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, output
        assert f"rank {rank} OK" in output


def test_the_snapshot_of_the_restored_step_is_skipped_and_training_goes_on(daemon, caplog) -> None:
    """The README's loop after a restart: it snapshots the restored step again first."""
    import logging

    model, optimizer, scheduler = model_and_optimizer()
    with Client("resume-torch", 0, 1, socket=daemon.socket) as client:
        snapshot_torch.snapshot(client, 4, model=model, optimizer=optimizer, scheduler=scheduler).wait_committed()
        restored = snapshot_torch.restore(client, model=model, optimizer=optimizer, scheduler=scheduler)
        assert restored.step == 4
        with caplog.at_level(logging.INFO, logger="snapshotd"):
            handle = snapshot_torch.snapshot(client, 4, model=model, optimizer=optimizer, scheduler=scheduler, asynchronous=True)
            assert handle.skipped
            handle.wait()
            assert snapshot_torch.snapshot(client, 4, model=model, optimizer=optimizer, scheduler=scheduler).skipped
        assert sum("resumed at step 4" in record.getMessage() for record in caplog.records) == 2
        train_steps(model, optimizer, scheduler, 1)
        handle = snapshot_torch.snapshot(client, 5, model=model, optimizer=optimizer, scheduler=scheduler, asynchronous=True)
        assert not handle.skipped
        assert handle.wait_committed() == 5


def test_a_dcp_save_of_the_step_just_loaded_is_skipped_sync_and_async(daemon) -> None:
    model, _, _ = model_and_optimizer()
    state = {"model": model.state_dict()}
    with Client("resume-dcp", 0, 1, socket=daemon.socket) as client:
        dcp.save(state, storage_writer=SnapshotdWriter(client, step=6), no_dist=True)
        client.wait_committed(6)
        reader = SnapshotdReader(client)
        dcp.load(state, storage_reader=reader, no_dist=True)
        assert reader.step == 6
        dcp.save(state, storage_writer=SnapshotdWriter(client, step=6), no_dist=True)  # skipped, not refused
        writer = SnapshotdWriter(client, step=6)
        dcp.async_save(state, storage_writer=writer, no_dist=True).result()  # nothing staged, nothing refused
        assert writer._staged is None
        dcp.save(state, storage_writer=SnapshotdWriter(client, step=7), no_dist=True)
        assert client.wait_committed(7) == 7
        from torch.distributed.checkpoint.api import CheckpointException

        from snapshotd import ErrorCode, SnapshotdError

        with pytest.raises(CheckpointException) as refused:  # moved on: step 6 again is a real save, refused
            dcp.save(state, storage_writer=SnapshotdWriter(client, step=6), no_dist=True)
        error = refused.value.failures[0][0]
        assert isinstance(error, SnapshotdError) and error.code == ErrorCode.INVALID_REQUEST, error
        assert "not newer than committed step 7" in error.message
