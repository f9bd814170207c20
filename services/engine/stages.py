"""The three stages, each a pure function of (params, inputs), and the objects that load and compile them.

    encode_text(encoder, params, ids)              → conditioning (B, 77, D), one 77-token chunk per row
    apply_emphasis(hidden, weights)                → A1111's prompt weights on a prompt's chunks
    denoise.denoise_chunk(unet, …, params, …)      → latents, a lax.fori_loop over a running batch of slots
    decode(vae, params, latents)                   → uint8 images (B, H, W, 3)
    fit_latent_preview(decode, shape, f)           → the latent → RGB map of live previews (a few decodes, once)

`TextEncoderStage`, `DenoiserStage` and `DecoderStage` each load one component of a
checkpoint and compile its programs once per shape (`programs.Programs`); the in-process
pipeline (services/pipeline.py) and the stage services (services/serving/) both run them.
Arrays inside are NHWC (JAX's native layout).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdmesh.services import samplers
from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.checkpoints.weights import CheckpointError, convert
from sdmesh.services.engine import denoise as dn
from sdmesh.services.engine import lora_bank, sharding
from sdmesh.services.engine.programs import Programs
from sdmesh.services.inputs import conditioning, contract, modes
from sdmesh.services.inputs.contract import DenoiseJob, LatentPreview, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.inputs.tokenizer import PromptTokenizer, PromptTokens, Trigger, load_tokenizer
from sdmesh.services.models import controlnet as cn
from sdmesh.services.models import text_encoder as te
from sdmesh.services.models import unet as un
from sdmesh.services.models import vae as va
from sdmesh.services.models.attention import IMPLEMENTATIONS
from sdmesh.services.samplers import ddim, table

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = ("default", "high", "highest")
# The live previews' latent → RGB fit: from a fixed seed, decoding at least this many latent pixels (in up to
# PREVIEW_FIT_CALLS decodes of batch 1) at the UNet's native latent size, else at PREVIEW_FIT_SIZE.
PREVIEW_FIT_SEED = 0
PREVIEW_FIT_PIXELS = 1024
PREVIEW_FIT_CALLS = 8
PREVIEW_FIT_SIZE = (64, 64)  # SD's 512 × 512
PREVIEW_JPEG_QUALITY = 80  # a 64 × 64 preview: 1 to 3 kB (smooth to noisy), against 64 kB of float32 x̂₀

log = logging.getLogger("sdmesh.stages")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    weights_dtype: str = "float32"
    activations_dtype: str = "float32"
    precision: str = "default"  # jax matmul precision: default | high | highest
    attention: str = "dot_product"  # or "flash"
    jax_cache_dir: str | None = None
    mesh: sharding.MeshConfig | None = None  # None: one device, nothing sharded

    def __post_init__(self) -> None:
        for name in ("weights_dtype", "activations_dtype"):
            if getattr(self, name) not in DTYPES:
                raise InvalidRequest(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise InvalidRequest(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise InvalidRequest(f"attention must be one of {', '.join(IMPLEMENTATIONS)}, got {self.attention!r}")


# --- Stages: pure functions of (params, inputs) ----------------------------------


def encode_text(encoder: te.CLIPTextEncoder, params: Any, ids: jax.Array) -> jax.Array:
    """Token ids (B, L) → last hidden state after the final layer norm (B, L, D): the SD conditioning."""
    return encoder.apply({"params": params}, ids)


def encode_text_with_embeddings(
    encoder: te.CLIPTextEncoder, params: Any, ids: jax.Array, override: jax.Array, mask: jax.Array
) -> jax.Array:
    """`encode_text` with input embeddings `override` (B, L, D) in place of the tokens' where `mask` (B, L) is set:
    textual inversion. A program of its own, so calls without embeddings run exactly as before."""
    return encoder.apply({"params": params}, ids, override, mask)


def encode_text_with_loras(
    encoder: te.CLIPTextEncoder,
    params: Any,
    ids: jax.Array,
    override: jax.Array,
    mask: jax.Array,
    lora_index: jax.Array,
    lora_weight: jax.Array,
    lora_arrays: Any,
) -> jax.Array:
    """`encode_text_with_embeddings` with each row's LoRAs: `lora_index`/`lora_weight` (B, M) name rows of the
    bank `lora_arrays` (`lora_bank.LoraBank.arrays`). Rows without LoRAs point at its zero row."""
    lora = lora_bank.gather(lora_arrays, lora_index, lora_weight)
    return encoder.apply({"params": params, "lora": lora}, ids, override, mask)


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis (modules/sd_emphasis.py) on one prompt's chunks: hidden (C, L, D), weights (C, L).

    Each token's hidden state is scaled by its weight, then each chunk by (its mean before) / (its mean after), so
    a chunk's mean stays what the encoder gave. A1111 takes that mean over a chunk of its whole batch; here over
    the prompt's own chunk, so a prompt's conditioning never depends on what it is batched with.
    """
    original = hidden.mean(axis=(1, 2), dtype=np.float64)
    scaled = hidden * weights[..., None].astype(np.float32)
    after = scaled.mean(axis=(1, 2), dtype=np.float64)
    # a chunk whose weighted mean is 0 (weights of 0 or of both signs) keeps its scale: A1111 would divide by 0
    restore = np.where(after == 0, 1.0, original / np.where(after == 0, 1.0, after)).astype(np.float32)
    return scaled * restore[:, None, None]


