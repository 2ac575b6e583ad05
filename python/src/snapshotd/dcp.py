"""torch.distributed.checkpoint storage backed by snapshotd.

    writer = SnapshotdWriter(client, step)
    dcp.save(state_dict, storage_writer=writer)        # or dcp.async_save(...)
    dcp.load(state_dict, storage_reader=SnapshotdReader(client))

Each rank's items become its shard of the step (one snapshotd save per rank
per step). The reader serves a job restarting with the same world size, which
is what snapshotd restores: each rank reads its own shard, and the metadata it
plans with describes what that rank saved. Every rank therefore stores every
item it holds, including replicated tensors that DCP's planner deduplicated to
another rank (they are in this rank's memory anyway; the bytes cost is the
replication the job already has).

``dcp.async_save`` uses this writer as its ``AsyncStager``: staging copies each
tensor straight into the daemon's memory (no intermediate CPU buffer); the
upload thread then only commits.

As with :meth:`snapshotd.Client.save`, a save of the step the client just
restored (through :class:`SnapshotdReader` or otherwise) is skipped: the
daemon already holds that state.
"""

from __future__ import annotations

import io
import json
from typing import Any, cast

import numpy as np
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ._dtypes import DType
from ._enums import Kind
from .client import Client, PendingSave, Shard
from .torch import to_torch

BYTES_PREFIX = "bytes:"
SHARD_PREFIX = "shard:"


def storage_name(fqn: str, item_type: WriteItemType, offsets: Any = ()) -> str:
    """Where an item lives in the rank's shard."""
    if item_type == WriteItemType.BYTE_IO:
        return BYTES_PREFIX + fqn
    if item_type == WriteItemType.SHARD:
        return f"{SHARD_PREFIX}{','.join(map(str, offsets))}:{fqn}"
    return fqn


def _item_name(item: WriteItem) -> str:
    offsets = item.tensor_data.chunk.offsets if item.tensor_data is not None else ()
    return storage_name(item.index.fqn, item.type, offsets)


def _checkpoint_step(checkpoint_id: Any) -> int:
    try:
        step = int(str(checkpoint_id))
    except ValueError:
        raise ValueError(f"a snapshotd checkpoint_id is a training step (an integer), not {checkpoint_id!r}") from None
    if step < 0:
        raise ValueError(f"step {step} is negative")
    return step


