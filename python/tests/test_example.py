"""The failure example of the README: a pipeline-parallel job that loses a rank and then a node."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="torch is not installed: the training example needs it")

from conftest import REPOSITORY, daemon_binary, free_port  # noqa: E402


def test_the_job_survives_a_killed_rank_and_a_lost_node_bit_for_bit() -> None:
    environment = dict(os.environ, SNAPSHOTD=str(daemon_binary()), BASE_PORT=str(free_port() // 8 * 8 % 50000 + 10000))
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "examples" / "pipeline_training.py"), "--steps", "24"],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=900,
    )
    print(result.stdout[-6000:], result.stderr[-6000:])
    assert result.returncode == 0
    resumed = [line for line in result.stdout.splitlines() if "restarts resumed from steps" in line]
    assert resumed, "no restart line"
    first, second = (int(step) for step in resumed[0].rsplit("[", 1)[1].rstrip("]").split(","))
    assert 0 < first <= second < 24, resumed[0]  # resumed from committed snapshots, not from scratch
    assert "losses identical: True; final parameters identical: True; restarts: 2" in result.stdout