@dataclasses.dataclass(frozen=True)
class LoadedEmbedding:
    """A textual-inversion file of --embeddings-dir, as prompts name it; `error` when it cannot be used."""

    name: str  # what prompts write: the file's stem (A1111), or for diffusers' learned_embeds.* its token
    path: Path
    vectors: np.ndarray | None  # (n, D) float32
    error: str = ""


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def load_embeddings(
    directory: Path, hidden_size: int, chunk_size: int, *, allow_pickle: bool = False
) -> list[LoadedEmbedding]:
    """Every embedding file under `directory` (A1111 scans its embeddings folder recursively too). A file that does
    not load, or does not fit this text encoder, is kept with its error: only prompts naming it fail."""
    from sdmesh.services.checkpoints.embeddings import load_embedding

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"--embeddings-dir {directory} is not a folder")
    found: list[LoadedEmbedding] = []
    for path in sorted(p for p in directory.rglob("*") if p.suffix in EMBEDDING_SUFFIXES and p.is_file()):
        try:
            emb = load_embedding(path, hidden_size, allow_pickle=allow_pickle)
        except CheckpointError as e:
            found.append(LoadedEmbedding(path.stem, path, None, str(e)))
            continue
        # diffusers saves every concept as learned_embeds.*: there the token the file names is its name
        name = emb.token if path.stem == "learned_embeds" and emb.token else emb.name
        error = ""
        if len(emb.vectors) > chunk_size:
            error = f"{path}: {len(emb.vectors)} vectors; a prompt chunk holds at most {chunk_size}"
        elif any(f.name == name for f in found):
            error = f"{path}: another embedding file is already named {name!r}; rename one of them"
        found.append(LoadedEmbedding(name, path, None if error else emb.vectors, error))
    return found


def decode(vae: va.AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) → uint8 images (B, H, W, 3), rounded as diffusers' postprocess does."""
    images = vae.apply(
        {"params": params}, va.unscale_latents(latents, vae.config).astype(vae.dtype), method=va.AutoencoderKL.decode
    )
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(images * 255).astype(jnp.uint8)


def preview_jpeg(x0: np.ndarray, projection: LatentPreview) -> bytes:
    """x̂₀ (h, w, C) → a JPEG of its colours under the latent → RGB map, one pixel per latent pixel."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(projection.rgb(x0)).save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return buffer.getvalue()


def smooth_latents(rng: np.random.Generator, shape: tuple[int, int, int, int]) -> np.ndarray:
    """(N, h, w, C) float32 latents that vary slowly, as an image's do: a random colour per image plus a random
    field on a coarse 5 × 5 grid, bilinearly upsampled; about unit variance per channel, as scaled latents have."""
    n, h, w, c = shape
    field = rng.standard_normal((n, 5, 5, c))
    for axis, size in ((1, h), (2, w)):  # separable linear interpolation of the grid onto h × w
        pos = np.linspace(0.0, field.shape[axis] - 1.0, size)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, field.shape[axis] - 1)
        t = (pos - lo).reshape([-1 if a == axis else 1 for a in range(4)])
        field = (1 - t) * np.take(field, lo, axis=axis) + t * np.take(field, hi, axis=axis)
    offset = 0.6 * rng.standard_normal((n, 1, 1, c))
    return (offset + field).astype(np.float32)


def fit_latent_preview(
    decode: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, int, int, int],
    scale_factor: int,
    *,
    seed: int = PREVIEW_FIT_SEED,
    calls: int = 1,
) -> LatentPreview:
    """The linear map from a latent pixel's C channels to the colour the VAE decodes there, by least squares.

    `decode` maps (N, h, w, C) scaled latents to (N, h·f, w·f, 3) uint8 images; it runs `calls` times on smooth
    random latents of `shape` (from `seed`: the fit is deterministic). Each image is average-pooled f × f down to
    latent resolution, and rgb ≈ W·z + b is solved over every latent pixel: (3, C) weights and 3 biases, rgb in
    [-1, 1]. A linear map cannot show texture the decoder adds, only each region's colour, which is what a
    preview needs.
    """
    n, h, w, c = shape
    f = scale_factor
    rng = np.random.default_rng(seed)
    zs, rgbs = [], []
    for _ in range(calls):
        z = smooth_latents(rng, shape)
        images = np.asarray(decode(z), np.float64)  # (N, H, W, 3) in [0, 255]
        pooled = images.reshape(n, h, f, w, f, 3).mean(axis=(2, 4)) / 127.5 - 1.0  # (N, h, w, 3) in [-1, 1]
        zs.append(z.reshape(-1, c))
        rgbs.append(pooled.reshape(-1, 3))
    z = np.concatenate(zs).astype(np.float64)
    design = np.concatenate([z, np.ones((len(z), 1))], axis=1)  # (M, C + 1): the channels and a constant
    solution, *_ = np.linalg.lstsq(design, np.concatenate(rgbs), rcond=None)  # (C + 1, 3)
    return LatentPreview(weights=solution[:c].T.astype(np.float32), bias=solution[c].astype(np.float32))


def seed_key(seed: int) -> jax.Array:
    """A PRNG key for any seed in [0, 2^64): both 32-bit halves count."""
    return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


def initial_noise(key: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """Gaussian latents (N, h, w, C); drawn as NCHW so a seed means the same noise as a --latents file of it."""
    n, h, w, c = shape
    return jax.random.normal(key, (n, c, h, w), jnp.float32).transpose(0, 2, 3, 1)


# --- Loading ----------------------------------------------------------------------


def load_params(
    files: list[Path],
    shapes: Any,
    *,
    dtype: Any,
    fix_key: Callable[[str], str | None],
    fix_tensor: Callable[[str, np.ndarray], np.ndarray] | None = None,
    source: str,
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
    """Stream tensors from files into a checked Flax params tree, one tensor at a time onto the device
    (or, given a mesh, straight onto its shards: no device ever holds a whole parameter it does not need)."""

    def pairs():
        for key, tensor in checkpoint.read_tensors(files):
            fixed = fix_key(key)
            if fixed is not None:
                yield fixed, (fix_tensor(fixed, tensor) if fix_tensor else tensor)

    place = sharding.place(mesh) if mesh is not None else lambda _path, a: jax.device_put(a)
    return convert(pairs(), shapes, dtype=dtype, place=place, source=source)


def stage_mesh(options: RuntimeOptions) -> jax.sharding.Mesh | None:
    return None if options.mesh is None else sharding.make_mesh(options.mesh)


def _unet_source(
    folder: Path, override: str | None, variant: str | None, allow_pickle: bool
) -> tuple[dict, list[Path], str]:
    """(config, files, label) for the UNet, honouring --unet-checkpoint (a UNet folder or one .safetensors file)."""
    stem = checkpoint.WEIGHT_STEMS["unet"]
    if override is None:
        return (
            checkpoint.read_config(folder, "unet"),
            checkpoint.weight_files(folder / "unet", stem, variant=variant, allow_pickle=allow_pickle),
            checkpoint.component_label(folder, "unet"),
        )
    path = Path(override).expanduser()
    if path.is_dir():
        config = checkpoint.read_config(path.parent, path.name)
        return config, checkpoint.weight_files(path, stem, variant=variant, allow_pickle=allow_pickle), str(path)
    if path.is_file() and path.suffix in (".safetensors", ".bin"):
        if path.suffix == ".bin" and not allow_pickle:
            raise CheckpointError(
                f"{path} is a PyTorch pickle; pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        return checkpoint.read_config(folder, "unet"), [path], str(path)
    raise CheckpointError(
        f"--unet-checkpoint {override}: expected a UNet folder (config.json + weights) or a .safetensors file"
    )


def fix_old_scheduler_config(config: dict[str, Any]) -> dict[str, Any]:
    """What diffusers' StableDiffusionPipeline does to old scheduler configs, so we sample as it samples.

    Its __init__ rewrites `steps_offset` to 1 and `clip_sample` to False (with a deprecation
    warning) for checkpoints saved before those became the SD defaults.
    """
    return {**config, "steps_offset": 1, "clip_sample": False}


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Where a stage's weights come from (the checkpoint folder is resolved once, by `checkpoint.resolve`)."""

    variant: str | None = None
    allow_pickle: bool = False
    unet_checkpoint: str | None = None  # a UNet folder or .safetensors file replacing the checkpoint's UNet
    # Per-request adapters: LoRA files found by stem in `lora_dir`, loaded on first use, at most `max_adapters`
    # on the device (least recently used leave); textual-inversion embeddings from `embeddings_dir`.
    lora_dir: Path | None = None
    max_adapters: int = 8
    embeddings_dir: Path | None = None
    controlnets: tuple[tuple[str, Path], ...] = ()  # (name requests use, diffusers ControlNet folder), the denoiser's

    def files(self, folder: Path, component: str) -> list[Path]:
        stem = checkpoint.WEIGHT_STEMS[component]
        return checkpoint.weight_files(folder / component, stem, variant=self.variant, allow_pickle=self.allow_pickle)