class SnapshotdWriter(StorageWriter):
    """A ``StorageWriter`` (and ``AsyncStager``) that saves this rank's items as its shard of ``step``."""

    # AsyncStager: staging is complete when stage() returns.
    _synchronize_after_execute = False

    def __init__(self, client: Client, step: int | None = None) -> None:
        super().__init__()
        self.client = client
        self.step = step
        self._local_items: list[WriteItem] = []
        self._staged: tuple[int, PendingSave, set[str]] | None = None

    # StorageWriter

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id is not None:
            self.step = _checkpoint_step(checkpoint_id)
        self._local_items = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.step is None:
            raise ValueError("SnapshotdWriter needs a step: SnapshotdWriter(client, step) or checkpoint_id=step")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Before the coordinator deduplicates replicated items: this rank keeps all of its own.
        self._local_items = list(plan.items)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if self.step is None:
            raise ValueError("SnapshotdWriter needs a step: SnapshotdWriter(client, step) or checkpoint_id=step")
        items = self._local_items or list(plan.items)
        staged = self._take_staged()
        if self.client._skips(self.step):  # the step just restored: the daemon holds it already
            if staged is not None:
                staged[0].close()
            return _completed([WriteResult(index=item.index, size_in_bytes=0, storage_data=_item_name(item)) for item in plan.items])
        names = {_item_name(item) for item in items}
        if staged is not None and not names <= staged[1]:
            staged[0].close()  # the plan holds items the stage did not: save them all the plain way
            staged = None
        sizes = {item.index.fqn: list(item.tensor_data.size) for item in items if item.type == WriteItemType.SHARD and item.tensor_data}
        metadata = json.dumps({"format": "snapshotd-dcp-1", "sharded_sizes": sizes}).encode()
        sizes_of: dict[str, int] = {}
        if staged is not None:
            pending = staged[0]
            for tensor in pending.tensors:
                sizes_of[tensor.name] = int(np.prod(tensor.shape, dtype=np.int64)) * _element_size(tensor.dtype)
            pending.commit(metadata)
        else:
            flat: dict[str, Any] = {}
            for item in items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    flat[_item_name(item)] = np.frombuffer(cast(io.BytesIO, data).getvalue(), dtype=np.uint8)
                else:
                    resolved = cast(torch.Tensor, data).detach()
                    flat[_item_name(item)] = resolved.cpu() if resolved.is_cuda else resolved
            self.client.save(self.step, flat, metadata, kinds={name: Kind.EXTRA for name in flat if name.startswith(BYTES_PREFIX)})
            sizes_of = {name: (value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()) for name, value in flat.items()}
        return _completed([WriteResult(index=item.index, size_in_bytes=sizes_of.get(_item_name(item), 0), storage_data=_item_name(item))
                           for item in plan.items])

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # Nothing to write: each rank's shard carries what it needs to load.
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, int) or str(checkpoint_id).isdigit()

    def storage_meta(self) -> None:
        return None

    # AsyncStager

    @property
    def should_synchronize_after_execute(self) -> bool:
        return self._synchronize_after_execute

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copies every plain tensor straight into the daemon's memory (and
        serializes other objects as DCP would); the upload only commits."""
        if self.step is None:
            raise ValueError("SnapshotdWriter needs a step before async_save: SnapshotdWriter(client, step)")
        if self.client._resumes_at(self.step):  # write_data skips this save: nothing to stage
            return state_dict
        flat, _ = flatten_state_dict(state_dict)
        entries: dict[str, Any] = {}
        for fqn, value in flat.items():
            if isinstance(value, torch.Tensor):
                if type(value) is not torch.Tensor:  # DTensor, ShardedTensor: the planner splits them; no staging
                    return state_dict
                entries[storage_name(fqn, WriteItemType.TENSOR)] = value
            else:
                buffer = io.BytesIO()
                torch.save(value, buffer)
                entries[storage_name(fqn, WriteItemType.BYTE_IO)] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
        pending = self.client.begin_save(self.step, entries, kinds={name: Kind.EXTRA for name in entries if name.startswith(BYTES_PREFIX)})
        try:
            for index in range(len(pending.tensors)):
                pending.fill(index)
        except BaseException:
            pending.close()
            raise
        self._staged = (self.step, pending, set(entries))
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        staged = self._take_staged()
        if staged is not None:
            staged[0].close()

    def _take_staged(self) -> tuple[PendingSave, set[str]] | None:
        staged, self._staged = self._staged, None
        if staged is None or staged[0] != self.step:
            if staged is not None:
                staged[1].close()
            return None
        return staged[1], staged[2]


def _element_size(code: DType) -> int:
    return 1 if code == DType.BYTES else code.itemsize


def _completed(results: list[WriteResult]) -> Future[list[WriteResult]]:
    future: Future[list[WriteResult]] = Future()
    future.set_result(results)
    return future


class SnapshotdReader(StorageReader):
    """A ``StorageReader`` over this rank's shard of ``step`` (default: the newest committed step)."""

    def __init__(self, client: Client, step: int | None = None) -> None:
        super().__init__()
        self.client = client
        self.step = step
        self._shard: Shard | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id is not None:
            self.step = _checkpoint_step(checkpoint_id)
        self._release()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._release()
        chosen, shard = self.client.restore(self.step)
        self.step, self._shard = chosen, shard
        self._tensors = to_torch(shard, copy=False)  # views: read_data copies each range once, into its target
        info = json.loads(shard.metadata or b"{}")
        if info.get("format") != "snapshotd-dcp-1":
            raise ValueError(f"step {chosen} was not saved through SnapshotdWriter (its metadata is {shard.metadata[:80]!r})")
        sharded_sizes: dict[str, list[int]] = info.get("sharded_sizes", {})
        state: dict[str, Any] = {}
        for name, tensor in self._tensors.items():
            if name.startswith(BYTES_PREFIX):
                state[name[len(BYTES_PREFIX):]] = BytesStorageMetadata()
                continue
            offsets: list[int] = [0] * tensor.dim()
            fqn = name
            if name.startswith(SHARD_PREFIX):
                encoded, fqn = name[len(SHARD_PREFIX):].split(":", 1)
                offsets = [int(o) for o in encoded.split(",")] if encoded else []
            size = torch.Size(sharded_sizes.get(fqn, list(tensor.shape)))
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
            entry = state.get(fqn)
            if isinstance(entry, TensorStorageMetadata):
                entry.chunks.append(chunk)
            else:
                state[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=tensor.dtype), size=size, chunks=[chunk])
        return Metadata(state_dict_metadata=state, storage_data=None)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self._shard is None:
            raise RuntimeError("read_data before read_metadata")
        for request in plan.items:
            index: MetadataIndex = request.storage_index
            if request.type == LoadItemType.BYTE_IO:
                planner.load_bytes(request, io.BytesIO(self._shard[BYTES_PREFIX + index.fqn].tobytes()))
                continue
            name = index.fqn if index.fqn in self._tensors else storage_name(index.fqn, WriteItemType.SHARD, index.offset or ())
            stored = narrow_tensor_by_index(self._tensors[name], request.storage_offsets, request.lengths)
            target = planner.resolve_tensor(request).detach()
            if target.size() != stored.size():
                raise ValueError(f"{index.fqn}: saved range {tuple(stored.size())} does not fit the target {tuple(target.size())}")
            target.copy_(stored)
            planner.commit_tensor(request, target)
        # Every byte is copied into the caller's tensors: release the daemon's pin.
        self._release()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, int) or str(checkpoint_id).isdigit()

    def close(self) -> None:
        """Lets go of the shard read by :meth:`read_metadata` if no load followed. Idempotent."""
        self._release()

    def _release(self) -> None:
        shard, self._shard, self._tensors = self._shard, None, {}
        if shard is not None:
            shard.close()


__all__ = ["SnapshotdWriter", "SnapshotdReader"]
