"""The Python client against a real daemon: numpy round trips, errors, async saves, TCP."""

from __future__ import annotations

import os

import numpy as np
import pytest

import snapshotd
from snapshotd import Client, DaemonUnavailableError, ErrorCode, SnapshotdError

from conftest import start_daemon

SEED = 20261125


@pytest.fixture
def rng() -> np.random.Generator:
    print(f"seed {SEED}")
    return np.random.default_rng(SEED)


def every_dtype(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "f32": rng.standard_normal((64, 33), dtype=np.float32),
        "f16": rng.standard_normal(1000).astype(np.float16),
        "f64": rng.standard_normal(17),
        "i64": rng.integers(-(2**62), 2**62, size=(5, 4), dtype=np.int64),
        "u8": rng.integers(0, 256, size=300, dtype=np.uint8),
        "bool": rng.integers(0, 2, size=(3, 7)).astype(bool),
        "i8": rng.integers(-128, 128, size=9, dtype=np.int8),
        "u16_bf16_view": rng.integers(0, 2**16, size=11, dtype=np.uint16),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float64),
    }


def test_every_dtype_round_trips_byte_identical_and_zero_copy(daemon, rng) -> None:
    state = every_dtype(rng)
    with Client("py-job", 0, 1, socket=daemon.socket) as client:
        assert client.is_local
        assert client.latest_committed_step() is None
        client.save(5, {"model": state, "step": np.int64(5)}, metadata={"epoch": 2}, gradient_norm=0.25)
        assert client.wait_committed(5) == 5
        assert client.latest_committed_step() == 5
        step, shard = client.restore()
    assert step == 5 and shard.step == 5
    assert sorted(shard) == sorted([f"model.{name}" for name in state] + ["step"])
    for name, array in state.items():
        restored = shard[f"model.{name}"]
        assert restored.dtype == array.dtype and restored.shape == array.shape, name
        assert restored.tobytes() == array.tobytes(), name
        assert not restored.flags.writeable, name
    assert shard["step"].shape == () and int(shard["step"]) == 5
    assert shard.metadata == b'{"epoch": 2}'
    assert shard.gradient_norm == 0.25
    with pytest.raises(ValueError):
        shard["model.f32"][0, 0] = 1.0  # the daemon's memory is read-only to a restore


def test_non_contiguous_input_is_copied_as_it_is(daemon, rng) -> None:
    base = rng.standard_normal((40, 60), dtype=np.float32)
    strided = {"transposed": base.T, "every_other": base[::2, 1::3]}
    assert not strided["transposed"].flags.c_contiguous
    with Client("py-job", 0, 1, socket=daemon.socket) as client:
        client.save(1, strided)
        client.wait_committed(1)
        _, shard = client.restore(1)
    for name, array in strided.items():
        np.testing.assert_array_equal(shard[name], array)
        assert shard[name].flags.c_contiguous


def test_save_async_returns_before_the_copy_and_wait_is_the_fence(daemon, rng) -> None:
    state = {"w": rng.standard_normal(8 << 20, dtype=np.float32)}  # 32 MiB
    expected = state["w"].copy()
    with Client("py-job", 0, 1, socket=daemon.socket) as client:
        handle = client.save_async(3, state)
        handle.wait()
        assert handle.staging_seconds is not None and handle.staging_seconds > 0
        state["w"][:] = 0  # after the fence: must not reach the snapshot
        assert handle.wait_committed() == 3
        assert handle.commit_seconds is not None and handle.commit_seconds >= handle.staging_seconds
        _, shard = client.restore(3)
    assert shard["w"].tobytes() == expected.tobytes()


def test_an_async_save_that_fails_raises_at_the_fence(tmp_path) -> None:
    small = start_daemon(tmp_path / "small", budget="64MiB")
    try:
        with Client("py-job", 0, 1, socket=small.socket) as client:
            handle = client.save_async(4, {"w": np.ones(24 << 20, dtype=np.float32)})  # 96 MiB
            with pytest.raises(SnapshotdError) as caught:
                handle.wait()
            assert caught.value.code == ErrorCode.OVER_BUDGET, caught.value
            client.save(5, {"w": np.ones(4, dtype=np.float32)})  # still serving
            assert client.wait_committed(5) == 5
    finally:
        small.process.kill()


def test_tcp_round_trip_with_the_shared_secret(daemon, rng) -> None:
    state = every_dtype(rng)
    with Client("tcp-job", 0, 1, address=daemon.address, secret_file=daemon.secret_file) as client:
        assert not client.is_local
        client.save(2, state)
        client.wait_committed(2)
        _, shard = client.restore()
    for name, array in state.items():
        assert shard[name].tobytes() == array.tobytes(), name


