"""Textual-inversion embedding files → (name, vectors): the token embeddings a trigger word stands for.

    emb = load_embedding(path, te_config.hidden_size)   # Embedding(name="my-style", vectors (n, hidden_size) float32)

Formats read:
  diffusers  learned_embeds.safetensors (or .bin): {token: (D,) or (n, D)}, one entry;
  A1111      <name>.safetensors: {"emb_params": (n, D)};  <name>.pt: {"string_to_param": {"*": (n, D)}, "name": ...};
  a bare tensor (n, D) saved with torch.save (pickle).
The name is the file's stem, which is what A1111 prompts use; `token` is the trigger the file itself names
(diffusers' key, A1111's "name"), for callers that name embeddings diffusers' way (learned_embeds.safetensors
files all share one stem).
Pickles (.pt/.bin/...) are read only with `allow_pickle`, by torch.load(weights_only=True).
Refused: vectors of another width than the text encoder's hidden size (naming the base they fit: 768-d SD 1.x,
1024-d SD 2.x), SDXL embeddings (clip_l + clip_g), and files holding anything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.services.checkpoints.lora import read_tensor_file
from sdmesh.services.checkpoints.weights import CheckpointError

# Text-encoder widths of the bases people train embeddings for.
_BASES = {768: "SD 1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)"}


class EmbeddingError(CheckpointError):
    """An embedding file that does not fit this model or that sdmesh cannot read."""


@dataclasses.dataclass(frozen=True)
class Embedding:
    name: str  # the file's stem
    vectors: np.ndarray  # (n, hidden_size) float32: the n token embeddings the name stands for
    token: str | None = None  # the trigger the file itself names, if it names one


def load_embedding(path: str | Path, hidden_size: int, *, allow_pickle: bool = False) -> Embedding:
    """Read a textual-inversion file for a text encoder of width `hidden_size`."""
    path = Path(path).expanduser()
    contents, _ = read_tensor_file(path, allow_pickle=allow_pickle, what="embedding", error=EmbeddingError)
    vectors, token = _vectors(contents, str(path))
    if vectors.ndim == 1:  # diffusers' single-vector files
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise EmbeddingError(f"{path}: an embedding is (n, D) vectors, not shape {vectors.shape}")
    width = vectors.shape[1]
    if width != hidden_size:
        raise EmbeddingError(
            f"{path}: this embedding is for {_base(width)}; the model's text encoder is {_base(hidden_size)}. "
            "Use an embedding trained for this model's base"
        )
    return Embedding(name=path.stem, vectors=vectors.astype(np.float32), token=token)


def _base(width: int) -> str:
    return f"{_BASES[width]}, {width}-d" if width in _BASES else f"a {width}-d text encoder"


def _vectors(contents: Any, source: str) -> tuple[np.ndarray, str | None]:
    """(vectors, the token the file names) from any of the formats we read."""
    if isinstance(contents, np.ndarray):
        return contents, None
    if not isinstance(contents, Mapping):
        raise EmbeddingError(f"{source} is not an embedding file (it holds a {type(contents).__name__})")
    if "clip_l" in contents or "clip_g" in contents:
        raise EmbeddingError(f"{source} is an SDXL embedding (clip_l + clip_g); sdmesh serves SD 1.x and 2.x")
    if "emb_params" in contents:  # A1111 safetensors
        return np.asarray(contents["emb_params"]), None
    if "string_to_param" in contents:  # A1111 .pt
        params = contents["string_to_param"]
        if isinstance(params, Mapping) and len(params) == 1:
            name = contents.get("name")
            return np.asarray(next(iter(params.values()))), name if isinstance(name, str) else None
        raise EmbeddingError(f"{source}: string_to_param should hold one tensor (under '*')")
    if len(contents) == 1:  # diffusers: {token: vectors}
        ((token, vectors),) = contents.items()
        if isinstance(vectors, np.ndarray):
            return vectors, str(token)
    raise EmbeddingError(
        f"{source} is not an embedding sdmesh reads (keys: {', '.join(map(str, contents))[:200]}); expected "
        "diffusers' {token: vectors}, A1111's emb_params or string_to_param"
    )