class TextEncoderStage:
    """Prompts → conditioning: the tokenizer and the CLIP text encoder, with A1111's prompt syntax.

    A prompt is encoded as A1111 does (`tokenizer.tokenize_chunks`): each 77-token chunk a row of one device call,
    its tokens' weights applied (`apply_emphasis`), its chunks concatenated along L. Prompts encoded together
    are padded with empty chunks to one L. Since weights now count, "(a cat)" means "a cat" at weight 1.1, as in
    A1111; a prompt without that syntax that fits 75 tokens gets the ids and hidden states diffusers would.
    Textual-inversion embeddings (`embeddings`) stand where prompts name them, per prompt.
    """

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        encoder: te.CLIPTextEncoder,
        params: Any,
        options: RuntimeOptions,
        embeddings: Sequence[LoadedEmbedding] = (),
    ):
        self.tokenizer, self.encoder, self.options = tokenizer, encoder, options
        self.mesh = stage_mesh(options)
        self.params = params if self.mesh is None else sharding.shard_params(params, self.mesh)
        self.programs = Programs(options.precision, self.mesh)
        self._encode = functools.partial(encode_text, encoder)
        self._encode_with_embeddings = functools.partial(encode_text_with_embeddings, encoder)
        self._encode_with_loras = functools.partial(encode_text_with_loras, encoder)
        self.loras: lora_bank.Adapters | None = None  # --lora-dir's LoRAs, applied per prompt
        self.embeddings = list(embeddings)
        self.triggers: list[Trigger] = [tokenizer.trigger(e.name, e.vectors, e.error) for e in self.embeddings]

    @classmethod
    def load(
        cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), load: LoadOptions = LoadOptions()
    ) -> TextEncoderStage:
        config = te.TextEncoderConfig.from_json(checkpoint.read_config(folder, "text_encoder"))
        encoder = te.CLIPTextEncoder(config, dtype=DTYPES[options.activations_dtype], attention_impl=options.attention)
        params = load_params(
            load.files(folder, "text_encoder"),
            te.init_shapes(config),
            dtype=DTYPES[options.weights_dtype],
            fix_key=te.fix_checkpoint_key,
            source=checkpoint.component_label(folder, "text_encoder"),
            mesh=stage_mesh(options),
        )
        tokenizer = load_tokenizer(folder / "tokenizer")
        embeddings = []
        if load.embeddings_dir is not None:
            embeddings = load_embeddings(
                load.embeddings_dir, config.hidden_size, tokenizer.max_length - 2, allow_pickle=load.allow_pickle
            )
        stage = cls(tokenizer, encoder, params, options, embeddings)
        if load.lora_dir is not None:
            stage.use_loras(load.lora_dir, load.max_adapters, allow_pickle=load.allow_pickle)
        return stage

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def use_loras(self, directory: Path | str, max_adapters: int, *, allow_pickle: bool = False) -> None:
        """Apply the text-encoder parts of the LoRA files in `directory` to the prompts of requests that name
        them, at most `max_adapters` on the device at once."""
        self.loras = lora_bank.adapters_for(
            "text_encoder", te.init_shapes(self.encoder.config), directory, max_adapters,
            dtype=DTYPES[self.options.weights_dtype], allow_pickle=allow_pickle,
        )  # fmt: skip

    def lease_loras(self, loras: Sequence[tuple[str, float]]) -> lora_bank.Lease | None:
        """Bank rows for a call's (name, text-encoder weight) LoRAs (None without any); the caller holds the
        lease until its prompts are encoded (`with_loras`)."""
        return lora_bank.required(self.loras, loras, "text encoder").lease(loras) if loras else None

    @staticmethod
    def with_loras(tokens: list[PromptTokens], lease: lora_bank.Lease | None) -> list[PromptTokens]:
        """The prompts, each to be encoded with the lease's LoRA rows."""
        if lease is None or not lease.rows:
            return tokens
        return [dataclasses.replace(t, loras=lease.rows) for t in tokens]

    def tokenize(self, prompts: list[str], *, chunks: int = 0) -> list[PromptTokens]:
        """Each prompt's chunks, all padded to the same count (at least `chunks`) with empty chunks; raises
        InvalidRequest for a prompt naming an embedding that cannot be used."""
        tokens = self.tokenizer.tokenize_chunks(prompts, self.triggers)
        n = max([chunks, *(t.chunks for t in tokens)])
        return [t.padded_to(n, self.tokenizer.empty_chunk) for t in tokens]

    def encode(
        self, prompts: list[str], loras: Sequence[tuple[str, float]] = ()
    ) -> tuple[np.ndarray, list[str], float]:
        """(hidden states (P, L, D) float32 with L a multiple of 77, per prompt the text dropped past the chunk
        limit ("" if none), compile seconds). `loras`: (name, text-encoder weight) applied to every prompt."""
        lease = self.lease_loras(loras)
        tokens = self.with_loras(self.tokenize(prompts), lease)
        rows, compile_s = self.encode_tokens(tokens)
        length = tokens[0].chunks * self.tokenizer.max_length if tokens else self.tokenizer.max_length
        hidden = np.stack(rows) if rows else np.zeros((0, length, self.hidden_size), np.float32)
        return hidden, [t.removed_text for t in tokens], compile_s

    def encode_tokens(
        self, prompts: Sequence[PromptTokens], buckets: Sequence[int] = ()
    ) -> tuple[list[np.ndarray], float]:
        """(per prompt its conditioning (C·77, D) float32, compile seconds): every chunk of every prompt a row.

        Rows run in calls of at most max(buckets) rows, each padded up to the smallest bucket that holds it (no
        buckets: one call at its own size). Prompts with embeddings run in a call of their own program, and
        prompts with LoRAs in one more (embeddings or not: each row carries its own LoRA rows and weights).
        """
        # a batch is padded with copies of its last prompt (batching.join): each prompt object is encoded once
        unique = list({id(p): p for p in prompts}.values())
        hidden: dict[int, np.ndarray] = {}
        compile_s = 0.0
        plain = [p for p in unique if not p.embeddings and not p.loras]
        embedded = [p for p in unique if p.embeddings and not p.loras]
        for group in (plain, embedded, [p for p in unique if p.loras]):
            if not group:
                continue
            out, seconds = self._run_rows(group, buckets)
            compile_s += seconds
            bounds = np.cumsum([0, *(p.chunks for p in group)])
            for p, a, b in zip(group, bounds[:-1], bounds[1:]):
                hidden[id(p)] = out[a:b]
        rows = []
        for p in prompts:
            h = hidden[id(p)]  # (C, 77, D)
            if p.weighted:  # all weights 1: nothing to do, and the plain prompt's numbers stay exact
                h = apply_emphasis(h, p.weights)
            rows.append(h.reshape(-1, h.shape[-1]))
        return rows, compile_s

    def _run_rows(self, group: list[PromptTokens], buckets: Sequence[int]) -> tuple[np.ndarray, float]:
        """The chunks of `group` encoded: (Σ chunks, 77, D) float32."""
        ids = np.concatenate([p.ids for p in group])  # (R, 77)
        with_loras = bool(group[0].loras)
        with_embeddings = with_loras or bool(group[0].embeddings)
        constant: tuple[Any, ...] = ()  # inputs not split by row
        if with_embeddings:
            length, width = ids.shape[1], self.hidden_size
            override = np.zeros((len(ids), length, width), np.float32)
            mask = np.zeros((len(ids), length), bool)
            first = np.cumsum([0, *(p.chunks for p in group)])
            for p, row in zip(group, first):
                for slot in p.embeddings:
                    n = len(slot.vectors)
                    override[row + slot.chunk, slot.offset : slot.offset + n] = slot.vectors
                    mask[row + slot.chunk, slot.offset : slot.offset + n] = True
            inputs: tuple[np.ndarray, ...] = (ids, override, mask)
            name, fn = "encode-embeddings", self._encode_with_embeddings
            if with_loras and self.loras is not None:
                width = lora_bank.bucket(max(len(p.loras) for p in group), lora_bank.ADAPTER_BUCKETS)
                index, weight = lora_bank.slot_columns([p.loras for p in group for _ in range(p.chunks)], width)
                inputs, constant = (*inputs, index, weight), (self.loras.bank.arrays(),)
                name, fn = "encode-lora", self._encode_with_loras
        else:
            inputs, name, fn = (ids,), "encode", self._encode
        step = max(buckets) if buckets else len(ids)
        outs, compile_s = [], 0.0
        for start in range(0, len(ids), step):
            piece = [a[start : start + step] for a in inputs]
            real = len(piece[0])
            size = min((b for b in buckets if b >= real), default=real)
            piece = [np.concatenate([a, np.repeat(a[-1:], size - real, axis=0)]) for a in piece]
            args = [jnp.asarray(a) for a in piece]
            batched = tuple(range(1, len(args) + 1))
            args += constant
            run, seconds = self.programs.get(name, fn, self.params, *args, batched=batched)
            compile_s += seconds
            outs.append(np.asarray(run(self.params, *args), np.float32)[:real])
        return np.concatenate(outs), compile_s


