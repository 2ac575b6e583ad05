"""The trainer's client: save and restore one rank's shard of a step."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np

from . import _dtypes, _lib
from ._dtypes import DType
from ._enums import Kind, ReconstructionMethod
from ._lib import ClientOptions, TensorInfo, TensorSpec, lib
from .errors import ErrorCode, SnapshotdError, error_for

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/snapshotd/snapshotd.sock"

PARAMETER, OPTIMIZER, RNG, EXTRA, CARRIED = Kind.PARAMETER, Kind.OPTIMIZER, Kind.RNG, Kind.EXTRA, Kind.CARRIED

StateDict = Mapping[str, Any]


def _check(status: int) -> None:
    if status != 0:
        raise error_for(status, (lib.snapshotd_last_error() or b"").decode("utf-8", "replace"))


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
    dtype: DType
    shape: tuple[int, ...]
    kind: Kind

    @staticmethod
    def of(name: str, value: Any, kind: int) -> _Tensor:
        try:
            tensor_kind = Kind(kind)
        except ValueError:
            raise ValueError(f"kinds[{name!r}]: {kind!r} is not a snapshotd.Kind ({', '.join(f'{k.name}={k.value}' for k in Kind)})") from None
        if isinstance(value, np.ndarray):
            return _Tensor(name, value, _dtypes.from_numpy(value.dtype, name), tuple(value.shape), tensor_kind)
        if isinstance(value, np.generic):
            array = np.asarray(value)
            return _Tensor(name, array, _dtypes.from_numpy(array.dtype, name), (), tensor_kind)
        if type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape"):
            if value.is_sparse or getattr(value, "is_quantized", False):
                raise TypeError(f"tensor {name!r}: sparse and quantized tensors are not supported; save a dense copy")
            return _Tensor(name, value, _dtypes.from_torch(value.dtype, name), tuple(value.shape), tensor_kind)
        raise TypeError(
            f"state[{name!r}]: {type(value).__name__} is not a numpy array or torch tensor "
            "(snapshotd.torch.snapshot saves whole training state, objects included)"
        )


class PendingSave:
    """A save whose arena memory is reserved: fill :meth:`destination` arrays, then :meth:`commit`.

    Use it as a context manager (or call :meth:`close`): leaving the block
    frees the handle, and a save never committed is aborted."""

    def __init__(self, client: Client, step: int, tensors: list[_Tensor]) -> None:
        self._handle: int | None = None
        self.client = client
        self.step = step
        self.tensors = tensors
        self.committed = False
        specs = (TensorSpec * max(1, len(tensors)))()
        shapes = [(ctypes.c_int64 * max(1, len(t.shape)))(*t.shape) for t in tensors]
        names = [t.name.encode() for t in tensors]
        for index, tensor in enumerate(tensors):
            specs[index] = TensorSpec(names[index], tensor.dtype, tensor.kind, len(tensor.shape), shapes[index])
        handle = ctypes.c_void_p()
        _check(lib.snapshotd_save_begin(client._handle_or_raise(), step, specs, len(tensors), ctypes.byref(handle)))
        self._handle = handle.value

    def destination(self, index: int) -> np.ndarray:
        """Where tensor ``index`` goes: a writable array over the daemon's memory (local) or the staging buffer (TCP)."""
        tensor = self.tensors[index]
        address = lib.snapshotd_save_buffer(self._open_handle(), index, None)
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
        _check(lib.snapshotd_save_commit(self._open_handle(), math.nan if gradient_norm is None else float(gradient_norm), data, len(data)))
        self.committed = True
        self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Frees the save; one never committed is aborted. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.snapshotd_save_free(handle)

    def __enter__(self) -> PendingSave:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net only: close() or `with` frees the save
        try:
            self.close()
        except Exception:  # noqa: S110 - never raise from a finalizer (e.g. at interpreter exit)
            pass

    def _open_handle(self) -> int:
        if self._handle is None:
            raise RuntimeError(f"save of step {self.step} is closed")
        return self._handle


