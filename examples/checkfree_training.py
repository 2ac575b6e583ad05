"""A training job that loses a whole pipeline stage and goes on (CheckFree).

A 4-stage pipeline model (stage 0 embeds, stages 0-3 hold residual blocks
named stage-locally ``layers.<j>.…``, stage 3 holds the head; two
data-parallel replicas per stage, 8 ranks) trains a regression task.
Each rank snapshots its stage into a local 5-node snapshotd cluster with one
RS(4,1) group, placed so that losing nodes 2 and 3 loses every copy of stage
2 and nothing else:

    node 0: ranks 0, 1 (stage 0)   node 1: ranks 2, 3 (stage 1)
    node 2: rank 4 (stage 2)       node 3: rank 5 (stage 2)      node 4: ranks 6, 7 (stage 3)

Stage 1 carries a copy of stage 0's embedding and stage 2 one of stage 3's
head (CheckFree+), saved with kind CARRIED under the owner's names.

The driver trains three times on the same batches:

1. ``reference``: no failure;
2. ``checkfree``: at ``--fail-at`` nodes 2 and 3 are killed (SIGKILL) and
   replaced by empty daemons; erasure coding cannot help (2 > m = 1), so
   ``snapshotctl recover --checkfree`` rebuilds stage 2 as the gradient-norm
   weighted average of stages 1 and 3; every rank restores, stage 2's
   optimizer restarts from zero with its learning rate ×1.1 as the restore
   result recommends, and training goes on;
3. ``reinitialized``: the same failure answered without CheckFree: stage 2
   starts from fresh random weights (what a job without any copy of it gets).

It prints the curves, writes them to ``--out`` (JSON, and an SVG plot), and
passes when, from at most ``--recovery-steps`` steps after the failure on,
the CheckFree run's mean loss over every ``--window``-step span stays within
5% of the reference's over the same steps.

    python examples/checkfree_training.py          # from the repository root, package installed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import snapshotd
import snapshotd.torch

REPOSITORY = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPOSITORY / "deploy" / "local-cluster.sh"
JOB = "checkfree-job"
STAGES, REPLICAS, WIDTH, BLOCKS, INPUTS, BATCH = 4, 2, 64, 2, 16, 64
PLACEMENT = [0, 0, 1, 1, 2, 3, 4, 4]  # rank → node; rank = REPLICAS·stage + replica
SEED = 2026
LEARNING_RATE = 2e-3


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(WIDTH, WIDTH)
        self.fc2 = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.fc2(torch.tanh(self.fc1(x)))


class Stage(torch.nn.Module):
    """One pipeline stage; parameter names are stage-local so stages pair up."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.embed = torch.nn.Linear(INPUTS, WIDTH) if index == 0 else None
        self.layers = torch.nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = torch.nn.Linear(WIDTH, 1) if index == STAGES - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.layers:
            x = block(x)
        return self.head(x) if self.head is not None else x


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch is a function of the step: every run sees the same data."""
    generator = torch.Generator().manual_seed(SEED * 1000 + step)
    x = torch.randn(BATCH, INPUTS, generator=generator)
    y = (torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * torch.tanh(x[:, 4:8] @ torch.ones(4, 1))) * 2
    # Label noise: the loss settles on a floor (0.09), as real training losses do.
    return x, y + 0.3 * torch.randn(BATCH, 1, generator=generator)


@dataclass
class Trainer:
    stages: list[Stage]
    optimizers: list[torch.optim.Optimizer]
    steps: int
    norms: list[float] = field(default_factory=lambda: [0.0] * STAGES)
    # Per-stage learning-rate factor (CheckFree recommends ×1.1 for a rebuilt stage).
    factors: list[float] = field(default_factory=lambda: [1.0] * STAGES)

    @staticmethod
    def fresh(steps: int) -> Trainer:
        torch.manual_seed(SEED)
        stages = [Stage(i) for i in range(STAGES)]
        return Trainer(stages, [torch.optim.Adam(s.parameters(), lr=LEARNING_RATE) for s in stages], steps)

    def step(self, step: int) -> float:
        # Linear decay to 10% over the run, as training schedules do.
        for optimizer, factor in zip(self.optimizers, self.factors):
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * factor * (1 - 0.9 * step / self.steps)
        x, y = batch(step)
        for stage in self.stages:
            x = stage(x)
        loss = torch.nn.functional.mse_loss(x, y)
        loss.backward()
        # Each stage's gradient L2 norm: the weights CheckFree averages by.
        self.norms = [float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in s.parameters()]))) for s in self.stages]
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad()
        return loss.item()


# Snapshots: each rank's shard is its stage's parameters, Adam moments, an RNG blob.

def shard(trainer: Trainer, stage: int) -> tuple[dict[str, Any], dict[str, int]]:
    state: dict[str, Any] = {}
    kinds: dict[str, int] = {}
    module = trainer.stages[stage]
    optimizer_state = trainer.optimizers[stage].state
    for name, parameter in module.named_parameters():
        state[name] = parameter.detach()
        kinds[name] = snapshotd.PARAMETER
        moments = optimizer_state.get(parameter, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"{name}.{moment}"] = moments[moment] if moment in moments else torch.zeros_like(parameter)
            kinds[f"{name}.{moment}"] = snapshotd.OPTIMIZER
        state[f"{name}.adam_step"] = torch.tensor([float(moments["step"]) if "step" in moments else 0.0])
        kinds[f"{name}.adam_step"] = snapshotd.OPTIMIZER
    # CheckFree+: the neighbour of the first and of the last stage carries their own tensors.
    carried = {1: trainer.stages[0].embed, STAGES - 2: trainer.stages[STAGES - 1].head}.get(stage)
    if carried is not None:
        prefix = "embed" if stage == 1 else "head"
        for name, parameter in carried.named_parameters():
            state[f"{prefix}.{name}"] = parameter.detach()
            kinds[f"{prefix}.{name}"] = snapshotd.CARRIED
    state["rng.torch"] = torch.get_rng_state()
    kinds["rng.torch"] = snapshotd.RNG
    return state, kinds


def load(trainer: Trainer, stage: int, restored: snapshotd.Shard) -> None:
    module = trainer.stages[stage]
    optimizer = trainer.optimizers[stage]
    tensors = snapshotd.torch.to_torch(restored)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(tensors[name])
    if restored.reconstruction is not None:
        # Fresh optimizer state, learning rate raised as the restore result recommends.
        trainer.optimizers[stage] = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
        trainer.factors[stage] = restored.reconstruction.learning_rate_factor
        return
    optimizer.state.clear()
    for name, parameter in module.named_parameters():
        optimizer.state[parameter] = {
            "step": torch.tensor(float(tensors[f"{name}.adam_step"][0])),
            "exp_avg": tensors[f"{name}.exp_avg"].clone(), "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].clone(),
        }


# The cluster

def cluster(*arguments: str) -> str:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), *arguments], check=True, capture_output=True, text=True).stdout.strip()


def snapshotctl(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = os.environ.get("SNAPSHOTCTL") or str(Path(os.environ.get("SNAPSHOTD", REPOSITORY / ".build/debug/snapshotd")).with_name("snapshotctl"))
    return subprocess.run([binary, *arguments], check=check, capture_output=True, text=True)


def clients(directory: str) -> list[snapshotd.Client]:
    deadline = time.monotonic() + 120
    result: list[snapshotd.Client] = []
    for rank in range(STAGES * REPLICAS):
        node = PLACEMENT[rank]
        while True:  # a replacement daemon refuses trainers until it has joined
            try:
                result.append(snapshotd.Client(
                    JOB, rank, STAGES * REPLICAS, local_world=PLACEMENT.count(node), stage=rank // REPLICAS,
                    socket=cluster("socket", directory, str(node))))
                break
            except snapshotd.SnapshotdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return result


def save(connections: list[snapshotd.Client], trainer: Trainer, step: int) -> None:
    for rank, client in enumerate(connections):
        stage = rank // REPLICAS
        state, kinds = shard(trainer, stage)
        client.save(step, state, gradient_norm=trainer.norms[stage], kinds=kinds)
    for client in connections:
        client.wait_committed(step, timeout=60)


def lose_stage_two(directory: str) -> None:
    for node in ("2", "3"):
        cluster("kill", directory, node)
    for node in ("2", "3"):
        cluster("node", directory, node, "--fresh")
    socket = cluster("socket", directory, "0")
    deadline = time.monotonic() + 60
    while True:  # the replacements join; the group is beyond tolerance
        report = json.loads(snapshotctl("recover", "--socket", socket, "--json", check=False).stdout or "{}")
        jobs = [job for job in report.get("jobs", []) if job["job"] == JOB]
        if jobs and jobs[0]["lostRanks"] == [4, 5]:
            print(f"[checkfree] recovery report: {jobs[0]['summary']}")
            print(f"[checkfree] {jobs[0]['checkFree']}")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the loss of stage 2 was never reported: {report}")
        time.sleep(0.2)


# Runs

def run(steps: int, fail_at: int | None, mode: str, directory: str | None) -> tuple[list[float], dict[str, Any]]:
    trainer = Trainer.fresh(steps)
    losses: list[float] = []
    details: dict[str, Any] = {}
    connections = clients(directory) if directory else []
    step = 0
    while step < steps:
        if step == fail_at:
            if mode == "checkfree":
                assert directory is not None
                lose_stage_two(directory)
                result = snapshotctl("recover", "--checkfree", "--job", JOB, "--socket", cluster("socket", directory, "0"), "--json")
                rebuilt = json.loads(result.stdout)
                print(f"[checkfree] snapshotctl recover --checkfree: {rebuilt['summary']}")
                for connection in connections:
                    connection.close()
                connections = clients(directory)
                restored_step = -1
                for rank, client in enumerate(connections):
                    if rank % REPLICAS:
                        continue  # replicas hold the same state
                    restored_step, restored = client.restore()
                    if restored.reconstruction is not None:
                        details["reconstruction"] = {
                            "method": restored.reconstruction.method, "source_stages": list(restored.reconstruction.source_stages),
                            "weights": list(restored.reconstruction.weights), "learning_rate_factor": restored.reconstruction.learning_rate_factor,
                        }
                    load(trainer, rank // REPLICAS, restored)
                details["restored_step"] = restored_step
                step = restored_step + 1  # the steps after the snapshot are trained again
                losses = losses[:step]
                print(f"[checkfree] restored step {restored_step}; stage 2 is approximate: {details['reconstruction']}")
            elif mode == "reinitialized":
                torch.manual_seed(SEED + 1)
                trainer.stages[2] = Stage(2)
                trainer.optimizers[2] = torch.optim.Adam(trainer.stages[2].parameters(), lr=LEARNING_RATE)
        losses.append(trainer.step(step))
        if connections:
            save(connections, trainer, step)
        step += 1
    for connection in connections:
        connection.close()
    return losses, details


def moving_average(values: list[float], window: int = 10) -> list[float]:
    return [float(np.mean(values[max(0, i - window + 1): i + 1])) for i in range(len(values))]


def svg_plot(curves: dict[str, list[float]], fail_at: int, path: Path) -> None:
    """A small dependency-free SVG of the moving-average loss curves (log scale)."""
    width, height, margin = 720, 360, 50
    smooth = {name: moving_average(values) for name, values in curves.items()}
    low = min(min(v) for v in smooth.values())
    high = max(max(v) for v in smooth.values())
    steps = max(len(v) for v in smooth.values())

    def point(step: int, loss: float) -> str:
        x = margin + (width - 2 * margin) * step / max(1, steps - 1)
        y = height - margin - (height - 2 * margin) * (np.log(loss) - np.log(low)) / max(1e-12, np.log(high) - np.log(low))
        return f"{x:.1f},{y:.1f}"

    colours = {"reference": "#222222", "checkfree": "#1f77b4", "reinitialized": "#d62728"}
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{point(fail_at, low).split(",")[0]}" y1="{margin}" x2="{point(fail_at, low).split(",")[0]}" y2="{height - margin}" stroke="#999" stroke-dasharray="4"/>',
             f'<text x="{float(point(fail_at, low).split(",")[0]) + 4}" y="{margin + 12}" fill="#555">stage 2 lost (step {fail_at})</text>',
             f'<text x="{margin}" y="{margin - 20}">training loss, 10-step moving average (log scale) vs step</text>']
    for index, (name, values) in enumerate(smooth.items()):
        lines.append(f'<polyline fill="none" stroke="{colours.get(name, "#2ca02c")}" stroke-width="1.5" points="{" ".join(point(i, v) for i, v in enumerate(values))}"/>')
        lines.append(f'<text x="{width - margin - 150}" y="{margin + 16 * (index + 2)}" fill="{colours.get(name, "#2ca02c")}">{name}</text>')
    lines.append(f'<text x="{margin}" y="{height - margin + 20}">0</text><text x="{width - margin - 20}" y="{height - margin + 20}">{steps - 1}</text>')
    lines.append(f'<text x="5" y="{margin}">{high:.3g}</text><text x="5" y="{height - margin}">{low:.3g}</text></svg>')
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--fail-at", type=int, default=200)
    parser.add_argument("--recovery-steps", type=int, default=100, help="the CheckFree run must be within 5%% of the reference this many steps after the failure")
    parser.add_argument("--window", type=int, default=50, help="steps averaged when comparing losses")
    parser.add_argument("--out", type=Path, help="directory for curves.json and curves.svg")
    arguments = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out = arguments.out or Path(tempfile.mkdtemp(prefix="snapshotd-checkfree-"))
    out.mkdir(parents=True, exist_ok=True)

    print(f"[checkfree] reference run: {arguments.steps} steps, no failure")
    reference, _ = run(arguments.steps, None, "reference", None)
    print(f"[checkfree] stage 2 reinitialized at step {arguments.fail_at} (no CheckFree)")
    reinitialized, _ = run(arguments.steps, arguments.fail_at, "reinitialized", None)
    directory = tempfile.mkdtemp(prefix="snapshotd-checkfree-cluster-")
    print("[checkfree] starting a 5-node snapshotd cluster, RS(4,1)")
    cluster("start", directory, "5", "1")
    try:
        checkfree, details = run(arguments.steps, arguments.fail_at, "checkfree", directory)
    finally:
        cluster("stop", directory)

    curves = {"reference": reference, "checkfree": checkfree, "reinitialized": reinitialized}
    smooth = {name: moving_average(curve) for name, curve in curves.items()}
    window = arguments.window

    def ratio(name: str, start: int) -> float:
        return sum(curves[name][start:start + window]) / sum(reference[start:start + window])

    def recovered(name: str) -> int | None:
        """Steps after the failure from which on the run's mean loss over
        every `window`-step span (spans 10 steps apart) stays within 5% of
        the reference's over the same steps."""
        starts = range(arguments.fail_at, arguments.steps - window + 1, 10)
        for first in starts:
            if all(ratio(name, start) <= 1.05 for start in starts if start >= first):
                return first - arguments.fail_at
        return None

    recovered_after, reinitialized_after = recovered("checkfree"), recovered("reinitialized")
    tail = {name: ratio(name, arguments.steps - window) for name in ("checkfree", "reinitialized")}
    peak = {name: max(smooth[name][arguments.fail_at: arguments.fail_at + 20]) for name in smooth}
    print("[checkfree] step  reference  checkfree  reinitialized  (10-step moving averages)")
    for step in range(0, arguments.steps, max(1, arguments.steps // 20)):
        print(f"[checkfree] {step:4d}  {smooth['reference'][step]:9.4f}  {smooth['checkfree'][step]:9.4f}  {smooth['reinitialized'][step]:13.4f}")
    print(f"[checkfree] peak loss in the 20 steps after the failure: checkfree {peak['checkfree']:.4f}, "
          f"reinitialized {peak['reinitialized']:.4f}, reference {peak['reference']:.4f}")
    print(f"[checkfree] mean loss over {window} steps within 5% of the reference from then on, after: checkfree {recovered_after} steps, "
          f"reinitialized {reinitialized_after} steps; over the last {window} steps: checkfree ×{tail['checkfree']:.3f}, reinitialized ×{tail['reinitialized']:.3f}")
    (out / "curves.json").write_text(json.dumps({
        "fail_at": arguments.fail_at, "window": window, "details": details, "recovered_after": recovered_after,
        "reinitialized_after": reinitialized_after, "tail_ratio": tail,
        "reference": reference, "checkfree": checkfree, "reinitialized": reinitialized,
    }))
    svg_plot({"reference": reference, "checkfree": checkfree, "reinitialized": reinitialized}, arguments.fail_at, out / "curves.svg")
    print(f"[checkfree] curves: {out / 'curves.json'}, plot: {out / 'curves.svg'}")
    ok = (details.get("reconstruction", {}).get("method") == "checkfree-average" and recovered_after is not None
          and recovered_after <= arguments.recovery_steps)
    print(f"[checkfree] OK: stage 2 rebuilt by CheckFree, loss within 5% of the reference from {recovered_after} steps after the failure on"
          f" (limit {arguments.recovery_steps})" if ok else "[checkfree] FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
