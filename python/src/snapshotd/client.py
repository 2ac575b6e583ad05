"""The trainer's client: save and restore one rank's shard of a step."""

from __future__ import annotations

import ctypes
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _dtypes
from . import _lib
from ._lib import ClientOptions, TensorInfo, TensorSpec, lib
from .errors import DaemonUnavailableError, ErrorCode, SnapshotdError

DEFAULT_SOCKET = "/run/snapshotd/snapshotd.sock"

#: What a tensor is, for recovery (CheckFree averages parameters only).
PARAMETER, OPTIMIZER, RNG, EXTRA, CARRIED = range(5)
"""Tensor kinds, for CheckFree recovery of a lost pipeline stage: parameters
are averaged from (or copied from) the neighbouring stages' tensors of the
same stage-local name, optimizer state restarts at zero, RNG and extra state
come from the neighbour used. ``CARRIED`` marks a copy of a tensor another
stage owns, saved under the owner's name (the embedding the second stage
carries for the first, the LM head the second-to-last carries for the last)."""

StateDict = Mapping[str, Any]


def _check(status: int) -> None:
    if status != 0:
        message = (lib.snapshotd_last_error() or b"").decode("utf-8", "replace")
        raise (DaemonUnavailableError if status == ErrorCode.CONNECTION else SnapshotdError)(status, message)


def _environment_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def flatten(state: StateDict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened with dotted names: ``{"model": {"w": t}}`` → ``{"model.w": t}``."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state key {key!r} under {prefix or 'the top level'!r} is not a string")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class _Memory:
    """Exposes arena memory to numpy (``__array_interface__``), keeping its owner alive."""

    def __init__(self, address: int, shape: tuple[int, ...], dtype: np.dtype, readonly: bool, owner: object) -> None:
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "data": (address, readonly), "version": 3}
        self.owner = owner


def _view(address: int | None, shape: tuple[int, ...], dtype: np.dtype, readonly: bool, owner: object) -> np.ndarray:
    if not address:  # an empty tensor has no memory of its own
        array = np.empty(shape, dtype)
        array.flags.writeable = not readonly
        return array
    return np.asarray(_Memory(address, shape, dtype, readonly, owner))


@dataclass(frozen=True)
class _Tensor:
    name: str
    value: Any  # numpy array or torch tensor
    dtype: int
    shape: tuple[int, ...]
    kind: int

    @staticmethod
    def of(name: str, value: Any, kind: int) -> _Tensor:
        if isinstance(value, np.ndarray):
            return _Tensor(name, value, _dtypes.from_numpy(value.dtype, name), tuple(value.shape), kind)
        if isinstance(value, np.generic):
            array = np.asarray(value)
            return _Tensor(name, array, _dtypes.from_numpy(array.dtype, name), (), kind)
        if type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape"):
            if value.is_sparse or getattr(value, "is_quantized", False):
                raise TypeError(f"tensor {name!r}: sparse and quantized tensors are not supported; save a dense copy")
            return _Tensor(name, value, _dtypes.from_torch(value.dtype, name), tuple(value.shape), kind)
        raise TypeError(
            f"state[{name!r}]: {type(value).__name__} is not a numpy array or torch tensor "
            "(snapshotd.torch.snapshot saves whole training state, objects included)"
        )


class PendingSave:
    """A save whose arena memory is reserved: fill :meth:`destination` arrays, then :meth:`commit`."""

    def __init__(self, client: Client, step: int, tensors: list[_Tensor]) -> None:
        self._handle: int | None = None
        self.client = client
        self.step = step
        self.tensors = tensors
        specs = (TensorSpec * max(1, len(tensors)))()
        shapes = [(ctypes.c_int64 * max(1, len(t.shape)))(*t.shape) for t in tensors]
        names = [t.name.encode() for t in tensors]
        for index, tensor in enumerate(tensors):
            specs[index] = TensorSpec(names[index], tensor.dtype, tensor.kind, len(tensor.shape), shapes[index])
        handle = ctypes.c_void_p()
        _check(lib.snapshotd_save_begin(client._handle_or_raise(), step, specs, len(tensors), ctypes.byref(handle)))
        self._handle = handle.value
        self.committed = False

    def destination(self, index: int) -> np.ndarray:
        """Where tensor ``index`` goes: a writable array over the daemon's memory (local) or the staging buffer (TCP)."""
        tensor = self.tensors[index]
        address = lib.snapshotd_save_buffer(self._handle, index, None)
        return _view(address, tensor.shape, _dtypes.to_numpy(tensor.dtype), False, self)

    def fill(self, index: int) -> None:
        """Copies tensor ``index`` from its source (numpy or a host torch tensor; strided sources are copied as they are)."""
        tensor = self.tensors[index]
        target = self.destination(index)
        if target.size == 0:
            return
        if isinstance(tensor.value, np.ndarray):
            np.copyto(target, tensor.value, casting="no")
        else:
            import torch

            source = tensor.value.detach()
            torch.from_numpy(target).view(source.dtype).copy_(source)

    def commit(self, metadata: bytes | None = None, gradient_norm: float | None = None) -> None:
        """Hands the save to the daemon; returns when its bytes are in the daemon's memory."""
        if self.committed:
            raise RuntimeError(f"save of step {self.step} was already committed")
        data = metadata or b""
        _check(lib.snapshotd_save_commit(self._handle, math.nan if gradient_norm is None else float(gradient_norm), data, len(data)))
        self.committed = True
        self.close()

    def close(self) -> None:
        """Frees the save; one never committed is aborted."""
        if self._handle is not None:
            lib.snapshotd_save_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


