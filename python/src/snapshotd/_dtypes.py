"""Element types: the daemon's DType codes and their numpy / torch counterparts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# include/snapshotd.h, snapshotd_dtype
BYTES, BOOL, UINT8, INT8, INT16, INT32, INT64, UINT16, UINT32, UINT64 = range(10)
FLOAT16, BFLOAT16, FLOAT32, FLOAT64, FLOAT8_E4M3, FLOAT8_E5M2 = range(10, 16)

NAMES = {
    BYTES: "bytes", BOOL: "bool", UINT8: "uint8", INT8: "int8", INT16: "int16", INT32: "int32",
    INT64: "int64", UINT16: "uint16", UINT32: "uint32", UINT64: "uint64", FLOAT16: "float16",
    BFLOAT16: "bfloat16", FLOAT32: "float32", FLOAT64: "float64", FLOAT8_E4M3: "float8_e4m3fn",
    FLOAT8_E5M2: "float8_e5m2",
}

CODES = {name: code for code, name in NAMES.items()}

_FROM_NUMPY = {
    np.dtype(np.bool_): BOOL, np.dtype(np.uint8): UINT8, np.dtype(np.int8): INT8,
    np.dtype(np.int16): INT16, np.dtype(np.int32): INT32, np.dtype(np.int64): INT64,
    np.dtype(np.uint16): UINT16, np.dtype(np.uint32): UINT32, np.dtype(np.uint64): UINT64,
    np.dtype(np.float16): FLOAT16, np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64,
}

# numpy has no bfloat16 or float8: those come back as same-sized unsigned views
# (the torch helpers turn them into the real dtype).
_TO_NUMPY = {code: dtype for dtype, code in _FROM_NUMPY.items()}
_TO_NUMPY.update({BYTES: np.dtype(np.uint8), BFLOAT16: np.dtype(np.uint16), FLOAT8_E4M3: np.dtype(np.uint8), FLOAT8_E5M2: np.dtype(np.uint8)})


def from_numpy(dtype: np.dtype, name: str) -> int:
    dtype = np.dtype(dtype)
    code = None if dtype.byteorder == ">" else _FROM_NUMPY.get(dtype)
    if code is None:
        raise TypeError(f"tensor {name!r}: numpy dtype {dtype} is not supported (supported: {', '.join(str(d) for d in _FROM_NUMPY)}, little-endian)")
    return code


def to_numpy(code: int) -> np.dtype:
    return _TO_NUMPY[code]


def from_torch(dtype: torch.dtype, name: str) -> int:
    import torch

    table = {
        torch.bool: BOOL, torch.uint8: UINT8, torch.int8: INT8, torch.int16: INT16, torch.int32: INT32,
        torch.int64: INT64, torch.uint16: UINT16, torch.uint32: UINT32, torch.uint64: UINT64,
        torch.float16: FLOAT16, torch.bfloat16: BFLOAT16, torch.float32: FLOAT32, torch.float64: FLOAT64,
        torch.float8_e4m3fn: FLOAT8_E4M3, torch.float8_e5m2: FLOAT8_E5M2,
    }
    code = table.get(dtype)
    if code is None:
        raise TypeError(f"tensor {name!r}: torch dtype {dtype} is not supported (supported: {', '.join(map(str, table))})")
    return code


def to_torch(code: int) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, NAMES[code]) if code != BYTES else torch.uint8
    return dtype