def test_rdma_without_a_device_is_a_clear_connection_error_and_bad_transports_are_refused(daemon) -> None:
    # No RDMA device here (the Soft-RoCE guest, Tests/rdma-guest, runs RDMA for real).
    with pytest.raises(DaemonUnavailableError) as caught:
        Client("rdma-job", 0, 1, address=daemon.address, secret_file=daemon.secret_file, transport="rdma")
    assert caught.value.code == ErrorCode.CONNECTION
    assert "over RDMA" in caught.value.message and "RDMA" in caught.value.message.split("over RDMA", 1)[1]
    with pytest.raises(ValueError, match="'infiniband' is not 'tcp' or 'rdma'"):
        Client("rdma-job", 0, 1, address=daemon.address, secret_file=daemon.secret_file, transport="infiniband")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply to a remote daemon"):
        Client("rdma-job", 0, 1, socket=daemon.socket, transport="rdma")


def test_torchrun_environment_supplies_rank_and_world(daemon, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("SNAPSHOTD_SOCKET", daemon.socket)
    with Client("env-job") as client:
        assert (client.rank, client.world) == (1, 2)


def test_a_huge_name_is_refused_with_invalid_argument(daemon) -> None:
    with Client("py-job", 0, 1, socket=daemon.socket) as client:
        with pytest.raises(SnapshotdError) as caught:
            client.save(1, {"x" * 300: np.zeros(1)})
        assert caught.value.code == ErrorCode.INVALID_ARGUMENT
        assert "300" in caught.value.message
        client.save(1, {"ok": np.zeros(1)})  # the client and the daemon keep serving


def test_unknown_types_are_refused_before_anything_is_sent(daemon) -> None:
    with Client("py-job", 0, 1, socket=daemon.socket) as client:
        with pytest.raises(TypeError, match="list"):
            client.save(1, {"x": [1, 2, 3]})
        with pytest.raises(TypeError, match="complex"):
            client.save(1, {"x": np.zeros(2, dtype=np.complex64)})
        with pytest.raises(TypeError, match="big|little"):
            client.save(1, {"x": np.zeros(2, dtype=">f4")})
        client.save(1, {"x": np.zeros(2)})


def test_wrong_world_and_duplicate_rank_carry_the_daemons_codes(daemon) -> None:
    with Client("py-job", 0, 2, socket=daemon.socket):
        with pytest.raises(SnapshotdError) as wrong_world:
            Client("py-job", 1, 3, socket=daemon.socket)
        assert wrong_world.value.code == ErrorCode.WRONG_JOB, wrong_world.value
        with pytest.raises(SnapshotdError) as duplicate:
            Client("py-job", 0, 2, socket=daemon.socket)
        assert duplicate.value.code == ErrorCode.DUPLICATE_RANK
    with pytest.raises(ValueError, match="rank 2 outside"):
        Client("py-job", 2, 2, socket=daemon.socket)


def test_restoring_a_step_never_committed_says_not_committed(daemon) -> None:
    with Client("py-job", 0, 1, socket=daemon.socket) as client:
        client.save(1, {"x": np.zeros(2)})
        client.wait_committed(1)
        with pytest.raises(SnapshotdError) as caught:
            client.restore(99)
    assert caught.value.code == ErrorCode.NOT_COMMITTED
    assert "99" in caught.value.message


def test_a_daemon_that_is_down_is_a_clear_connection_error(tmp_path) -> None:
    with pytest.raises(DaemonUnavailableError) as caught:
        Client("py-job", 0, 1, socket=str(tmp_path / "nobody-listens.sock"))
    assert caught.value.code == ErrorCode.CONNECTION
    assert "nobody-listens.sock" in str(caught.value) or "connect" in str(caught.value).lower()


def test_a_killed_daemon_fails_the_next_call_with_a_connection_error(daemon) -> None:
    client = Client("py-job", 0, 1, socket=daemon.socket)
    daemon.process.kill()
    daemon.process.wait()
    with pytest.raises(DaemonUnavailableError):
        client.save(1, {"x": np.zeros(2)})
    client.close()


def test_flatten_names_nested_mappings_with_dots() -> None:
    assert snapshotd.flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3}) == {"a.b.c": 1, "a.d": 2, "e": 3}
    with pytest.raises(TypeError, match="not a string"):
        snapshotd.flatten({1: 2})


def test_version_of_the_library_matches_the_package() -> None:
    from snapshotd._lib import lib

    assert lib.snapshotd_version().decode() == snapshotd.__version__
    assert os.path.basename(snapshotd._lib._candidates()[-1]) == "libsnapshotdclient.so"
