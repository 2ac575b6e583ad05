"""The Python code the documentation shows, run as written.

Every block marked ``<!-- tested: NAME -->`` (the marker line directly before
a ```python fence) in README.md and docs/*.md runs here, each under its own
harness that defines the names the block assumes, against real daemons. A
marker without a harness fails: add one below when you mark a new block.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conftest import REPOSITORY, Daemon, start_daemon

MARKER = re.compile(r"^[ \t]*<!--\s*tested:\s*(?P<name>[\w.-]+)\s*-->[ \t]*$", re.M)  # a line of its own (prose may quote it)
FENCE = re.compile(r"```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    name: str
    path: Path
    line: int
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPOSITORY)}:{self.line}"


def documented_blocks() -> list[Block]:
    """Every marked block of README.md and docs/*.md; a marker not followed by a python fence is an error."""
    blocks: list[Block] = []
    for path in [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]:
        text = path.read_text()
        for marker in MARKER.finditer(text):
            line = text.count("\n", 0, marker.start()) + 1
            after = text[marker.end():]
            fence = FENCE.match(after.lstrip(" \t").removeprefix("\n"))
            if fence is None:
                raise AssertionError(f"{path.relative_to(REPOSITORY)}:{line}: marker 'tested: {marker['name']}' "
                                     "is not directly followed by a ```python block")
            blocks.append(Block(marker["name"], path, line, fence["code"]))
    return blocks


BLOCKS = documented_blocks()


def test_the_documentation_marks_the_blocks_these_tests_know() -> None:
    names = [block.name for block in BLOCKS]
    assert {"pytorch-loop", "dcp", "plain-arrays"} <= set(names), f"marked blocks found: {[block.where for block in BLOCKS]}"
    for name in set(names):
        assert names.count(name) == 1, f"marker 'tested: {name}' appears more than once: {[b.where for b in BLOCKS if b.name == name]}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_documented_block_runs_as_written(block: Block, daemon: Daemon, tmp_path: Path) -> None:
    harness = HARNESSES.get(block.name)
    if harness is None:
        pytest.fail(f"{block.where}: marker 'tested: {block.name}' has no harness in python/tests/test_documented_code.py "
                    f"(known: {', '.join(sorted(HARNESSES))}); add one that defines what the block assumes and checks its effect")
    print(f"{block.where} ({block.name}):\n{block.code}")
    harness(block, daemon, tmp_path)


# pytorch-loop: the training loop, killed with SIGKILL once step KILL_AT's
# snapshot is committed, restarted, and compared bit for bit with a run that
# was never interrupted.

STEPS, KILL_AT = 10, 6

LOOP_SCRIPT = '''
import json, logging, os, random, sys, time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
OUT = Path(os.environ["HARNESS_OUT"])
KILL_AT = int(os.environ.get("HARNESS_KILL_AT", "-1"))  # the interrupted run's first process waits here to be killed
SEED = 20261206

torch.manual_seed(SEED)
np.random.seed(SEED)
random.seed(SEED)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
steps = __STEPS__
_current = {}


def batch(step):
    if step == KILL_AT:
        client.wait_committed(step)  # the block's client: step KILL_AT's snapshot is committed job-wide
        (OUT / "committed").write_text(str(step))
        while True:  # the test kills this process now
            time.sleep(1)
    x = torch.randn(16, 8)  # drawn from the RNG state the snapshot carries
    noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
    _current.update(step=step, target=x.sum(dim=1, keepdim=True).sin() + noise)
    return x


def loss_fn(output):
    loss = torch.nn.functional.mse_loss(output, _current["target"])
    with open(OUT / "losses.jsonl", "a") as losses:
        losses.write(json.dumps({"step": _current["step"], "loss": loss.item().hex(), "pid": os.getpid()}) + "\\n")
    return loss


# ---- the documented block, as written ----
__BLOCK__
# ---- end of the block ----

(OUT / "final.json").write_text(json.dumps({
    "first": first,
    "parameters": {name: tensor.detach().numpy().tobytes().hex() for name, tensor in model.state_dict().items()},
}))
client.close()
'''


def _loop_process(script: Path, out: Path, daemon: Daemon, kill_at: int | None) -> subprocess.Popen[str]:
    out.mkdir(exist_ok=True)
    environment = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       SNAPSHOTD_SOCKET=daemon.socket, HARNESS_OUT=str(out))
    environment.pop("HARNESS_KILL_AT", None)
    if kill_at is not None:
        environment["HARNESS_KILL_AT"] = str(kill_at)
    return subprocess.Popen([sys.executable, str(script)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen[str], what: str) -> str:
    output = process.communicate(timeout=300)[0]
    print(f"--- {what} (exit {process.returncode}):\n{output[-4000:]}")
    assert process.returncode == 0, f"{what} failed:\n{output[-4000:]}"
    return output


def _losses(out: Path) -> list[tuple[int, str]]:
    return [(record["step"], record["loss"]) for record in map(json.loads, (out / "losses.jsonl").read_text().splitlines())]


def run_pytorch_loop(block: Block, daemon: Daemon, tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is not installed: the PyTorch loop needs it")
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT.replace("__STEPS__", str(STEPS)).replace("__BLOCK__", block.code))

    # Uninterrupted, on a daemon of its own (the block's job name is fixed).
    reference_daemon = start_daemon(tmp_path / "reference-daemon")
    try:
        _finish(_loop_process(script, tmp_path / "reference", reference_daemon, None), "the uninterrupted run")
    finally:
        reference_daemon.process.kill()
        reference_daemon.process.wait()

    # Interrupted: killed with SIGKILL once step KILL_AT's snapshot is committed, then restarted.
    interrupted = tmp_path / "interrupted"
    first = _loop_process(script, interrupted, daemon, KILL_AT)
    deadline = time.monotonic() + 300
    while not (interrupted / "committed").exists():
        if first.poll() is not None:
            pytest.fail(f"the first run ended (exit {first.returncode}) before step {KILL_AT} committed:\n{first.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"step {KILL_AT} did not commit within 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    print(f"--- the first run, killed after step {KILL_AT} committed:\n{first.communicate()[0][-4000:]}")
    restart = _finish(_loop_process(script, interrupted, daemon, None), "the restart")
    assert f"resumed at step {KILL_AT}" in restart, "the restart did not skip re-saving the step it restored"

    reference = json.loads((tmp_path / "reference" / "final.json").read_text())
    resumed = json.loads((interrupted / "final.json").read_text())
    assert reference["first"] == 0 and resumed["first"] == KILL_AT
    expected = _losses(tmp_path / "reference")
    assert [step for step, _ in expected] == list(range(STEPS))
    got = _losses(interrupted)
    assert [step for step, _ in got] == list(range(STEPS)), "each step trained once: steps 0-5, killed, then 6-9"
    assert got == expected, "the loss sequence differs from the uninterrupted run's"
    assert resumed["parameters"] == reference["parameters"], "final parameters differ from the uninterrupted run's"


# dcp: torch.distributed.checkpoint through the plugin, one process (no process group).

def run_dcp(block: Block, daemon: Daemon, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: the DCP block needs it")
    import torch.distributed.checkpoint as dcp

    import snapshotd
    from snapshotd.dcp import SnapshotdReader, SnapshotdWriter

    generator = torch.Generator().manual_seed(20261207)
    saved = {"model": {"weight": torch.randn(16, 8, generator=generator), "bias": torch.randn(16, generator=generator)},
             "step_count": torch.tensor([12]), "meta": {"epoch": 3}}
    state_dict = {"model": {name: tensor.clone() for name, tensor in saved["model"].items()},
                  "step_count": saved["step_count"].clone(), "meta": dict(saved["meta"])}
    writers_for: list[int | None] = []  # the step of each SnapshotdWriter the block makes
    make_writer = SnapshotdWriter.__init__

    def recording(writer: SnapshotdWriter, client: snapshotd.Client, step: int | None = None) -> None:
        writers_for.append(step)
        make_writer(writer, client, step)

    with snapshotd.Client("doc-dcp", 0, 1, socket=daemon.socket) as client:
        names = {"client": client, "step": 12, "state_dict": state_dict}
        with mock.patch.object(SnapshotdWriter, "__init__", recording):
            exec(compile(block.code, block.where, "exec"), names)  # noqa: S102 - the documentation's own code
            future = names.get("future")
            if future is not None:
                future.result()
        # Each save of the block is of its own step (a second save of a committed step is refused).
        assert writers_for and len(writers_for) == len(set(writers_for)), writers_for
        # What the block's load left in state_dict is what it saved.
        for name, tensor in saved["model"].items():
            assert torch.equal(state_dict["model"][name], tensor), name
        newest = client.latest_committed_step()
        assert newest is not None and newest >= 12, newest
        loaded = {}
        for step in sorted({12, newest}):  # and so is what a fresh load finds in each step the block committed
            target = {"model": {name: torch.zeros_like(tensor) for name, tensor in saved["model"].items()},
                      "step_count": torch.zeros(1, dtype=torch.int64), "meta": {"epoch": -1}}
            dcp.load(target, storage_reader=SnapshotdReader(client, step), no_dist=True)
            loaded[step] = target
    for step, target in loaded.items():
        for name, tensor in saved["model"].items():
            assert torch.equal(target["model"][name], tensor), (step, name)
        assert torch.equal(target["step_count"], saved["step_count"]) and target["meta"] == {"epoch": 3}, step


# plain-arrays: numpy arrays through the client, no torch. The block makes its
# own client (the daemon's socket from $SNAPSHOTD_SOCKET) and checks its own
# restore; it runs twice (a second run saves the next step), and a client of
# the harness reads back what each run committed.

def run_plain_arrays(block: Block, daemon: Daemon, tmp_path: Path) -> None:
    import snapshotd

    code = compile(block.code, block.where, "exec")
    with mock.patch.dict(os.environ, {"SNAPSHOTD_SOCKET": daemon.socket}):
        for _ in range(2):
            names: dict[str, object] = {}
            exec(code, names)  # noqa: S102 - the documentation's own code
            client = names["client"]
            assert isinstance(client, snapshotd.Client) and client.closed, "the block closes its client"
    with snapshotd.Client("my-job", 0, 1, socket=daemon.socket) as reader:
        assert reader.latest_committed_step() == 1
        for step in (0, 1):
            restored, shard = reader.restore(step)
            with shard:
                assert restored == step and sorted(shard) == ["opt.m", "w"]
                np.testing.assert_array_equal(shard["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
                np.testing.assert_array_equal(shard["opt.m"], np.zeros(4, dtype=np.float32))
                assert shard.dtypes == {"w": "float32", "opt.m": "float32"}


HARNESSES: dict[str, Callable[[Block, Daemon, Path], None]] = {
    "pytorch-loop": run_pytorch_loop,
    "dcp": run_dcp,
    "plain-arrays": run_plain_arrays,
}