class SaveHandle:
    """An asynchronous save. :meth:`wait` is the fence before the trainer next
    mutates the saved tensors; :meth:`wait_committed` waits for the job-wide commit."""

    def __init__(self, client: Client, step: int, future: Future[float], started: float) -> None:
        self.client = client
        self.step = step
        self._future = future
        self._started = started
        #: Seconds from ``save_async`` until the bytes were in the daemon's memory.
        self.staging_seconds: float | None = None
        #: Seconds from ``save_async`` until the step was committed job-wide (after :meth:`wait_committed`).
        self.commit_seconds: float | None = None

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Returns once the tensors are copied and the daemon holds them; raises the save's error."""
        self.staging_seconds = self._future.result(timeout) - self._started

    def wait_committed(self, timeout: float = 60.0) -> int:
        """The fence plus the job-wide commit of this step (or a newer one)."""
        self.wait()
        committed = self.client.wait_committed(self.step, timeout)
        self.commit_seconds = time.perf_counter() - self._started
        return committed


@dataclass(frozen=True)
class Reconstruction:
    """How a shard that erasure coding could not recover was rebuilt
    approximately from its pipeline neighbours (CheckFree).

    ``method`` is ``"checkfree-average"`` (``W_i = (a·W_{i+1} + b·W_{i−1}) / (a + b)``,
    ``a``, ``b`` the neighbours' gradient norms + 1e-4) or ``"checkfree-copy"``
    (first or last stage). Optimizer state restores as zeros; multiply the
    stage's learning rate by ``learning_rate_factor``."""

    method: str
    source_stages: tuple[int, ...]
    source_ranks: tuple[int, ...]
    weights: tuple[float, ...]
    source_step: int
    optimizer_reset: bool
    learning_rate_factor: float


_METHODS = {1: "checkfree-average", 2: "checkfree-copy"}


class Shard(dict[str, np.ndarray]):
    """A restored shard: name → read-only numpy array viewing the daemon's
    memory (zero copy; the daemon keeps the step pinned while any array lives).

    numpy has no bfloat16 or float8: those arrays are same-sized unsigned
    views; :attr:`dtypes` names the saved type and :func:`snapshotd.torch.to_torch` restores it.
    """

    step: int
    metadata: bytes
    gradient_norm: float | None
    dtypes: dict[str, str]
    kinds: dict[str, int]
    reconstruction: Reconstruction | None
    """Set when the shard is approximate (CheckFree); None when exact."""
    durable_source: str | None
    """None when the shard came from memory; the file it was read from when
    memory could not serve it and the daemon fell back to the durable tier."""

    @property
    def approximate(self) -> bool:
        return self.reconstruction is not None


class _Restore:
    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __del__(self) -> None:
        lib.snapshotd_restore_close(self.handle)


