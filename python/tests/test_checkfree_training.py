"""CheckFree in a real training loop: a 4-stage pipeline model loses stage 2
mid-training, snapshotd rebuilds it from stages 1 and 3, training continues
with the ×1.1 learning rate on that stage, and its loss returns to within 5%
of the no-failure curve (examples/checkfree_training.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed: the training check needs it")

from conftest import REPOSITORY, daemon_binary, free_port  # noqa: E402

RECOVERY_STEPS = 100  # the limit this test states: steps after the failure until the loss stays within 5%


def test_a_lost_middle_stage_rebuilt_by_checkfree_trains_back_to_the_reference_curve(tmp_path: Path) -> None:
    environment = dict(os.environ, SNAPSHOTD=str(daemon_binary()), BASE_PORT=str(free_port() // 8 * 8 % 50000 + 10000))
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "examples" / "checkfree_training.py"), "--out", str(tmp_path), "--recovery-steps", str(RECOVERY_STEPS)],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=900,
    )
    print(result.stdout[-6000:], result.stderr[-6000:])
    assert result.returncode == 0
    curves = json.loads((tmp_path / "curves.json").read_text())
    reconstruction = curves["details"]["reconstruction"]
    assert reconstruction["method"] == "checkfree-average"
    assert reconstruction["source_stages"] == [1, 3]
    assert reconstruction["learning_rate_factor"] == 1.1
    assert abs(sum(reconstruction["weights"]) - 1) < 1e-12
    # The snapshot restored is the last committed before the failure: the steps after it are trained again.
    assert curves["details"]["restored_step"] == curves["fail_at"] - 1
    fail_at, window = curves["fail_at"], curves["window"]
    after = curves["recovered_after"]
    assert after is not None and after <= RECOVERY_STEPS, f"recovered after {after} steps"
    # Checked here too, from the recorded curves: every 50-step span from then on is within 5%.
    reference, checkfree = curves["reference"], curves["checkfree"]
    for start in range(fail_at + after, len(reference) - window + 1, 10):
        assert sum(checkfree[start:start + window]) <= 1.05 * sum(reference[start:start + window]), start
    # The approximate stage is worth having: a stage restarted from random weights recovers far later, if at all.
    assert curves["reinitialized_after"] is None or curves["reinitialized_after"] > after
    assert (tmp_path / "curves.svg").read_text().startswith("<svg")