class SaveHandle:
    """A save in flight (or done). :meth:`wait` is the fence before the trainer
    next mutates the saved tensors; :meth:`wait_committed` waits for the job-wide commit.

    ``skipped`` is True when the save was not sent at all: its step is the one
    this client just restored (see :meth:`Client.save`). As a context manager,
    leaving the block waits for the save (raising its error if the block itself did not raise)."""

    def __init__(self, client: Client, step: int, future: Future[float], started: float, *, skipped: bool = False) -> None:
        self.client = client
        self.step = step
        self.skipped = skipped
        self._future = future
        self._started = started
        #: Seconds from the save's start until the bytes were in the daemon's memory.
        self.staging_seconds: float | None = None
        #: Seconds from the save's start until the step was committed job-wide (after :meth:`wait_committed`).
        self.commit_seconds: float | None = None

    @classmethod
    def _completed(cls, client: Client, step: int, started: float, *, skipped: bool = False) -> SaveHandle:
        future: Future[float] = Future()
        future.set_result(started if skipped else time.perf_counter())
        return cls(client, step, future, started, skipped=skipped)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Returns once the tensors are copied and the daemon holds them; raises the save's error."""
        self.staging_seconds = self._future.result(timeout) - self._started

    def wait_committed(self, timeout: float = 60.0) -> int:
        """The fence plus the job-wide commit of this step (or a newer one); returns the committed step."""
        self.wait()
        committed = self.client.wait_committed(self.step, timeout)
        self.commit_seconds = time.perf_counter() - self._started
        return committed

    def close(self) -> None:
        """Waits until the save has finished, successfully or not, without raising. Idempotent."""
        if not self._future.done():
            try:
                self._future.exception()
            except BaseException:  # noqa: S110 - cancelled: nothing left to wait for
                pass

    def __enter__(self) -> SaveHandle:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        if error is None:
            self.wait()
        else:
            self.close()

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "done" if self.done() else "in flight"
        return f"<SaveHandle step {self.step} of rank {self.client.rank}: {state}>"


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


