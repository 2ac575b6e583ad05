"""PyTorch integration: whole training state in one call, and tensor helpers.

    handle = snapshotd.torch.snapshot(client, step, model=model, optimizer=opt,
                                      scheduler=sched, asynchronous=True)
    ...                                  # forward / backward overlap the copy
    handle.wait()                        # the fence: before optimizer.step()
    optimizer.step()

    step, extra = snapshotd.torch.restore(client, model=model, optimizer=opt, scheduler=sched)
"""

from __future__ import annotations

import pickle
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from . import _dtypes
from ._enums import Kind
from .client import Client, Reconstruction, SaveHandle, Shard

#: The pickled structure of the state (everything but tensor bytes).
STRUCTURE = "__snapshotd__.structure"


@dataclass(frozen=True)
class _TensorRef:
    """Stands for a tensor in the pickled structure: its name in the shard."""

    name: str


def _split(value: Any, name: str, kind: Kind, tensors: dict[str, torch.Tensor], kinds: dict[str, Kind]) -> Any:
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors of the state are both named {name!r}")
        tensors[name], kinds[name] = value.detach(), kind
        return _TensorRef(name)
    if isinstance(value, Mapping):
        return cast(Any, type(value))((key, _split(item, f"{name}.{key}", kind, tensors, kinds)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_split(item, f"{name}.{index}", kind, tensors, kinds) for index, item in enumerate(value))
    return value


def _join(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, _TensorRef):
        return tensors[value.name]
    if isinstance(value, Mapping):
        return cast(Any, type(value))((key, _join(item, tensors)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_join(item, tensors) for item in value)
    return value


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from: torch (CPU and each CUDA device), numpy, Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(*, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, extra: Mapping[str, Any] | None = None, rng: bool = True) -> tuple[dict[str, Any], dict[str, Kind]]:
    """The training state as a flat name → tensor mapping (tensors by
    reference, nothing copied) plus its pickled structure, with each tensor's kind."""
    parts: list[tuple[str, Any, Kind]] = []
    if model is not None:
        parts.append(("model", model.state_dict(), Kind.PARAMETER))
    if optimizer is not None:
        parts.append(("optimizer", optimizer.state_dict(), Kind.OPTIMIZER))
    if scheduler is not None:
        parts.append(("scheduler", scheduler.state_dict(), Kind.EXTRA))
    if extra is not None:
        parts.append(("extra", dict(extra), Kind.EXTRA))
    if rng:
        parts.append(("rng", rng_state(), Kind.RNG))
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, Kind] = {}
    structure = {name: _split(value, name, kind, tensors, kinds) for name, value, kind in parts}
    flat: dict[str, Any] = dict(tensors)
    flat[STRUCTURE] = np.frombuffer(pickle.dumps(structure, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    kinds[STRUCTURE] = Kind.EXTRA
    return flat, kinds


def snapshot(client: Client, step: int, *, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, extra: Mapping[str, Any] | None = None, rng: bool = True,
             gradient_norm: float | None = None, asynchronous: bool = False) -> SaveHandle:
    """Saves model, optimizer, scheduler, RNG and ``extra`` state as this rank's shard of ``step``.

    The snapshot of ``step`` is the state entering that step: take it at the
    top of the step, before the forward pass. With ``asynchronous=True`` the
    returned :class:`~snapshotd.SaveHandle` comes back at once; call
    ``handle.wait()`` before the next ``optimizer.step()`` (or any other
    in-place change of the saved tensors). Without it, the handle is complete.

    The step :func:`restore` just restored is not saved again (``handle.skipped``):
    the daemon already holds exactly that state, so a loop resumed at the
    restored step runs on unchanged."""
    flat, kinds = capture(model=model, optimizer=optimizer, scheduler=scheduler, extra=extra, rng=rng)
    if asynchronous:
        return client.save_async(step, flat, gradient_norm=gradient_norm, kinds=kinds)
    return client.save(step, flat, gradient_norm=gradient_norm, kinds=kinds)


def to_torch(shard: Shard, *, copy: bool = True, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The shard's arrays as torch tensors of their saved dtype (bfloat16 and
    float8 included). ``copy=False`` gives zero-copy views of the daemon's
    memory: read-only, alive while the shard is; never write through them.
    ``device`` moves every tensor there but RNG state, which torch keeps on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, array in shard.items():
            if name == STRUCTURE:
                continue
            view = torch.from_numpy(array).view(_dtypes.to_torch(_dtypes.CODES[shard.dtypes[name]]))
            tensors[name] = view.clone() if copy else view
            if device is not None and shard.kinds.get(name) != Kind.RNG:
                tensors[name] = tensors[name].to(device)
    return tensors


@dataclass
class Restored:
    step: int
    extra: dict[str, Any]
    reconstruction: Reconstruction | None = None
    """Set when this rank's state was rebuilt approximately (CheckFree): the
    optimizer restarted from zero; multiply the learning rate by
    ``reconstruction.learning_rate_factor``."""
    durable_source: str | None = None
    """None when restored from memory; the file it came from when the daemon
    fell back to the durable tier."""


def restore(client: Client, *, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, step: int | None = None, rng: bool = True, device: torch.device | str | None = None) -> Restored:
    """Loads the newest committed step (or ``step``) saved by :func:`snapshot`
    into ``model``, ``optimizer`` and ``scheduler``, and restores the RNG state.
    Returns the step and the ``extra`` state.

    The state restored is the state entering the returned step: run that step
    next. Its own snapshot there is skipped (see :func:`snapshot`)."""
    chosen, shard = client.restore(step)
    reconstruction = shard.reconstruction
    durable_source = shard.durable_source
    if durable_source is not None:
        warnings.warn(f"rank {client.rank}: step {chosen} came from the durable tier ({durable_source}): memory could not serve it",
                      stacklevel=2)
    if reconstruction is not None:
        warnings.warn(f"rank {client.rank}: step {chosen} was rebuilt approximately by {reconstruction.method} from stages "
                      f"{list(reconstruction.source_stages)}; optimizer state restarts at zero, raise this stage's learning rate "
                      f"x{reconstruction.learning_rate_factor}", stacklevel=2)
    with shard:  # everything is copied by the end of the block: the daemon's pin goes with it
        if STRUCTURE not in shard:
            raise ValueError(f"step {chosen} was not saved by snapshotd.torch.snapshot (no {STRUCTURE})")
        structure = pickle.loads(shard[STRUCTURE].tobytes())  # noqa: S301 - written by this job's own ranks
        state = _join(structure, to_torch(shard, device=device))
    for name, target in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if name not in state:
            raise ValueError(f"step {chosen} holds no {name} state (it has: {', '.join(sorted(state))})")
        target.load_state_dict(state[name])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
    return Restored(chosen, state.get("extra", {}), reconstruction, durable_source)


__all__ = ["snapshot", "restore", "capture", "to_torch", "rng_state", "set_rng_state", "Restored", "STRUCTURE"]
