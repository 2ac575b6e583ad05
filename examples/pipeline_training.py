"""A real training job that survives failures through snapshotd.

A two-stage pipeline (gloo, CPU; rank 0 runs stage 0, rank 1 stage 1) trains
a small model, snapshotting every step into a local 3-node snapshotd cluster
(RS(2,1)); rank r talks to node r's daemon. The driver:

1. runs the job once without snapshotd: the reference;
2. runs it again with snapshotd, kills rank 1 with SIGKILL mid-run, restarts
   the job (as torchrun would) from the newest committed step, later kills
   node 1's daemon with SIGKILL, starts an empty replacement that the cluster
   rebuilds, restarts the job again, and lets it finish;
3. prints both loss curves and the verdict: losses and final parameters must
   match the reference bit for bit (the math is deterministic on CPU).

    python examples/pipeline_training.py            # from the repository root, package installed
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPOSITORY / "deploy" / "local-cluster.sh"
WORLD = 2
SEED = 2026


# Worker (one pipeline stage)

def worker(arguments: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(SEED + rank)
    torch.use_deterministic_algorithms(True)
    stage = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Dropout(0.1)) if rank == 0 \
        else torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(stage.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.7)
    out = Path(arguments.out)

    client = None
    first = 0
    if arguments.cluster:
        import snapshotd
        import snapshotd.torch

        client = connect(snapshotd, arguments, rank, world)
        latest = retrying(snapshotd, client.latest_committed_step)
        # Every rank resumes from the same step: the newest one committed for the whole job.
        agreed = torch.tensor([-1 if latest is None else latest])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if agreed.item() >= 0:
            first = retrying(snapshotd, lambda: snapshotd.torch.restore(client, model=stage, optimizer=optimizer, scheduler=scheduler, step=int(agreed.item()))).step
            log(out, rank, {"event": "restored", "step": first})

    for step in range(first, arguments.steps):
        handle = None
        if client is not None:
            import snapshotd.torch

            handle = snapshotd.torch.snapshot(client, step, model=stage, optimizer=optimizer, scheduler=scheduler, asynchronous=True)
        generator = torch.Generator().manual_seed(SEED * 1000 + step)  # the batch is a function of the step
        x = torch.randn(32, 16, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin()
        if rank == 0:
            hidden = stage(x)
            dist.send(hidden.detach(), 1)
            gradient = torch.empty_like(hidden)
            dist.recv(gradient, 1)
            hidden.backward(gradient)
            loss = None
        else:
            hidden = torch.empty(32, 64)
            dist.recv(hidden, 0)
            hidden.requires_grad_(True)
            loss = torch.nn.functional.mse_loss(stage(hidden), y)
            loss.backward()
            dist.send(hidden.grad, 0)
        if handle is not None:
            try:
                handle.wait()  # the fence: the snapshot is copied before the update
            except Exception as error:  # a refused snapshot costs that step's snapshot, not the job
                log(out, rank, {"event": "snapshot refused", "step": step, "error": str(error)})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if loss is not None:
            log(out, rank, {"event": "loss", "step": step, "loss": loss.item().hex()})
        log(out, rank, {"event": "progress", "step": step})
        time.sleep(arguments.step_delay)
    torch.save(stage.state_dict(), out / f"final-{rank}.pt")
    if client is not None:
        client.close()
    dist.destroy_process_group()


def connect(snapshotd, arguments: argparse.Namespace, rank: int, world: int):
    deadline = time.monotonic() + 120
    while True:  # a replacement daemon refuses trainers until it is rebuilt
        try:
            return snapshotd.Client("pipeline-job", rank, world, local_world=1, stage=rank,
                                    socket=subprocess.check_output(["bash", str(CLUSTER_SCRIPT), "socket", arguments.cluster, str(rank)], text=True).strip())
        except snapshotd.SnapshotdError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def retrying(snapshotd, call):
    """A node being rebuilt answers `unavailable` until it holds its shards again."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return call()
        except snapshotd.SnapshotdError as error:
            if error.code != snapshotd.ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def log(out: Path, rank: int, record: dict) -> None:
    with open(out / f"rank-{rank}.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")


# Driver

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_job(out: Path, steps: int, cluster: str | None, delay: float) -> list[subprocess.Popen]:
    port = free_port()
    processes = []
    for rank in range(WORLD):
        environment = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, __file__, "--worker", "--out", str(out), "--steps", str(steps), "--step-delay", str(delay)]
        if cluster:
            command += ["--cluster", cluster]
        processes.append(subprocess.Popen(command, env=environment))
    return processes


