"""Checkpoint reading: diffusers/transformers tensors → Flax parameter trees.

The mapping is mechanical (nanoGPT's `from_pretrained` shape):
  * a torch key splits on "."; a numeric part joins its parent ("down_blocks.0" →
    "down_blocks_0", which is how Flax names list members), so module names in
    our models are the checkpoint's names;
  * the final "weight" becomes whichever of kernel/scale/embedding the Flax module
    declares, and only a kernel changes layout (Linear: transpose; Conv: OIHW→HWIO);
  * key sets must be equal and every shape must match, else we raise naming the
    first mismatch.
Tensors are converted one at a time (read, relayout, cast, place), so host memory
peaks near one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

Params = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


def flax_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1.weight' → ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def to_flax_layout(leaf: str, tensor: np.ndarray) -> np.ndarray:
    """Torch layout → Flax layout for a leaf named as the Flax module names it."""
    if leaf == "kernel":
        if tensor.ndim == 4:  # conv OIHW → HWIO
            return tensor.transpose(2, 3, 1, 0)
        if tensor.ndim == 2:  # linear (out, in) → (in, out)
            return tensor.T
    return tensor


def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _resolve_leaf(path: tuple[str, ...], expected: dict[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    if path in expected:
        return path
    if path[-1] == "weight":
        for leaf in ("kernel", "scale", "embedding"):
            candidate = path[:-1] + (leaf,)
            if candidate in expected:
                return candidate
    return None


def convert(
    tensors: Iterable[tuple[str, np.ndarray]],
    expected_shapes: Params,
    *,
    dtype: Any = None,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
    source: str = "checkpoint",
) -> Params:
    """Build a Flax params tree from (torch_key, array) pairs, checking keys and shapes.

    `expected_shapes` is the model's params tree of ShapeDtypeStructs (from
    `jax.eval_shape` of its init). `dtype` casts floating tensors; `place` puts
    each converted tensor on its device(s) (default: leave it as numpy).
    """
    expected = _flatten(expected_shapes)
    params: Params = {}
    seen: set[tuple[str, ...]] = set()
    for key, tensor in tensors:
        path = _resolve_leaf(flax_path(key), expected)
        if path is None:
            raise CheckpointError(
                f"{source}: tensor {key!r} {tuple(tensor.shape)} has no place in the model built from its config "
                "(is the config.json beside the weights the one they were saved with?)"
            )
        array = to_flax_layout(path[-1], np.asarray(tensor))
        want = tuple(expected[path].shape)
        if tuple(array.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the config asks for "
                f"{want} (as {'/'.join(path)}); the weights and config.json disagree"
            )
        if dtype is not None and (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            array = array.astype(dtype)
        _set(params, path, place(path, array) if place else array)
        seen.add(path)
    missing = [p for p in expected if p not in seen]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} parameter(s) the config needs are missing from the weights, "
            f"first {'/'.join(missing[0])} {tuple(expected[missing[0]].shape)}"
        )
    return params


# --- Reading tensors from disk ---------------------------------------------------


# safetensors dtype names → numpy dtypes (bfloat16 via ml_dtypes, which JAX ships).
def safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) from a .safetensors file one tensor at a time.

    Our own reader because safetensors' numpy backend cannot return bfloat16. Each
    tensor is read into its own buffer (no mmap kept alive), so once the caller has
    placed it on a device it can be freed: host memory holds one tensor at a time.
    """
    import json

    dtypes = safetensors_dtypes()
    with open(path, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e}); re-download it") from e
        base = 8 + header_len
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in dtypes:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which sdmesh cannot load")
            begin, end = entry["data_offsets"]
            dtype = np.dtype(dtypes[entry["dtype"]])
            count = int(np.prod(entry["shape"], dtype=np.int64))
            if end - begin != count * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {key!r} is truncated or corrupt; re-download the file")
            f.seek(base + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
            if data.size != count:
                raise CheckpointError(f"{path}: tensor {key!r} is cut short (file truncated); re-download the file")
            yield key, data.reshape(entry["shape"])


def read_torch_pickle(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield tensors from a PyTorch .bin with `weights_only=True` (no arbitrary code), after the user opted in."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch)") from e
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in list(state):
        t = state.pop(key)
        yield key, (t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
