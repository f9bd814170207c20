"""numpy ↔ sdmesh.v1.Tensor: raw little-endian bytes, dtype and shape checked on the way in."""

from __future__ import annotations

import math

import numpy as np

from sdmesh.v1 import tensor_pb2

MAX_DIMS = 8


class TensorError(ValueError):
    """A Tensor message whose dtype, shape and bytes do not agree, or that is not the tensor expected."""


def _bfloat16() -> np.dtype:
    import ml_dtypes  # comes with JAX; only needed for bfloat16 tensors

    return np.dtype(ml_dtypes.bfloat16)


_TO_NUMPY = {
    tensor_pb2.FLOAT32: lambda: np.dtype("<f4"),
    tensor_pb2.FLOAT16: lambda: np.dtype("<f2"),
    tensor_pb2.BFLOAT16: _bfloat16,
    tensor_pb2.INT32: lambda: np.dtype("<i4"),
    tensor_pb2.INT64: lambda: np.dtype("<i8"),
    tensor_pb2.UINT8: lambda: np.dtype("u1"),
}
_FROM_NUMPY = {
    "float32": tensor_pb2.FLOAT32,
    "float16": tensor_pb2.FLOAT16,
    "bfloat16": tensor_pb2.BFLOAT16,
    "int32": tensor_pb2.INT32,
    "int64": tensor_pb2.INT64,
    "uint8": tensor_pb2.UINT8,
}


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    array = np.asarray(array)
    if array.dtype.name not in _FROM_NUMPY:
        raise TensorError(f"cannot send dtype {array.dtype}; use one of {', '.join(_FROM_NUMPY)}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype)
    return tensor_pb2.Tensor(dtype=_FROM_NUMPY[array.dtype.name], shape=list(array.shape), data=data.tobytes())


def from_proto(
    tensor: tensor_pb2.Tensor, *, name: str = "tensor", dtype: str | None = None, ndim: int | None = None
) -> np.ndarray:
    """The array a Tensor message holds, after checking it; `dtype`/`ndim` state what the caller expects."""
    if tensor.dtype not in _TO_NUMPY:
        raise TensorError(f"{name}: unknown or unspecified dtype {tensor.dtype}")
    np_dtype = _TO_NUMPY[tensor.dtype]()
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:  # not quoted: a status message past ~8 kB never reaches the caller
        raise TensorError(f"{name}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{name}: shape {list(shape)} is not a valid array shape")
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: no overflow on absurd shapes
    if len(tensor.data) != expected:
        raise TensorError(
            f"{name}: {len(tensor.data)} bytes of data but dtype {np_dtype.name} and shape "
            f"{list(shape)} need {expected}"
        )
    if dtype is not None and np_dtype.name != dtype:
        raise TensorError(f"{name}: expected {dtype}, got {np_dtype.name}")
    if ndim is not None and len(shape) != ndim:
        raise TensorError(f"{name}: expected {ndim} dimensions, got shape {list(shape)}")
    return np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)
