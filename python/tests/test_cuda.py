"""The CUDA path of the Python client: device tensors staged into arena
memory on a side stream (pinned for the copy), ordered after the work that
produced them, with ``SaveHandle.wait()`` as the fence. Skipped, with the
reason printed, where there is no CUDA device (CI has none: run these where
there is one, as the README says)."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA path is checked on a GPU machine (docs/python.md, 'CUDA tensors')", allow_module_level=True)

import snapshotd.torch as snapshot_torch  # noqa: E402
from snapshotd import Client  # noqa: E402

SEED = 4242


def test_device_tensors_of_every_float_dtype_round_trip_bit_exact(daemon) -> None:
    generator = torch.Generator(device="cuda").manual_seed(SEED)
    state = {
        "w.f32": torch.randn(1 << 20, device="cuda", generator=generator),
        "w.bf16": torch.randn(3, 1 << 18, device="cuda", generator=generator).to(torch.bfloat16),
        "w.f16": torch.randn(1 << 18, device="cuda", generator=generator).to(torch.float16),
        "w.i64": torch.randint(0, 1 << 40, (4096,), device="cuda", generator=generator),
        "host.f32": torch.randn(1000),  # host tensors in the same save take the worker's path
    }
    expected = {name: tensor.cpu().clone() for name, tensor in state.items()}
    with Client("cuda-job", 0, 1, socket=daemon.socket) as client:
        handle = client.save_async(1, state)
        handle.wait_committed()
        step, shard = client.restore()
        assert step == 1
        restored = snapshot_torch.to_torch(shard)
        for name, tensor in expected.items():
            assert restored[name].dtype == tensor.dtype, name
            assert torch.equal(restored[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_the_copy_waits_for_the_work_that_produced_the_tensor_and_wait_is_the_fence(daemon) -> None:
    """The tensor is still being computed when save_async returns; then the
    trainer overwrites it right after the fence. The snapshot must hold
    exactly the value the producing kernels finished with."""
    a = torch.randn(4096, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(SEED))
    with Client("cuda-job", 0, 1, socket=daemon.socket) as client:
        for step in range(3):
            produced = a
            for _ in range(20):  # long-running kernels queued on the current stream
                produced = torch.tanh(produced @ a) * 0.5
            handle = client.save_async(step, {"w": produced})
            handle.wait()
            produced.fill_(float("nan"))  # the optimizer step: only after the fence
            client.wait_committed(step)
            reference = a
            for _ in range(20):
                reference = torch.tanh(reference @ a) * 0.5
            step_restored, shard = client.restore(step)
            assert step_restored == step
            assert torch.equal(snapshot_torch.to_torch(shard)["w"], reference.cpu()), f"step {step}"


def test_the_visible_stall_is_far_below_the_copy(daemon) -> None:
    """save_async returns before the device-to-host copy: the trainer's stall
    is recording an event, not moving 512 MiB. The staging rate is printed
    against torch's own device-to-host copies of the same tensors, measured
    in the same run: into fresh pageable memory and into pinned memory."""
    state = {f"layer{i}": torch.randn(32 << 20, device="cuda") for i in range(4)}  # 4 × 128 MiB
    torch.cuda.synchronize()

    def best(copy) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return min(times)

    pageable = best(lambda: [t.to("cpu") for t in state.values()])
    pinned_buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in state.values()]
    pinned = best(lambda: [b.copy_(t, non_blocking=True) for b, t in zip(pinned_buffers, state.values())])
    with Client("cuda-job", 0, 1, socket=daemon.socket) as client:
        stalls, copies = [], []
        for step in range(3):
            started = time.perf_counter()
            handle = client.save_async(step, state)
            stalls.append(time.perf_counter() - started)
            handle.wait()
            copies.append(handle.staging_seconds)
        stall, copy = min(stalls), min(copies)
        gigabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
        print(f"[cuda] save_async of {gigabytes:.2f} GB: visible stall {stall * 1e3:.3f} ms, staged in {copy * 1e3:.1f} ms "
              f"({gigabytes / copy:.1f} GB/s device to arena); torch .to('cpu') {gigabytes / pageable:.1f} GB/s "
              f"(staging {pageable / copy:.2f}x of it), into pinned memory {gigabytes / pinned:.1f} GB/s ({pinned / copy:.2f}x)")
        assert stall < copy / 20, (stall, copy)


def test_a_cuda_model_and_optimizer_snapshot_and_restore_on_the_device(daemon) -> None:
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.randn(32, 64, device="cuda")).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with Client("cuda-job", 0, 1, socket=daemon.socket) as client:
        snapshot_torch.snapshot(client, 3, model=model, optimizer=optimizer, asynchronous=True).wait_committed()
        twin = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
        twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3)
        restored = snapshot_torch.restore(client, model=twin, optimizer=twin_optimizer, device="cuda")
        assert restored.step == 3 and restored.reconstruction is None
    for mine, theirs in zip(model.state_dict().values(), twin.state_dict().values()):
        assert theirs.is_cuda and torch.equal(mine, theirs)
    for mine, theirs in zip(optimizer.state.values(), twin_optimizer.state.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[key], theirs[key])
    np.testing.assert_equal(len(optimizer.state), len(twin_optimizer.state))