class Client:
    """One trainer rank's connection to its snapshot daemon (like a
    ``torch.distributed`` process group member: one per rank).

    ``rank``, ``world`` and ``local_world`` default to torchrun's ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``. Locally (``socket``, default
    ``$SNAPSHOTD_SOCKET`` or ``/run/snapshotd/snapshotd.sock``) tensors move
    through shared memory; remotely (``address="host:port"`` and
    ``secret_file``) over authenticated TCP, or with ``transport="rdma"``
    over RDMA (tensors RDMA-written between this process and the daemon's
    memory; ``rdma_source``: the local address to connect from).
    """

    def __init__(
        self,
        job: str,
        rank: int | None = None,
        world: int | None = None,
        *,
        local_world: int | None = None,
        stage: int | None = None,
        socket: str | None = None,
        address: str | None = None,
        secret_file: str | None = None,
        transport: Literal["tcp", "rdma"] = "tcp",
        rdma_source: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        rank = rank if rank is not None else _environment_int("RANK")
        world = world if world is not None else _environment_int("WORLD_SIZE")
        local_world = local_world if local_world is not None else _environment_int("LOCAL_WORLD_SIZE")
        if rank is None or world is None:
            raise ValueError("rank and world are required (or RANK and WORLD_SIZE in the environment, as torchrun sets)")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.job, self.rank, self.world, self.stage = job, rank, world, stage
        options = ClientOptions()
        if address is not None:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"address {address!r} is not host:port")
            if secret_file is None:
                raise ValueError("a remote daemon (address=) needs secret_file=")
            if transport not in ("tcp", "rdma"):
                raise ValueError(f"transport {transport!r} is not 'tcp' or 'rdma'")
            options.host, options.port, options.secret_file = host.encode(), int(port), secret_file.encode()
            options.transport = transport.encode()
            options.rdma_source = rdma_source.encode() if rdma_source is not None else None
        elif transport != "tcp" or rdma_source is not None:
            raise ValueError("transport= and rdma_source= apply to a remote daemon (address=)")
        else:
            options.socket_path = (socket or os.environ.get("SNAPSHOTD_SOCKET") or DEFAULT_SOCKET).encode()
        options.local_world = local_world or 0
        options.pipeline_stage = stage or 0
        if not timeout > 0:
            raise ValueError(f"timeout {timeout} must be positive")
        options.reply_timeout_ms = max(1, int(timeout * 1000))
        handle = ctypes.c_void_p()
        _check(lib.snapshotd_client_open(job.encode(), rank, world, ctypes.byref(options), ctypes.byref(handle)))
        self._handle: int | None = handle.value
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"snapshotd-save-{rank}")

    # Saving

    def begin_save(self, step: int, state: StateDict, kinds: Mapping[str, int] | None = None) -> PendingSave:
        """Reserves arena memory for ``state``'s tensors (nothing is copied yet)."""
        flat = flatten(state)
        tensors = [_Tensor.of(name, value, (kinds or {}).get(name, PARAMETER)) for name, value in flat.items()]
        return PendingSave(self, step, tensors)

    def save(self, step: int, state: StateDict, metadata: bytes | Mapping[str, Any] | None = None, *,
             gradient_norm: float | None = None, kinds: Mapping[str, int] | None = None) -> None:
        """Saves this rank's ``state`` (name → numpy array / torch tensor, nested
        mappings flattened with dots) as its shard of ``step``. Returns when the
        bytes are in the daemon's memory; protection and the job-wide commit
        follow in the background (:meth:`wait_committed`)."""
        pending = self.begin_save(step, state, kinds)
        try:
            for index in range(len(pending.tensors)):
                pending.fill(index)
            pending.commit(_encode_metadata(metadata), gradient_norm)
        finally:
            pending.close()

    def save_async(self, step: int, state: StateDict, metadata: bytes | Mapping[str, Any] | None = None, *,
                   gradient_norm: float | None = None, kinds: Mapping[str, int] | None = None) -> SaveHandle:
        """Starts a save and returns at once; the copy runs on this client's
        worker thread (CUDA tensors: a device-to-host copy on a side stream).
        Call ``handle.wait()`` before mutating the tensors (e.g. before
        ``optimizer.step()``); mutating them earlier saves torn state."""
        started = time.perf_counter()
        flat = flatten(state)
        cuda_ready = _record_cuda_event(flat.values())
        future: Future[float] = self._worker.submit(self._save_job, step, flat, _encode_metadata(metadata), gradient_norm, kinds, cuda_ready)
        return SaveHandle(self, step, future, started)

    def _save_job(self, step: int, flat: dict[str, Any], metadata: bytes, gradient_norm: float | None,
                  kinds: Mapping[str, int] | None, cuda_ready: Any) -> float:
        """Runs on the worker thread; returns when the daemon holds the bytes (perf_counter)."""
        pending = self.begin_save(step, flat, kinds)
        try:
            if cuda_ready is not None:
                from .torch import copy_cuda_into

                copy_cuda_into(pending, cuda_ready)
            for index, tensor in enumerate(pending.tensors):
                if not getattr(tensor.value, "is_cuda", False):
                    pending.fill(index)
            pending.commit(metadata, gradient_norm)
            return time.perf_counter()
        finally:
            pending.close()

    # Commit state

    def wait_committed(self, step: int, timeout: float = 60.0) -> int:
        """Blocks until ``step`` or a newer one is committed job-wide; returns the committed step."""
        committed = ctypes.c_uint64()
        _check(lib.snapshotd_wait_committed(self._handle_or_raise(), step, max(0, min(int(timeout * 1000), 2**32 - 1)), ctypes.byref(committed)))
        return committed.value

    def latest_committed_step(self) -> int | None:
        """The newest committed step of this job, or None."""
        found, step = ctypes.c_int(), ctypes.c_uint64()
        _check(lib.snapshotd_latest_committed(self._handle_or_raise(), ctypes.byref(found), ctypes.byref(step)))
        return step.value if found.value else None

    # Restoring

    def restore(self, step: int | None = None) -> tuple[int, Shard]:
        """This rank's shard of ``step`` (default: the newest committed) as
        read-only numpy arrays viewing the daemon's memory."""
        handle = ctypes.c_void_p()
        _check(lib.snapshotd_restore_open(self._handle_or_raise(), 0 if step is None else 1, step or 0, ctypes.byref(handle)))
        assert handle.value is not None, "snapshotd_restore_open succeeded without a handle"
        owner = _Restore(handle.value)
        shard = Shard()
        shard.step = lib.snapshotd_restore_step(owner.handle)
        shard.dtypes, shard.kinds = {}, {}
        info = TensorInfo()
        for index in range(lib.snapshotd_restore_count(owner.handle)):
            _check(lib.snapshotd_restore_tensor(owner.handle, index, ctypes.byref(info)))
            name = info.name.decode()
            shape = tuple(info.shape[d] for d in range(info.ndim))
            shard[name] = _view(info.data, shape, _dtypes.to_numpy(info.dtype), True, owner)
            shard.dtypes[name] = _dtypes.NAMES[info.dtype]
            shard.kinds[name] = info.kind
        length = ctypes.c_size_t()
        address = lib.snapshotd_restore_metadata(owner.handle, ctypes.byref(length))
        shard.metadata = ctypes.string_at(address, length.value) if address else b""
        norm = lib.snapshotd_restore_gradient_norm(owner.handle)
        shard.gradient_norm = None if math.isnan(norm) else norm
        how = _lib.Reconstruction()
        if lib.snapshotd_restore_reconstruction(owner.handle, ctypes.byref(how)):
            count = how.source_count
            shard.reconstruction = Reconstruction(
                method=_METHODS.get(how.method, f"method {how.method}"), source_stages=tuple(how.source_stages[:count]),
                source_ranks=tuple(how.source_ranks[:count]), weights=tuple(how.weights[:count]), source_step=how.source_step,
                optimizer_reset=bool(how.optimizer_reset), learning_rate_factor=how.learning_rate_factor)
        else:
            shard.reconstruction = None
        source = lib.snapshotd_restore_durable_source(owner.handle)
        shard.durable_source = source.decode() if source else None
        return shard.step, shard

    # Lifetime

    @property
    def is_local(self) -> bool:
        """True when tensors move through shared memory (zero copy)."""
        return bool(lib.snapshotd_client_is_local(self._handle_or_raise()))

    def close(self) -> None:
        """Closes the connection once pending asynchronous saves are done."""
        if self._handle is not None:
            self._worker.shutdown(wait=True)
            lib.snapshotd_client_close(self._handle)
            self._handle = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self.close()

    def _handle_or_raise(self) -> int:
        if self._handle is None:
            raise SnapshotdError(ErrorCode.INVALID_ARGUMENT, "client is closed")
        return self._handle


def _encode_metadata(metadata: bytes | Mapping[str, Any] | None) -> bytes:
    if metadata is None:
        return b""
    if isinstance(metadata, (bytes, bytearray, memoryview)):
        return bytes(metadata)
    return json.dumps(metadata, sort_keys=True).encode()


def _record_cuda_event(values: Iterator[Any] | Any) -> Any:
    """On the caller's thread: an event after the work that produced any CUDA tensor, or None."""
    if not any(getattr(value, "is_cuda", False) for value in values):
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())
    return event