class _Restore:
    """An open restore handle: the daemon pins the step until it is closed,
    which happens when this object and every array viewing its memory are gone."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        finalizer = weakref.finalize(self, lib.snapshotd_restore_close, handle)
        finalizer.atexit = False  # at exit the process's connection closes, and the daemon unpins with it


class Shard(dict[str, np.ndarray]):
    """A restored shard: name → read-only numpy array viewing the daemon's
    memory (zero copy; the daemon keeps the step pinned while any array lives).

    numpy has no bfloat16 or float8: those arrays are same-sized unsigned
    views; :attr:`dtypes` names the saved type and :func:`snapshotd.torch.to_torch` restores it.

    As a context manager (or with :meth:`close`) the shard lets go of its
    arrays on exit; the daemon's pin goes as soon as no array viewing it is
    left (at once, unless arrays of the shard are still referenced elsewhere).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] = (),
        *,
        step: int,
        metadata: bytes = b"",
        gradient_norm: float | None = None,
        dtypes: Mapping[str, str] | None = None,
        kinds: Mapping[str, Kind | int] | None = None,
        reconstruction: Reconstruction | None = None,
        durable_source: str | None = None,
        owner: object = None,
    ) -> None:
        super().__init__(arrays)
        self.step = step
        self.metadata = metadata
        self.gradient_norm = gradient_norm
        #: Each tensor's saved element type, by name (``"bfloat16"``, ``"float32"``, …).
        self.dtypes: dict[str, str] = dict(dtypes or {})
        #: Each tensor's :class:`Kind`, by name (a plain int for a kind this version does not know).
        self.kinds: dict[str, Kind | int] = dict(kinds or {})
        #: Set when the shard is approximate (CheckFree); None when exact.
        self.reconstruction = reconstruction
        #: None when the shard came from memory; the file it was read from when
        #: memory could not serve it and the daemon fell back to the durable tier.
        self.durable_source = durable_source
        self._owner = owner

    @property
    def approximate(self) -> bool:
        return self.reconstruction is not None

    def close(self) -> None:
        """Drops the shard's arrays (and its hold on the daemon's memory). Idempotent."""
        self.clear()
        self._owner = None

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()


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

    Use it as a context manager, or call :meth:`close`.
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
        self._handle: int | None = None
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
        self._handle = handle.value
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"snapshotd-save-{rank}")
        # The step this client restored, until it saves another: a save of it is the resumed loop's first snapshot.
        self._restored_step: int | None = None
        self._last_async_save: Future[float] | None = None  # the worker runs saves in order: the last one lands after all

    # Saving

    def begin_save(self, step: int, state: StateDict, kinds: Mapping[str, int] | None = None) -> PendingSave:
        """Reserves arena memory for ``state``'s tensors (nothing is copied yet).

        The low-level path: unlike :meth:`save`, this always goes to the daemon."""
        flat = flatten(state)
        tensors = [_Tensor.of(name, value, (kinds or {}).get(name, Kind.PARAMETER)) for name, value in flat.items()]
        return PendingSave(self, step, tensors)

    def save(self, step: int, state: StateDict, metadata: bytes | Mapping[str, Any] | None = None, *,
             gradient_norm: float | None = None, kinds: Mapping[str, int] | None = None) -> SaveHandle:
        """Saves this rank's ``state`` (name → numpy array / torch tensor, nested
        mappings flattened with dots) as its shard of ``step``. Returns, as a
        completed :class:`SaveHandle`, when the bytes are in the daemon's memory;
        protection and the job-wide commit follow in the background
        (:meth:`wait_committed`).

        A save of exactly the step this client last restored is skipped (the
        handle's ``skipped`` is True, one line is logged, the daemon is not
        contacted): the snapshot of step ``s`` is the state entering step ``s``,
        which is what was restored and what the daemon already holds. This is
        what lets a loop that snapshots at the top of every step resume at the
        restored step. Any other step not newer than the committed one is
        refused by the daemon (``ErrorCode.INVALID_REQUEST``)."""
        started = time.perf_counter()
        if self._skips(step):
            return SaveHandle._completed(self, step, started, skipped=True)
        with self.begin_save(step, state, kinds) as pending:
            for index in range(len(pending.tensors)):
                pending.fill(index)
            pending.commit(_encode_metadata(metadata), gradient_norm)
        return SaveHandle._completed(self, step, started)

    def save_async(self, step: int, state: StateDict, metadata: bytes | Mapping[str, Any] | None = None, *,
                   gradient_norm: float | None = None, kinds: Mapping[str, int] | None = None) -> SaveHandle:
        """Starts a save and returns at once; the copy runs on this client's
        worker thread (CUDA tensors: a device-to-host copy on a side stream).
        Call ``handle.wait()`` before mutating the tensors (e.g. before
        ``optimizer.step()``); mutating them earlier saves torn state.
        A save of the step this client last restored is skipped, as with :meth:`save`."""
        started = time.perf_counter()
        if self._skips(step):
            return SaveHandle._completed(self, step, started, skipped=True)
        flat = flatten(state)
        cuda_ready = None
        if any(getattr(value, "is_cuda", False) for value in flat.values()):
            from . import _cuda

            cuda_ready = _cuda.record_event(flat.values())
        future: Future[float] = self._worker.submit(self._save_job, step, flat, _encode_metadata(metadata), gradient_norm, kinds, cuda_ready)
        self._last_async_save = future
        return SaveHandle(self, step, future, started)

    def _save_job(self, step: int, flat: dict[str, Any], metadata: bytes, gradient_norm: float | None,
                  kinds: Mapping[str, int] | None, cuda_ready: Any) -> float:
        """Runs on the worker thread; returns when the daemon holds the bytes (perf_counter)."""
        with self.begin_save(step, flat, kinds) as pending:
            if cuda_ready is not None:
                from . import _cuda

                on_device = [index for index, tensor in enumerate(pending.tensors) if getattr(tensor.value, "is_cuda", False)]
                _cuda.copy_to_host(((pending.tensors[index].value, pending.destination(index)) for index in on_device), cuda_ready)
            for index, tensor in enumerate(pending.tensors):
                if not getattr(tensor.value, "is_cuda", False):
                    pending.fill(index)
            pending.commit(metadata, gradient_norm)
            return time.perf_counter()

    def _resumes_at(self, step: int) -> bool:
        """Whether ``step`` is the step this client restored (and has not saved past)."""
        return self._restored_step is not None and step == self._restored_step

    def _skips(self, step: int) -> bool:
        """Decides, once per save, whether it is the resumed loop's re-save of the restored step."""
        if self._resumes_at(step):
            logger.info("snapshotd: %s rank %d resumed at step %d: its snapshot is the state just restored "
                        "(committed already); not saved again", self.job, self.rank, step)
            return True
        self._restored_step = None
        return False

    # Commit state

    def wait_committed(self, step: int, timeout: float = 60.0) -> int:
        """Blocks until ``step`` or a newer one is committed job-wide; returns the committed step.

        This client's asynchronous saves still in flight land first (their
        errors stay with their handles): the library serves one call of a
        client at a time, so a wait could not otherwise see them commit."""
        deadline = time.monotonic() + timeout
        last = self._last_async_save
        if last is not None:
            futures.wait([last], timeout)
        remaining = max(0.0, deadline - time.monotonic())
        committed = ctypes.c_uint64()
        _check(lib.snapshotd_wait_committed(self._handle_or_raise(), step, min(int(remaining * 1000), 2**32 - 1), ctypes.byref(committed)))
        return committed.value

    def latest_committed_step(self) -> int | None:
        """The newest committed step of this job, or None."""
        found, step = ctypes.c_int(), ctypes.c_uint64()
        _check(lib.snapshotd_latest_committed(self._handle_or_raise(), ctypes.byref(found), ctypes.byref(step)))
        return step.value if found.value else None

    # Restoring

    def restore(self, step: int | None = None) -> tuple[int, Shard]:
        """This rank's shard of ``step`` (default: the newest committed) as
        read-only numpy arrays viewing the daemon's memory.

        Until this client saves another step, a save of the restored step is
        skipped (see :meth:`save`)."""
        handle = ctypes.c_void_p()
        _check(lib.snapshotd_restore_open(self._handle_or_raise(), 0 if step is None else 1, step or 0, ctypes.byref(handle)))
        if handle.value is None:
            raise SnapshotdError(ErrorCode.PROTOCOL, "snapshotd_restore_open succeeded without a handle")
        owner = _Restore(handle.value)
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        kinds: dict[str, Kind | int] = {}
        info = TensorInfo()
        for index in range(lib.snapshotd_restore_count(owner.handle)):
            _check(lib.snapshotd_restore_tensor(owner.handle, index, ctypes.byref(info)))
            name = info.name.decode()
            dtype = DType(info.dtype)
            shape = tuple(info.shape[d] for d in range(info.ndim))
            arrays[name] = _view(info.data, shape, _dtypes.to_numpy(dtype), True, owner)
            dtypes[name] = dtype.type_name
            kinds[name] = _kind(info.kind)
        length = ctypes.c_size_t()
        address = lib.snapshotd_restore_metadata(owner.handle, ctypes.byref(length))
        norm = lib.snapshotd_restore_gradient_norm(owner.handle)
        source = lib.snapshotd_restore_durable_source(owner.handle)
        shard = Shard(
            arrays, step=lib.snapshotd_restore_step(owner.handle),
            metadata=ctypes.string_at(address, length.value) if address else b"",
            gradient_norm=None if math.isnan(norm) else norm, dtypes=dtypes, kinds=kinds,
            reconstruction=_reconstruction(owner.handle), durable_source=source.decode() if source else None, owner=owner,
        )
        self._restored_step = shard.step
        return shard.step, shard

    # Lifetime

    @property
    def is_local(self) -> bool:
        """True when tensors move through shared memory (zero copy)."""
        return bool(lib.snapshotd_client_is_local(self._handle_or_raise()))

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Closes the connection once pending asynchronous saves are done. Idempotent."""
        self._close(wait=True)

    def _close(self, wait: bool) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._worker.shutdown(wait=wait)
            lib.snapshotd_client_close(handle)  # a save still running keeps the library's client alive until it ends

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net only: close() or `with` closes the client
        try:
            self._close(wait=False)  # possibly on the worker thread itself, which cannot wait for itself
        except Exception:  # noqa: S110 - never raise from a finalizer (e.g. at interpreter exit)
            pass

    def __repr__(self) -> str:
        return f"<snapshotd.Client job {self.job!r} rank {self.rank}/{self.world}{' (closed)' if self.closed else ''}>"

    def _handle_or_raise(self) -> int:
        if self._handle is None:
            raise SnapshotdError(ErrorCode.INVALID_ARGUMENT, "client is closed")
        return self._handle


def _kind(value: int) -> Kind | int:
    """The :class:`Kind` of a restored tensor; the plain int for a kind of a newer daemon."""
    try:
        return Kind(value)
    except ValueError:
        return value


def _reconstruction(handle: int) -> Reconstruction | None:
    how = _lib.Reconstruction()
    if not lib.snapshotd_restore_reconstruction(handle, ctypes.byref(how)):
        return None
    count = how.source_count
    try:
        method = ReconstructionMethod(how.method).label
    except ValueError:
        method = f"method {how.method}"
    return Reconstruction(
        method=method, source_stages=tuple(how.source_stages[:count]), source_ranks=tuple(how.source_ranks[:count]),
        weights=tuple(how.weights[:count]), source_step=how.source_step, optimizer_reset=bool(how.optimizer_reset),
        learning_rate_factor=how.learning_rate_factor)


def _encode_metadata(metadata: bytes | Mapping[str, Any] | None) -> bytes:
    if metadata is None:
        return b""
    if isinstance(metadata, (bytes, bytearray, memoryview)):
        return bytes(metadata)
    return json.dumps(metadata, sort_keys=True).encode()