class DenoiserStage:
    """Conditioning + initial noise → final latents: the UNet under any sampler, as a running batch of slots.

    `job_slots(job)` turns a denoiser call into one `denoise.Slot` per image; `new_batch()` gives a
    `denoise.RunningBatch` whose chunks run one compiled program for every sampler, step count,
    guidance value and request mix. `run_slots(...)` runs slots alone, the one-request path.
    """

    def __init__(
        self, unet: un.UNet2DConditionModel, scheduler_json: dict[str, Any], params: Any, options: RuntimeOptions
    ):
        self.unet, self.scheduler_json, self.options = unet, scheduler_json, options
        # the training noise schedule's facts (prediction type, timestep range); samplers build their plans from it
        self.noise_schedule = ddim.DDIMConfig.from_json(scheduler_json)
        self.mesh = stage_mesh(options)
        self.params = params if self.mesh is None else sharding.shard_params(params, self.mesh)
        self.programs = Programs(options.precision, self.mesh)
        self._noise = jax.jit(initial_noise, static_argnums=1)  # the shape is static
        self._keys = jax.jit(_image_keys, static_argnums=1)
        self.low_res_alphas: np.ndarray | None = None  # the x4 upscaler's low-res noise schedule
        self.max_noise_level = 0  # the x4 upscaler's
        self.loras: lora_bank.Adapters | None = None  # --lora-dir's LoRAs, applied per slot
        self.controlnets: dict[str, tuple[cn.ControlNetModel, Any]] = {}  # name → (model, params), per slot

    @property
    def kind(self) -> str:
        """What the UNet's input channels say it is for (contract.KINDS)."""
        c = self.unet.config
        return contract.model_kind(c.in_channels, c.out_channels, c.class_labels_shape is not None)

    @classmethod
    def load(
        cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), load: LoadOptions = LoadOptions()
    ) -> DenoiserStage:
        unet_json, files, label = _unet_source(folder, load.unet_checkpoint, load.variant, load.allow_pickle)
        config = un.UNetConfig.from_json(unet_json)
        unet = un.UNet2DConditionModel(
            config, dtype=DTYPES[options.activations_dtype], attention_impl=options.attention
        )
        params = load_params(
            files,
            un.init_shapes(config),
            dtype=DTYPES[options.weights_dtype],
            fix_key=un.fix_checkpoint_key,
            source=label,
            mesh=stage_mesh(options),
        )
        scheduler_json = fix_old_scheduler_config(checkpoint.read_config(folder, "scheduler", "scheduler_config.json"))
        stage = cls(unet, scheduler_json, params, options)
        if load.lora_dir is not None:
            stage.use_loras(load.lora_dir, load.max_adapters, allow_pickle=load.allow_pickle)
        for name, source in load.controlnets:
            stage.use_controlnet(name, source, allow_pickle=load.allow_pickle)
        if is_upscaler(folder):
            stage.low_res_alphas = conditioning.low_res_alphas_cumprod(
                checkpoint.read_config(folder, "low_res_scheduler", "scheduler_config.json")
            )
            stage.max_noise_level = int(model_index(folder).get("max_noise_level", contract.DEFAULT_MAX_NOISE_LEVEL))
        return stage

    def use_loras(self, directory: Path | str, max_adapters: int, *, allow_pickle: bool = False) -> None:
        """Apply the UNet parts of the LoRA files in `directory` to the requests that name them, at most
        `max_adapters` on the device at once."""
        self.loras = lora_bank.adapters_for(
            "unet", un.init_shapes(self.unet.config), directory, max_adapters,
            dtype=DTYPES[self.options.weights_dtype], allow_pickle=allow_pickle,
        )  # fmt: skip

    def use_controlnet(self, name: str, folder: Path | str, *, allow_pickle: bool = False) -> None:
        """Load a diffusers-format ControlNet (config.json and diffusion_pytorch_model weights) for requests that
        name it; refused, naming both, when it was made for another base model than this UNet."""
        if name in self.controlnets:
            raise CheckpointError(f"two ControlNets are named {name!r}; give each --controlnet its own name")
        folder = Path(folder)
        if not folder.is_dir() and not folder.is_absolute() and str(folder).count("/") == 1:  # a Hub id
            folder = checkpoint.hub_snapshot(str(folder), patterns=["*.json", "*.safetensors"], flag="--controlnet")
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"ControlNet {name!r}: {folder} has no config.json; give a diffusers ControlNet folder (config.json "
                "and diffusion_pytorch_model.safetensors) or its Hub id"
            )
        config = cn.ControlNetConfig.from_json(json.loads((folder / "config.json").read_text()))
        cn.check_matches_unet(config, self.unet.config, f"{name!r} ({folder})")
        files = checkpoint.weight_files(folder, "diffusion_pytorch_model", allow_pickle=allow_pickle)
        params = load_params(
            files, cn.init_shapes(config), dtype=DTYPES[self.options.weights_dtype], fix_key=cn.fix_checkpoint_key,
            source=str(folder), mesh=self.mesh,
        )  # fmt: skip
        model = cn.ControlNetModel(config, dtype=DTYPES[self.options.activations_dtype])
        self.controlnets[name] = (model, params)

    def lease_loras(self, loras: Sequence[tuple[str, float]]) -> lora_bank.Lease | None:
        """Bank rows for a call's (name, UNet weight) LoRAs (None without any)."""
        return lora_bank.required(self.loras, loras, "denoiser").lease(loras) if loras else None

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def max_steps(self) -> int:
        return min(contract.MAX_STEPS, ddim.max_steps(self.noise_schedule))

    @property
    def samplers(self) -> tuple[str, ...]:
        return samplers.SAMPLER_NAMES

    @property
    def default_sampler(self) -> str:
        """The checkpoint's own sampler, named by its scheduler config (as diffusers' pipeline would use it)."""
        return samplers.default_sampler(self.scheduler_json)

    def facts(self, *, vae_scale_factor: int, max_length: int) -> ModelFacts:
        """What requests to this UNet are checked against; the VAE factor and text length come from their configs."""
        c = self.unet.config
        for name, (model, _) in self.controlnets.items():
            if model.config.conditioning_downscale != vae_scale_factor:
                raise CheckpointError(
                    f"ControlNet {name!r} takes maps at {model.config.conditioning_downscale}× the latents but this "
                    f"checkpoint's VAE scales by {vae_scale_factor}: it was made for another base model"
                )
        sample = c.sample_size
        size = None if sample is None else ((sample, sample) if isinstance(sample, int) else tuple(sample))
        return ModelFacts(
            kind=self.kind,
            vae_scale_factor=vae_scale_factor,
            latent_channels=self.latent_channels,
            default_size=None if size is None else (size[0] * vae_scale_factor, size[1] * vae_scale_factor),
            max_steps=self.max_steps,
            samplers=self.samplers,
            default_sampler=self.default_sampler,
            hidden_size=c.context_dim,
            max_length=max_length,
            prediction_type=self.noise_schedule.prediction_type,
            extra_channels=c.in_channels - self.latent_channels,
            class_labels_shape=c.class_labels_shape,
            max_noise_level=self.max_noise_level,
            controlnets=tuple(self.controlnets),
        )

    def noise(self, seed: int, shape: tuple[int, int, int, int]) -> jax.Array:
        """Initial latents (N, h, w, C) for a seed: unit Gaussian, before any sampler's init_noise_sigma."""
        return self._noise(seed_key(seed), shape)

    def plan(self, steps: int, *, sampler: str | None = None, eta: float = 0.0, first: int = 0) -> table.Plan:
        """The coefficient table of one image's run (see samplers.table)."""
        sampler = sampler or self.default_sampler
        if sampler not in samplers.SAMPLER_NAMES:
            raise InvalidRequest(f"sampler {sampler!r} is not one of {', '.join(samplers.SAMPLER_NAMES)}")
        try:
            return samplers.make_plan(sampler, self.scheduler_json, steps, eta=eta, first=first)
        except ValueError as e:  # e.g. a prediction type this sampler cannot use, or too many steps for it
            raise InvalidRequest(f"sampler {sampler}: {e}") from None

    def check(self, job: DenoiseJob, facts: ModelFacts) -> None:
        """Refuse a call before it joins a batch: the contract's checks, then the sampler's plan for it."""
        contract.check_denoise_job(job, facts)
        if job.loras:
            lora_bank.required(self.loras, job.loras, "denoiser").check([name for name, _ in job.loras])
        self.check_plan(job.steps, sampler=job.sampler, eta=job.eta,
                        strength=None if job.init_latents is None else job.strength)  # fmt: skip

    def check_plan(self, steps: int, *, sampler: str | None, eta: float, strength: float | None) -> None:
        """The sampler can run this many steps from this start (None: from pure noise) on this checkpoint."""
        first = 0 if strength is None else conditioning.img2img_start(steps, strength)[0]
        self.plan(steps, sampler=sampler, eta=eta, first=first)

    def job_slots(
        self, job: DenoiseJob, facts: ModelFacts, *, owner: Any = None, low_res_noise: np.ndarray | None = None
    ) -> list[dn.Slot]:
        """One slot per image of a checked call: the initial noise drawn from its seed unless given, and the
        x4 upscaler's low-res image noised to its level (from the seed, or `low_res_noise`)."""
        noise = job.latents
        if noise is None:
            f = facts.vae_scale_factor
            noise = self.noise(job.seed, (job.images, job.height // f, job.width // f, self.latent_channels))
        extra = job.extra
        if self.kind == "upscaling":  # extra is the clean low-res image: noise it to its level, as the pipeline does
            level = int(job.class_labels.reshape(-1)[0])
            extra = modes.noise_low_res(extra, level, job.seed, self.low_res_alphas, low_res_noise)
        return self.slots(
            noise,
            job.cond,
            job.uncond,
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            guidance_rescale=job.guidance_rescale,
            guidance_cutoff=job.guidance_cutoff,
            eta=job.eta,
            seed=job.seed,
            sampler=job.sampler,
            owner=owner,
            init_latents=job.init_latents,
            strength=job.strength,
            extra=extra,
            class_labels=job.class_labels,
            blend_mask=job.blend_mask,
            lease=self.lease_loras(job.loras),
            controls=job.controls,
        )

    def slots(
        self,
        noise: Any,
        cond: Any,
        uncond: Any | None,
        *,
        steps: int,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        guidance_cutoff: float = 1.0,
        eta: float = 0.0,
        seed: int = 0,
        sampler: str | None = None,
        owner: Any = None,
        init_latents: Any | None = None,
        strength: float = 1.0,
        extra: Any | None = None,
        class_labels: Any | None = None,
        blend_mask: Any | None = None,
        lease: lora_bank.Lease | None = None,
        controls: Sequence[contract.ControlInput] = (),
    ) -> list[dn.Slot]:
        """One slot per image. `noise` (N, h, w, C) is unit Gaussian (`noise()` or given latents); each image's
        η/ancestral noise comes from its own stream of `seed`, so batching never changes it.

        Image-conditioned runs (all (N, h, w, ·) NHWC): `init_latents` start the run part-way, at `strength`
        (StableDiffusionImg2ImgPipeline's get_timesteps; inpainting at strength 1 starts from pure noise, as the
        inpainting pipeline does); `extra` channels join the UNet input; `class_labels` feed a class embedding;
        `blend_mask` (1 repaints) blends towards the noised `init_latents` after every step. `lease`: the
        LoRA bank rows every image applies (`lease_loras`); the slots hold it while they exist. `controls`: the
        ControlNets every image applies (their images one row, or one per image). `guidance_cutoff`: the
        fraction of the slot's rows that are guided (the first ⌈cutoff · rows⌉).
        """
        noise, cond = np.asarray(noise, np.float32), np.asarray(cond, np.float32)
        uncond = None if uncond is None else np.asarray(uncond, np.float32)
        first = 0
        if init_latents is not None:
            if not 0.0 < strength <= 1.0:
                raise InvalidRequest(f"strength must be in (0, 1], got {strength}")
            first, _ = conditioning.img2img_start(steps, strength)  # diffusers' get_timesteps
            init_latents = np.asarray(init_latents, np.float32)
        plan = self.plan(steps, sampler=sampler, eta=eta, first=first)
        pure_noise = init_latents is None or modes.starts_from_pure_noise(self.kind, blend_mask, strength)
        keys = np.asarray(self._keys(seed_key(seed), noise.shape[0]))

        def start(k: int) -> np.ndarray:
            if pure_noise:
                return plan.init_noise_sigma * noise[k]
            return plan.start_lat * init_latents[k] + plan.start_noise * noise[k]

        def row(a: Any | None, k: int) -> np.ndarray | None:
            return None if a is None else np.asarray(a[k], np.float32)

        steps_run = min(steps - first, plan.evaluations)

        def slot_controls(k: int) -> tuple[dn.SlotControl, ...]:
            def image(c: contract.ControlInput) -> np.ndarray:
                return np.asarray(c.image[k if len(c.image) > 1 else 0], np.float32)

            return tuple(
                dn.SlotControl(c.name, image(c), float(c.scale), float(c.start), float(c.end), bool(c.guess_mode))
                for c in controls
            )

        return [
            dn.Slot(
                plan=plan,
                x=start(k),
                cond=cond[k],
                uncond=None if uncond is None else uncond[k],
                guidance=float(guidance_scale),
                rescale=float(guidance_rescale),
                guided_rows=dn.guided_rows(plan.evaluations, guidance_cutoff),
                key=keys[k],
                owner=owner,
                extra=row(extra, k),
                class_label=row(class_labels, k),
                blend=None if blend_mask is None else (row(blend_mask, k), init_latents[k], noise[k]),
                steps=steps_run,
                loras=() if lease is None else lease.rows,
                lease=lease,
                controls=slot_controls(k),
            )
            for k in range(noise.shape[0])
        ]

    def new_batch(self, buckets: Sequence[int]) -> dn.RunningBatch:
        """An empty running batch compiled at these batch sizes (a batch of n slots runs at the smallest ≥ n)."""
        return dn.RunningBatch(self._run_chunk, self.unet.config.class_labels_shape, buckets)

    def _run_chunk(
        self,
        with_uncond: bool,
        controls: tuple[str, ...],
        inputs: dn.SlotInputs,
        state: table.SlotState,
        cursor: dn.Cursor,
        iterations: int,
    ) -> tuple[table.SlotState, dn.Cursor, float]:
        models = tuple(self.controlnets[name][0] for name in controls)
        fn = functools.partial(dn.denoise_chunk, self.unet, with_uncond, controlnets=models)
        name = "denoise" if with_uncond else "denoise-unguided"
        n = jnp.int32(iterations)
        params = self.params
        if controls:  # the entries' ControlNets join the fixed params (dn.denoise_chunk)
            name = f"{name}-control-{'+'.join(controls)}"
            params = (self.params, tuple(self.controlnets[c][1] for c in controls))
        args: tuple[Any, ...] = (params, inputs, state, cursor, n)
        if inputs.lora_index.shape[1] and self.loras is not None:  # some slot has LoRAs: the bank is an input
            name, args = f"{name}-lora", (*args, self.loras.bank.arrays())
        program, compile_s = self.programs.get(name, fn, *args, batched=(1, 2, 3))
        state, cursor = program(*args)
        jax.block_until_ready(state)
        return state, cursor, compile_s

    def run(
        self, latents: Any, cond: Any, uncond: Any | None, *, chunk: int | None = None, **options: Any
    ) -> Iterator[tuple[int, np.ndarray | None, float]]:
        """`run_slots` over `slots(latents, cond, uncond, **options)`: one request's arrays alone."""
        return self.run_slots(self.slots(latents, cond, uncond, **options), chunk=chunk)

    def run_slots(
        self,
        slots: list[dn.Slot],
        *,
        chunk: int | None = None,
        preview_every: int = 0,
        preview: Callable[[int, np.ndarray], None] | None = None,
    ) -> Iterator[tuple[int, np.ndarray | None, float]]:
        """Slots alone: yield (steps done, latents, compile seconds) after each chunk of `chunk` steps.

        Latents (N, h, w, C) come with the last chunk (None before). A caller that stops
        iterating stops the work at the next chunk boundary. With `preview_every` k > 0, after a chunk
        that passed a multiple of k steps (not the last: `contract.preview_due`), `preview(steps done, x̂₀)`
        gets the first image's current estimate of the clean latents (h, w, C), before that chunk's yield.
        """
        plan = slots[0].plan
        batch = self.new_batch([len(slots)])
        batch.join(slots)
        chunk = chunk or plan.evaluations
        while not slots[0].done:
            before = slots[0].steps_done
            compile_s = batch.run_chunk(min(chunk, plan.evaluations - slots[0].step))
            if slots[0].done:
                finished = batch.leave(lambda s: False)
                yield slots[0].steps, np.stack([x for _, x in finished]), compile_s
            else:
                done = slots[0].steps_done
                state = batch.device_state
                if preview and state is not None and contract.preview_due(before, done, slots[0].steps, preview_every):
                    preview(done, np.asarray(state.x0_history[0, 0]))  # table.SlotState: most recent x̂₀ first
                yield done, None, compile_s


def _image_keys(key: jax.Array, n: int) -> jax.Array:
    """Key data of each image's own noise stream (η, ancestral samplers), apart from its initial noise."""
    stream = jax.random.fold_in(key, 1)
    return jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(stream, k)))(jnp.arange(n))


