"""Exceptions keep their type, code and message through pickle, as
torch.distributed.checkpoint needs to carry a rank's failure to the others."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import snapshotd
from snapshotd import DaemonUnavailableError, ErrorCode, SnapshotdError

from conftest import free_port, start_daemon


def every_error_class() -> list[type[SnapshotdError]]:
    classes: list[type[SnapshotdError]] = [SnapshotdError]
    for cls in classes:
        classes.extend(sub for sub in cls.__subclasses__() if sub not in classes)
    return classes


def test_every_error_class_is_exported() -> None:
    assert {cls.__name__ for cls in every_error_class()} <= set(snapshotd.__all__)
    assert DaemonUnavailableError in every_error_class()


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("code", [*ErrorCode, 57], ids=lambda code: getattr(code, "name", str(code)))
def test_an_error_round_trips_through_pickle_with_type_code_and_message(cls: type[SnapshotdError], code: int) -> None:
    error = cls(code, f"step 6 is not newer than committed step 6 of job my-job ({code})")
    error.add_note("raised on rank 1")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert type(copy) is cls
        assert copy.code == error.code and type(copy.code) is type(error.code)
        assert copy.message == error.message
        assert str(copy) == str(error) and copy.args == error.args
        assert copy.__notes__ == ["raised on rank 1"]


def test_an_unknown_code_stays_a_plain_int() -> None:
    error = SnapshotdError(57, "from a newer daemon")
    assert error.code == 57 and not isinstance(error.code, ErrorCode)
    assert str(error) == "57 (57): from a newer daemon"
    assert SnapshotdError(4, "x").code is ErrorCode.INVALID_REQUEST


FAILING_RANK_JOB = r'''
import json, os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import snapshotd
from snapshotd.dcp import SnapshotdWriter
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
client = snapshotd.Client("dcp-fail", socket=sys.argv[1])
# Rank 1's item alone is over the daemon's 64 MiB budget: its writer is refused, rank 0's is not.
state = {f"own{rank}": torch.zeros((24 << 20) if rank == 1 else 16)}
report = {"rank": rank}
try:
    dcp.save(state, storage_writer=SnapshotdWriter(client, step=3))
    report["raised"] = None
except CheckpointException as error:
    report["raised"] = "CheckpointException"
    report["failures"] = {
        str(failed): {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "code": int(getattr(exc, "code", -1)),
                      "message": getattr(exc, "message", str(exc)), "is_snapshotd_error": isinstance(exc, snapshotd.SnapshotdError)}
        for failed, (exc, trace) in error.failures.items()
    }
print("REPORT " + json.dumps(report), flush=True)
client.close()
dist.destroy_process_group()
'''


def test_a_dcp_writer_refused_on_one_rank_reaches_every_rank_as_the_daemons_error(tmp_path: Path) -> None:
    """DCP gathers each rank's exception to the coordinator with pickle and
    broadcasts the verdict: rank 1's refusal arrives as the SnapshotdError it was."""
    pytest.importorskip("torch", reason="torch is not installed: the DCP test needs it")
    daemon = start_daemon(tmp_path / "daemon", budget="64MiB")
    try:
        script = tmp_path / "failing_rank.py"
        script.write_text(FAILING_RANK_JOB)
        port = free_port()
        ranks = [
            subprocess.Popen([sys.executable, str(script), daemon.socket], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for rank in range(2)
        ]
        outputs = [process.communicate(timeout=300)[0] for process in ranks]
    finally:
        daemon.process.kill()
        daemon.process.wait()
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        print(f"--- rank {rank}:\n{output[-4000:]}")
        assert process.returncode == 0, output
        reports = [line.removeprefix("REPORT ") for line in output.splitlines() if line.startswith("REPORT ")]
        assert reports, output
        report = json.loads(reports[0])
        assert report["raised"] == "CheckpointException", report
        assert list(report["failures"]) == ["1"], report  # rank 0's writer succeeded
        failure = report["failures"]["1"]
        assert failure["type"] == "snapshotd.errors.SnapshotdError" and failure["is_snapshotd_error"], failure
        assert failure["code"] == ErrorCode.OVER_BUDGET, failure
        assert "budget" in failure["message"], failure
