"""ctypes bindings of include/snapshotd.h (Sources/CSnapshotd/include/snapshotd.h)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

LIBRARY_NAME = "libsnapshotdclient.so"


class ClientOptions(ctypes.Structure):
    _fields_ = [
        ("socket_path", ctypes.c_char_p),
        ("host", ctypes.c_char_p),
        ("port", ctypes.c_uint16),
        ("secret_file", ctypes.c_char_p),
        ("local_world", ctypes.c_uint32),
        ("pipeline_stage", ctypes.c_uint32),
        ("tensor_parallel_index", ctypes.c_uint32),
        ("data_parallel_index", ctypes.c_uint32),
        ("reply_timeout_ms", ctypes.c_int64),
        ("transport", ctypes.c_char_p),
        ("rdma_source", ctypes.c_char_p),
    ]


class TensorSpec(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
    ]


class TensorInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("data", ctypes.c_void_p),
        ("byte_length", ctypes.c_uint64),
        ("crc32c", ctypes.c_uint32),
    ]


class Reconstruction(ctypes.Structure):
    _fields_ = [
        ("method", ctypes.c_int32),
        ("source_count", ctypes.c_uint32),
        ("source_stages", ctypes.c_uint32 * 2),
        ("source_ranks", ctypes.c_uint32 * 2),
        ("weights", ctypes.c_double * 2),
        ("source_step", ctypes.c_uint64),
        ("optimizer_reset", ctypes.c_int32),
        ("learning_rate_factor", ctypes.c_double),
    ]


def _candidates() -> list[Path]:
    given = os.environ.get("SNAPSHOTD_LIBRARY")
    paths = [Path(given)] if given else []
    paths.append(Path(__file__).resolve().parent / LIBRARY_NAME)
    return paths


def _load() -> ctypes.CDLL:
    for path in _candidates():
        if path.is_file():
            return ctypes.CDLL(str(path))
    raise ImportError(
        f"snapshotd: {LIBRARY_NAME} not found (looked at {', '.join(map(str, _candidates()))}); "
        "reinstall with `pip install ./python` from the repository, or set SNAPSHOTD_LIBRARY"
    )


lib = _load()
_p = ctypes.c_void_p
_int = ctypes.c_int

_signatures: dict[str, tuple[object, list[object]]] = {
    "snapshotd_last_error": (ctypes.c_char_p, []),
    "snapshotd_version": (ctypes.c_char_p, []),
    "snapshotd_client_open": (_int, [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ClientOptions), ctypes.POINTER(_p)]),
    "snapshotd_client_close": (None, [_p]),
    "snapshotd_client_is_local": (_int, [_p]),
    "snapshotd_save_begin": (_int, [_p, ctypes.c_uint64, ctypes.POINTER(TensorSpec), ctypes.c_size_t, ctypes.POINTER(_p)]),
    "snapshotd_save_buffer": (_p, [_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64)]),
    "snapshotd_save_commit": (_int, [_p, ctypes.c_double, ctypes.c_char_p, ctypes.c_size_t]),
    "snapshotd_save_free": (None, [_p]),
    "snapshotd_wait_committed": (_int, [_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)]),
    "snapshotd_latest_committed": (_int, [_p, ctypes.POINTER(_int), ctypes.POINTER(ctypes.c_uint64)]),
    "snapshotd_restore_open": (_int, [_p, _int, ctypes.c_uint64, ctypes.POINTER(_p)]),
    "snapshotd_restore_step": (ctypes.c_uint64, [_p]),
    "snapshotd_restore_count": (ctypes.c_size_t, [_p]),
    "snapshotd_restore_tensor": (_int, [_p, ctypes.c_size_t, ctypes.POINTER(TensorInfo)]),
    "snapshotd_restore_metadata": (_p, [_p, ctypes.POINTER(ctypes.c_size_t)]),
    "snapshotd_restore_gradient_norm": (ctypes.c_double, [_p]),
    "snapshotd_restore_reconstruction": (_int, [_p, ctypes.POINTER(Reconstruction)]),
    "snapshotd_restore_durable_source": (ctypes.c_char_p, [_p]),
    "snapshotd_restore_close": (None, [_p]),
}
for _name, (_restype, _argtypes) in _signatures.items():
    _function = getattr(lib, _name)
    _function.restype = _restype
    _function.argtypes = _argtypes
