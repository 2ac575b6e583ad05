"""Element types: the daemon's DType codes and their numpy / torch counterparts."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class DType(enum.IntEnum):
    """include/snapshotd.h, ``snapshotd_dtype``."""

    BYTES = 0
    BOOL = 1
    UINT8 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    INT64 = 6
    UINT16 = 7
    UINT32 = 8
    UINT64 = 9
    FLOAT16 = 10
    BFLOAT16 = 11
    FLOAT32 = 12
    FLOAT64 = 13
    FLOAT8_E4M3 = 14
    FLOAT8_E5M2 = 15

    @property
    def type_name(self) -> str:
        """The name of the type in numpy / torch spelling (``"bfloat16"``, ``"float8_e4m3fn"``)."""
        return NAMES[self]

    @property
    def itemsize(self) -> int:
        return to_numpy(self).itemsize


NAMES: dict[DType, str] = {
    DType.BYTES: "bytes", DType.BOOL: "bool", DType.UINT8: "uint8", DType.INT8: "int8", DType.INT16: "int16",
    DType.INT32: "int32", DType.INT64: "int64", DType.UINT16: "uint16", DType.UINT32: "uint32", DType.UINT64: "uint64",
    DType.FLOAT16: "float16", DType.BFLOAT16: "bfloat16", DType.FLOAT32: "float32", DType.FLOAT64: "float64",
    DType.FLOAT8_E4M3: "float8_e4m3fn", DType.FLOAT8_E5M2: "float8_e5m2",
}

CODES: dict[str, DType] = {name: code for code, name in NAMES.items()}

_FROM_NUMPY: dict[np.dtype, DType] = {
    np.dtype(np.bool_): DType.BOOL, np.dtype(np.uint8): DType.UINT8, np.dtype(np.int8): DType.INT8,
    np.dtype(np.int16): DType.INT16, np.dtype(np.int32): DType.INT32, np.dtype(np.int64): DType.INT64,
    np.dtype(np.uint16): DType.UINT16, np.dtype(np.uint32): DType.UINT32, np.dtype(np.uint64): DType.UINT64,
    np.dtype(np.float16): DType.FLOAT16, np.dtype(np.float32): DType.FLOAT32, np.dtype(np.float64): DType.FLOAT64,
}

# numpy has no bfloat16 or float8: those come back as same-sized unsigned views
# (the torch helpers turn them into the real dtype).
_TO_NUMPY: dict[DType, np.dtype] = {code: dtype for dtype, code in _FROM_NUMPY.items()}
_TO_NUMPY.update({DType.BYTES: np.dtype(np.uint8), DType.BFLOAT16: np.dtype(np.uint16),
                  DType.FLOAT8_E4M3: np.dtype(np.uint8), DType.FLOAT8_E5M2: np.dtype(np.uint8)})


def from_numpy(dtype: np.dtype, name: str) -> DType:
    dtype = np.dtype(dtype)
    code = None if dtype.byteorder == ">" else _FROM_NUMPY.get(dtype)
    if code is None:
        raise TypeError(f"tensor {name!r}: numpy dtype {dtype} is not supported (supported: {', '.join(str(d) for d in _FROM_NUMPY)}, little-endian)")
    return code


def to_numpy(code: int) -> np.dtype:
    return _TO_NUMPY[DType(code)]


def from_torch(dtype: torch.dtype, name: str) -> DType:
    import torch

    table = {
        torch.bool: DType.BOOL, torch.uint8: DType.UINT8, torch.int8: DType.INT8, torch.int16: DType.INT16,
        torch.int32: DType.INT32, torch.int64: DType.INT64, torch.uint16: DType.UINT16, torch.uint32: DType.UINT32,
        torch.uint64: DType.UINT64, torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16,
        torch.float32: DType.FLOAT32, torch.float64: DType.FLOAT64, torch.float8_e4m3fn: DType.FLOAT8_E4M3,
        torch.float8_e5m2: DType.FLOAT8_E5M2,
    }
    code = table.get(dtype)
    if code is None:
        raise TypeError(f"tensor {name!r}: torch dtype {dtype} is not supported (supported: {', '.join(map(str, table))})")
    return code


def to_torch(code: int) -> torch.dtype:
    import torch

    dtype: torch.dtype = torch.uint8 if code == DType.BYTES else getattr(torch, NAMES[DType(code)])
    return dtype
