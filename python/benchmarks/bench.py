"""The Python client's save, stall and restore against references measured in the same run.

    python python/benchmarks/bench.py [--gib 1] [--tensors 64] [--repeat 5]

Starts its own daemon (.build/release/snapshotd, or $SNAPSHOTD_BINARY) on a
tmpfs arena and measures, on one fp32 state dict: ``save`` against a
``numpy.copyto`` of the same bytes; the visible stall of ``save_async``;
``dcp.async_save`` through the plugin against ``dcp.async_save`` to /dev/shm
(stall and total); ``torch.save`` to /dev/shm; and restore. Best of --repeat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import snapshotd

REPOSITORY = Path(__file__).resolve().parents[2]


def best(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    import torch
    import torch.distributed.checkpoint as dcp

    from snapshotd.dcp import SnapshotdWriter

    total_bytes = int(arguments.gib * (1 << 30))
    elements = total_bytes // 4 // arguments.tensors
    generator = torch.Generator().manual_seed(7)
    state = {f"layers.{i}.weight": torch.randn(elements, generator=generator) for i in range(arguments.tensors)}
    gigabytes = sum(t.numel() * 4 for t in state.values()) / 1e9

    directory = Path(tempfile.mkdtemp(prefix="snapshotd-bench-", dir="/dev/shm"))
    binary = os.environ.get("SNAPSHOTD_BINARY", str(REPOSITORY / ".build" / "release" / "snapshotd"))
    (directory / "arena").mkdir()
    daemon = subprocess.Popen([binary, "--node-id", "0", "--unix-socket", str(directory / "s.sock"), "--arena-directory",
                               str(directory / "arena"), "--memory-budget", f"{int(arguments.gib * 6) + 2}GiB", "--keep", "2",
                               "--log-level", "warning"])
    while not (directory / "s.sock").exists():
        time.sleep(0.05)
    client = snapshotd.Client("bench", 0, 1, socket=str(directory / "s.sock"))
    step = 0

    def next_step() -> int:
        nonlocal step
        step += 1
        return step

    try:
        sources = [t.numpy() for t in state.values()]
        targets = [np.empty_like(a) for a in sources]
        for target in targets:
            target.fill(0)
        copy = best(arguments.repeat, lambda: [np.copyto(t, s) for t, s in zip(targets, sources)])

        for _ in range(3):  # warm-up: the daemon's segment pool and this client's mappings fill
            client.save(next_step(), state)
        def timed_save() -> float:
            # A trainer snapshots once per training step: the daemon has sealed
            # (checksummed) the previous save before the next one starts.
            client.wait_committed(step)
            started = time.perf_counter()
            client.save(next_step(), state)
            return time.perf_counter() - started

        save = min(timed_save() for _ in range(arguments.repeat))
        stalls: list[float] = []
        totals: list[float] = []
        for _ in range(arguments.repeat):
            client.wait_committed(step)
            started = time.perf_counter()
            handle = client.save_async(next_step(), state)
            stalls.append(time.perf_counter() - started)
            handle.wait()
            totals.append(time.perf_counter() - started)

        def plugin_async() -> tuple[float, float]:
            started = time.perf_counter()
            future = dcp.async_save(state, storage_writer=SnapshotdWriter(client, next_step()), no_dist=True)
            stall = time.perf_counter() - started
            future.result()
            return stall, time.perf_counter() - started

        def shm_async() -> tuple[float, float]:
            target = directory / f"dcp-{time.perf_counter_ns()}"
            started = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=str(target), no_dist=True)
            stall = time.perf_counter() - started
            future.result()
            elapsed = time.perf_counter() - started
            shutil.rmtree(target)
            return stall, elapsed

        import warnings

        warnings.filterwarnings("ignore")
        plugin = min((plugin_async() for _ in range(arguments.repeat)), key=lambda p: p[1])
        shm = min((shm_async() for _ in range(arguments.repeat)), key=lambda p: p[1])

        def torch_save() -> None:
            torch.save(state, directory / "torch.pt")

        torch_save_time = best(arguments.repeat, torch_save)
        os.unlink(directory / "torch.pt")

        client.wait_committed(step)

        def restore() -> None:
            _, shard = client.restore()
            assert len(shard) == len(state)

        restore_time = best(arguments.repeat, restore)

        def restore_into_torch() -> None:
            _, shard = client.restore()
            for name, tensor in state.items():
                tensor.copy_(torch.from_numpy(shard[name]))

        import warnings as _w

        _w.filterwarnings("ignore")
        restore_copy = best(arguments.repeat, restore_into_torch)

        print(f"state dict: {arguments.tensors} fp32 tensors, {gigabytes:.3f} GB; best of {arguments.repeat}")
        print("| figure | time | reference | ratio |")
        print("|---|---|---|---|")
        print(f"| numpy.copyto of the same bytes | {copy * 1e3:.1f} ms ({gigabytes / copy:.2f} GB/s) | | |")
        print(f"| `save` (shm) | {save * 1e3:.1f} ms ({gigabytes / save:.2f} GB/s) | copyto | {copy / save:.2f}× throughput (target ≥ 0.8×) |")
        print(f"| `save_async` visible stall | {min(stalls) * 1e3:.3f} ms ({min(stalls) * 1e3 / gigabytes:.3f} ms/GB) | copyto | {copy / min(stalls):.0f}× below one copy (target ≥ 50×, ≤ 1 ms/GB) |")
        print(f"| `save_async` until `wait()` returns | {min(totals) * 1e3:.1f} ms | copyto | {min(totals) / copy:.2f}× |")
        print(f"| `dcp.async_save` via SnapshotdWriter: stall / total | {plugin[0] * 1e3:.1f} / {plugin[1] * 1e3:.1f} ms | to /dev/shm: {shm[0] * 1e3:.1f} / {shm[1] * 1e3:.1f} ms | {shm[0] / plugin[0]:.2f}× / {shm[1] / plugin[1]:.2f}× faster |")
        print(f"| `torch.save` to /dev/shm | {torch_save_time * 1e3:.1f} ms | copyto | {torch_save_time / copy:.1f}× a copy |")
        print(f"| `restore` (zero-copy views, CRCs checked by the daemon) | {restore_time * 1e3:.1f} ms | copyto | {restore_time / copy:.2f}× |")
        print(f"| `restore` + copy into the model's tensors | {restore_copy * 1e3:.1f} ms | copyto | {restore_copy / copy:.2f}× |")
    finally:
        client.close()
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