class DecoderStage:
    """Latents → uint8 images: the VAE decoder (its encoder is here too, for img2img)."""

    def __init__(self, vae: va.AutoencoderKL, params: Any, options: RuntimeOptions):
        self.vae, self.options = vae, options
        self.mesh = stage_mesh(options)
        self.params = params if self.mesh is None else sharding.shard_params(params, self.mesh)
        self.programs = Programs(options.precision, self.mesh)
        self._decode = functools.partial(decode, vae)
        self._encode_image = functools.partial(va.encode_image, vae)
        # the latent size (h, w) the preview map is fitted at: the UNet's native one when `load` finds it
        self.preview_size: tuple[int, int] | None = None
        self._latent_preview: LatentPreview | None = None
        self._preview_lock = threading.Lock()

    @classmethod
    def load(
        cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), load: LoadOptions = LoadOptions()
    ) -> DecoderStage:
        vae_json = checkpoint.read_config(folder, "vae")
        if is_upscaler(folder):
            vae_json = conditioning.fix_upscaler_vae_config(vae_json)  # as StableDiffusionUpscalePipeline.__init__ does
        config = va.VAEConfig.from_json(vae_json)
        vae = va.AutoencoderKL(config, dtype=DTYPES[options.activations_dtype], attention_impl=options.attention)
        params = load_params(
            load.files(folder, "vae"),
            va.init_shapes(config),
            dtype=DTYPES[options.weights_dtype],
            fix_key=va.fix_checkpoint_key,
            fix_tensor=va.fix_checkpoint_tensor,
            source=checkpoint.component_label(folder, "vae"),
            mesh=stage_mesh(options),
        )
        stage = cls(vae, params, options)
        try:
            sample = checkpoint.read_config(folder, "unet").get("sample_size")
        except CheckpointError:  # a folder without a UNet: previews are fitted at PREVIEW_FIT_SIZE
            sample = None
        if sample is not None:
            stage.preview_size = (sample, sample) if isinstance(sample, int) else (int(sample[0]), int(sample[1]))
        return stage

    @property
    def scale_factor(self) -> int:
        return self.vae.config.scale_factor

    def decode(self, latents: jax.Array) -> tuple[np.ndarray, float]:
        """((N, H, W, 3) uint8 images, compile seconds)."""
        program, compile_s = self.programs.get("decode", self._decode, self.params, latents, batched=(1,))
        return np.asarray(program(self.params, latents)), compile_s

    def latent_preview(self) -> LatentPreview:
        """The latent → RGB map of live previews, fitted on first use and kept (`fit_latent_preview`).

        It decodes batch 1 at the UNet's native latent size (`preview_size`: the shape a default warm-up compiles
        anyway, so no extra compile), enough times to see PREVIEW_FIT_PIXELS latent pixels (at most
        PREVIEW_FIT_CALLS), from a fixed seed: the same map in every process that loads this checkpoint.
        """
        with self._preview_lock:
            if self._latent_preview is None:
                t0 = time.perf_counter()
                h, w = self.preview_size or PREVIEW_FIT_SIZE
                calls = min(PREVIEW_FIT_CALLS, math.ceil(PREVIEW_FIT_PIXELS / (h * w)))
                shape = (1, h, w, self.vae.config.latent_channels)
                self._latent_preview = fit_latent_preview(
                    lambda z: self.decode(jnp.asarray(z))[0], shape, self.scale_factor, calls=calls
                )
                log.info("fitted the preview map in %.2fs (%d decodes at %dx%d latents)",
                         time.perf_counter() - t0, calls, h, w)  # fmt: skip
        return self._latent_preview

    def encode_image(
        self, images: Any, *, seed: int | None = None, stream: int = 0, noise: Any | None = None
    ) -> tuple[np.ndarray, float]:
        """Images (N, H, W, 3) float32 in [-1, 1] → (scaled latents (N, h, w, C), compile seconds).

        The posterior sample's noise comes from `stream` of `seed` (None: the posterior mean), or is given.
        """
        images = jnp.asarray(images, jnp.float32)
        if noise is None and seed is not None:
            f, c = self.scale_factor, self.vae.config.latent_channels
            shape = (images.shape[0], images.shape[1] // f, images.shape[2] // f, c)
            noise = jax.random.normal(
                jax.random.fold_in(jax.random.fold_in(seed_key(seed), 3), stream), shape, jnp.float32
            )
        args = (self.params, images) if noise is None else (self.params, images, jnp.asarray(noise, jnp.float32))
        program, compile_s = self.programs.get(
            "encode-image", self._encode_image, *args, batched=tuple(range(1, len(args)))
        )
        return np.asarray(program(*args)), compile_s


def model_index(folder: Path) -> dict[str, Any]:
    """The checkpoint's model_index.json ({} for a folder without one, e.g. a UNet on its own)."""
    path = Path(folder) / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_upscaler(folder: Path) -> bool:
    return model_index(folder).get("_class_name") == "StableDiffusionUpscalePipeline"


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled programs across processes (a second start skips XLA compilation)."""
    Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
