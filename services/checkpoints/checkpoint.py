"""Finding a diffusers-format checkpoint and its files: a local folder or a Hub id via huggingface_hub's cache.

Layout (what `StableDiffusionPipeline.save_pretrained` writes and the Hub serves):
  model_index.json, scheduler/scheduler_config.json, tokenizer/…,
  text_encoder/{config.json, model[.variant].safetensors},
  unet/{config.json, diffusion_pytorch_model[.variant].safetensors}, vae/… likewise;
  sometimes sharded (`*.safetensors.index.json`) or PyTorch pickles (`*.bin`) only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.services.checkpoints.weights import CheckpointError, read_safetensors, read_torch_pickle

# The file stem each component's weights use.
WEIGHT_STEMS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


class ModelNotFound(CheckpointError):
    """The model is neither a local folder nor in the Hub cache (and could not be fetched)."""


# "name" or "org/name": anything else is meant as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve(model: str, *, revision: str | None = None, variant: str | None = None) -> Path:
    """A local diffusers folder, or a Hub id fetched into (or found in) huggingface_hub's cache.

    Honors HF_HUB_OFFLINE; only the files a pipeline needs are fetched (one weights
    variant, no .bin when safetensors exist).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelNotFound(
                f"{path} is a folder but not a diffusers checkpoint (no model_index.json or unet/); "
                "point --model at the folder that holds unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            )
        return path
    if path.exists() or not _HUB_ID.match(model):
        raise ModelNotFound(
            f"no model folder at {path}; check the path, or pass a Hub id such as stabilityai/stable-diffusion-2-1"
        )
    return _from_hub(model, revision=revision, variant=variant)


def _from_hub(repo_id: str, *, revision: str | None, variant: str | None) -> Path:
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - serve extra always has it
        raise ModelNotFound(f"{repo_id!r} is not a local folder and huggingface_hub is not installed") from e
    suffix = f".{variant}" if variant else ""
    patterns = ["*.json", "*.txt", f"*{suffix}.safetensors"]
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.GatedRepoError) as e:
        raise ModelNotFound(
            f"the Hugging Face Hub has no model {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" that this machine may read ({type(e).__name__}); "
            "check the id, or log in with `hf auth login` for gated models"
        ) from e
    except Exception as e:  # offline, no network, or not cached: all mean the same to the user
        raise ModelNotFound(
            f"model {repo_id!r} is not a local folder and is not in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}), "
            f"and it could not be downloaded here ({type(e).__name__}). On a machine with network access run "
            f"`{download}` (or pass --model with a local folder)."
        ) from e


def read_config(folder: Path, component: str, name: str = "config.json") -> dict[str, Any]:
    path = folder / component / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {component}/{name}; the checkpoint is incomplete (re-download it)")
    with open(path) as f:
        return json.load(f)


def weight_files(directory: Path, stem: str, *, variant: str | None = None, allow_pickle: bool = False) -> list[Path]:
    """The files holding one component's weights, safetensors first, pickles only when allowed."""
    v = f".{variant}" if variant else ""
    single = directory / f"{stem}{v}.safetensors"
    if single.is_file():
        return [single]
    index = directory / f"{stem}{v}.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [directory / s for s in shards]
    pickle = directory / f"{stem}{v}.bin"
    present = sorted(p.name for p in directory.glob("*")) if directory.is_dir() else []
    if pickle.is_file():
        if allow_pickle:
            return [pickle]
        raise CheckpointError(
            f"{directory} has only PyTorch pickle weights ({pickle.name}); pickles can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)"
        )
    hint = ""
    if not variant and any(".fp16." in n for n in present):
        hint = "; this folder has fp16 files: pass --variant fp16"
    elif variant:
        hint = (
            f"; drop --variant {variant} to load the default files"
            if (directory / f"{stem}.safetensors").is_file()
            else ""
        )
    raise CheckpointError(f"no {stem}{v}.safetensors in {directory} (found: {', '.join(present) or 'nothing'}){hint}")


def read_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        yield from (read_torch_pickle(path) if path.suffix == ".bin" else read_safetensors(path))