def progress(out: Path, rank: int) -> int:
    path = out / f"rank-{rank}.jsonl"
    if not path.exists():
        return -1
    steps = [record["step"] for record in map(json.loads, path.read_text().splitlines()) if record["event"] == "progress"]
    return steps[-1] if steps else -1


def wait_for_step(out: Path, step: int, processes: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while min(progress(out, rank) for rank in range(WORLD)) < step:
        if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
            raise SystemExit(f"the job failed before step {step}: exit codes {[p.poll() for p in processes]}")
        time.sleep(0.05)


def kill_job(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> None:
    for process in processes:
        if process.wait(timeout) != 0:
            raise SystemExit(f"a rank exited with {process.returncode}")


def curve(out: Path) -> dict[int, float]:
    """The loss of each step, as the last run that completed it logged it."""
    losses: dict[int, float] = {}
    for record in map(json.loads, (out / "rank-1.jsonl").read_text().splitlines()):
        if record["event"] == "loss":
            losses[record["step"]] = float.fromhex(record["loss"])
    return losses


def cluster(command: str, *arguments: str) -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPT), command, *arguments], check=True, stdout=subprocess.DEVNULL)


def drive(arguments: argparse.Namespace) -> int:
    import torch

    work = Path(tempfile.mkdtemp(prefix="snapshotd-pipeline-"))
    reference, resilient, cluster_directory = work / "reference", work / "resilient", work / "cluster"
    reference.mkdir()
    resilient.mkdir()
    print(f"[pipeline] reference run, {arguments.steps} steps, no failures")
    finish(start_job(reference, arguments.steps, None, 0.0))

    print("[pipeline] starting a 3-node snapshotd cluster, RS(2,1)")
    cluster("start", str(cluster_directory), "3", "1")
    try:
        kill_rank_at, kill_node_at = arguments.steps // 3, 2 * arguments.steps // 3
        job = start_job(resilient, arguments.steps, str(cluster_directory), arguments.step_delay)
        wait_for_step(resilient, kill_rank_at, job)
        job[1].send_signal(signal.SIGKILL)
        print(f"[pipeline] killed rank 1 (SIGKILL) at step {progress(resilient, 1)}; restarting the job")
        kill_job(job)
        job = start_job(resilient, arguments.steps, str(cluster_directory), arguments.step_delay)
        wait_for_step(resilient, kill_node_at, job)
        cluster("kill", str(cluster_directory), "1")
        print(f"[pipeline] killed node 1's daemon (SIGKILL) at step {progress(resilient, 1)}; the job dies with it")
        kill_job(job)
        cluster("node", str(cluster_directory), "1", "--fresh")
        print("[pipeline] started an empty replacement for node 1; restarting the job")
        job = start_job(resilient, arguments.steps, str(cluster_directory), arguments.step_delay)
        finish(job)
    finally:
        cluster("stop", str(cluster_directory))

    restores = [record["step"] for record in map(json.loads, (resilient / "rank-1.jsonl").read_text().splitlines()) if record["event"] == "restored"]
    expected, observed = curve(reference), curve(resilient)
    print(f"[pipeline] restarts resumed from steps {restores}")
    print("[pipeline] step  reference loss          with failures")
    for step in sorted(expected):
        mark = "" if observed.get(step) == expected[step] else "   <-- differs"
        print(f"[pipeline] {step:4d}  {expected[step]!r:22}  {observed.get(step)!r}{mark}")
    same_parameters = all(
        all(torch.equal(a, b) for a, b in zip(torch.load(reference / f"final-{rank}.pt").values(), torch.load(resilient / f"final-{rank}.pt").values()))
        for rank in range(WORLD)
    )
    verdict = expected == observed and same_parameters and len(restores) == 2
    print(f"[pipeline] losses identical: {expected == observed}; final parameters identical: {same_parameters}; restarts: {len(restores)}")
    print("[pipeline] OK: the job survived a killed rank and a lost node bit for bit" if verdict else "[pipeline] FAILED")
    return 0 if verdict else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-delay", type=float, default=0.05, help="seconds per step beyond the math, so the kills land mid-run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cluster", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments)
        return 0
    return drive(arguments)


if __name__ == "__main__":
    sys.exit(main())
