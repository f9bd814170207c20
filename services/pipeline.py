"""Stable Diffusion text-to-image: three stages, each a pure function of (params, inputs).

    encode_text(params, ids)                       → conditioning (B, 77, D)
    denoise.denoise_chunk(params, slots, …)        → latents, a lax.fori_loop over a running batch of slots
    decode(params, latents)                        → uint8 images (B, H, W, 3)

`StableDiffusion` loads a checkpoint, jits each stage once per shape and chains
them in one process; the stage services host the same functions. Arrays inside
are NHWC (JAX's native layout); the public `latents` argument is NCHW like
diffusers', converted at the boundary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdmesh.services import checkpoint, conditioning, modes, samplers, sharding
from sdmesh.services import denoise as dn
from sdmesh.services.errors import InvalidRequest
from sdmesh.services.models import text_encoder as te
from sdmesh.services.models import unet as un
from sdmesh.services.models import vae as va
from sdmesh.services.models.attention import IMPLEMENTATIONS
from sdmesh.services.samplers import ddim, table
from sdmesh.services.tokenizer import PromptTokenizer, load_tokenizer
from sdmesh.services.weights import CheckpointError, convert

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = ("default", "high", "highest")
MAX_STEPS = dn.MAX_STEPS
MAX_IMAGES = 64


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


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    num_images: int = 1  # per prompt
    steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0
    height: int | None = None  # None: the model's native size (unet sample_size × VAE factor)
    width: int | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    latents: np.ndarray | None = None  # initial noise, NCHW float32 (N, C, H/f, W/f), as diffusers' `latents`
    sampler: str | None = None  # None: the checkpoint's own (its scheduler config), else one of samplers.SAMPLER_NAMES
    # Image-conditioned generation (services/modes.py says which checkpoint takes what):
    init_image: np.ndarray | None = None  # (H, W, 3) uint8 RGB: img2img, inpainting, depth; the x4 upscaler's low-res image
    mask_image: np.ndarray | None = None  # (H, W) uint8: inpainting, white repaints
    strength: float | None = None  # with init_image: (0, 1]; None: 0.8 (img2img, depth) or 1 (inpainting)
    depth_map: np.ndarray | None = None  # (H, W) float: depth checkpoints
    noise_level: int | None = None  # x4 upscaler: None → 20


@dataclasses.dataclass
class GenerationResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    seed: int | None
    truncated: list[str]  # per prompt that was cut at the tokenizer's limit, the part that was dropped
    timings: dict[str, float]  # seconds: compile, encode, denoise, decode, total


# --- Stages: pure functions of (params, inputs) ----------------------------------


def encode_text(encoder: te.CLIPTextEncoder, params: Any, ids: jax.Array) -> jax.Array:
    """Token ids (B, L) → last hidden state after the final layer norm (B, L, D): the SD conditioning."""
    return encoder.apply({"params": params}, ids)


def decode(vae: va.AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) → uint8 images (B, H, W, 3), rounded as diffusers' postprocess does."""
    images = vae.apply({"params": params}, va.unscale_latents(latents, vae.config).astype(vae.dtype), method=va.AutoencoderKL.decode)
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(images * 255).astype(jnp.uint8)


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


def _unet_source(folder: Path, override: str | None, variant: str | None, allow_pickle: bool) -> tuple[dict, list[Path], str]:
    """(config, files, label) for the UNet, honouring --unet-checkpoint (a UNet folder or one .safetensors file)."""
    stem = checkpoint.WEIGHT_STEMS["unet"]
    if override is None:
        return checkpoint.read_config(folder, "unet"), checkpoint.weight_files(folder / "unet", stem, variant=variant, allow_pickle=allow_pickle), f"{folder}/unet"
    path = Path(override).expanduser()
    if path.is_dir():
        config = checkpoint.read_config(path.parent, path.name)
        return config, checkpoint.weight_files(path, stem, variant=variant, allow_pickle=allow_pickle), str(path)
    if path.is_file() and path.suffix in (".safetensors", ".bin"):
        if path.suffix == ".bin" and not allow_pickle:
            raise CheckpointError(f"{path} is a PyTorch pickle; pass --allow-pickle to load it with torch.load(weights_only=True)")
        return checkpoint.read_config(folder, "unet"), [path], str(path)
    raise CheckpointError(f"--unet-checkpoint {override}: expected a UNet folder (config.json + weights) or a .safetensors file")


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

    def files(self, folder: Path, component: str) -> list[Path]:
        stem = checkpoint.WEIGHT_STEMS[component]
        return checkpoint.weight_files(folder / component, stem, variant=self.variant, allow_pickle=self.allow_pickle)


class Programs:
    """AOT-compiled programs, one per (name, input shapes): the unit a stage runs and times.

    Given a mesh, each program is one SPMD program over it: the params keep the shardings they
    were placed with, the `batched` arguments are split by batch on `data`, the rest replicated,
    and every output is split by batch.
    """

    def __init__(self, precision: str, mesh: jax.sharding.Mesh | None = None):
        self.precision, self.mesh = precision, mesh
        self._compiled: dict[tuple, Any] = {}
        # On a mesh over several processes, process 0 sets this to its `distributed.Leader`, which sends each
        # compile and call to the other processes first: an SPMD program runs only when every process runs it.
        self.lockstep: Any = None

    def get(self, name: str, fn: Callable, *args: Any, batched: tuple[int, ...] = ()) -> tuple[Callable, float]:
        """(compiled `fn` for these shapes, seconds spent compiling it now: 0 when it was already compiled)."""
        # args[0] is the params, fixed for the stage's life: the other inputs' shapes are the key
        rest = args[1:]
        key = (name, jax.tree_util.tree_structure(rest)) + tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(rest))
        compile_s = 0.0
        if key not in self._compiled:
            t0 = time.perf_counter()
            shardings = None if self.mesh is None else self._shardings(fn, args, batched)
            if self.lockstep is not None:  # the other processes compile it meanwhile
                self.lockstep.compile(name, fn, batched, args)
            with jax.default_matmul_precision(self.precision):  # read while tracing
                if shardings is None:
                    lowered = jax.jit(fn).lower(*args)
                else:
                    in_shardings, out_shardings = shardings
                    if self.mesh.is_multi_process:  # see services/distributed.py
                        from sdmesh.services import distributed

                        # no process holds the others' inputs, and process 0 needs every output whole
                        out_shardings, placed = sharding.replicated(self.mesh), distributed.abstract(args, in_shardings)
                    else:
                        placed = jax.device_put(args, in_shardings)
                    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)
                    lowered = jitted.lower(*placed)
                self._compiled[key] = (lowered.compile(), shardings)
            compile_s = time.perf_counter() - t0
        program, shardings = self._compiled[key]
        if shardings is None:
            return program, compile_s
        if self.mesh.is_multi_process:
            from sdmesh.services import distributed

            return distributed.program_call(program, shardings[0], self.lockstep, name, fn, batched), compile_s
        # inputs arrive on one device or split another way (another stage's output): move them onto the program's shardings
        return lambda *a: program(*jax.device_put(a, shardings[0])), compile_s

    def _shardings(self, fn: Callable, args: tuple, batched: tuple[int, ...]) -> tuple[tuple, Any]:
        """(in_shardings, out_shardings) on the mesh."""
        mesh = self.mesh
        params = jax.tree_util.tree_map(lambda a: a.sharding, args[0])
        rest = tuple(
            jax.tree_util.tree_map(lambda a: sharding.batch_sharding(mesh, a.shape) if i in batched else sharding.replicated(mesh), arg)
            for i, arg in enumerate(args[1:], start=1)
        )
        # every output is split by batch (the stages return per-sample arrays only)
        out = jax.eval_shape(fn, *args)
        return (params, *rest), jax.tree_util.tree_map(lambda a: sharding.batch_sharding(mesh, a.shape), out)

    @property
    def shapes(self) -> list[tuple]:
        return list(self._compiled)


class TextEncoderStage:
    """Prompts → conditioning: the tokenizer and the CLIP text encoder."""

    def __init__(self, tokenizer: PromptTokenizer, encoder: te.CLIPTextEncoder, params: Any, options: RuntimeOptions):
        self.tokenizer, self.encoder, self.options = tokenizer, encoder, options
        self.mesh = stage_mesh(options)
        self.params = params if self.mesh is None else sharding.shard_params(params, self.mesh)
        self.programs = Programs(options.precision, self.mesh)
        self._encode = functools.partial(encode_text, encoder)

    @classmethod
    def load(cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), load: LoadOptions = LoadOptions()) -> "TextEncoderStage":
        config = te.TextEncoderConfig.from_json(checkpoint.read_config(folder, "text_encoder"))
        encoder = te.CLIPTextEncoder(config, dtype=DTYPES[options.activations_dtype], attention_impl=options.attention)
        params = load_params(load.files(folder, "text_encoder"), te.init_shapes(config), dtype=DTYPES[options.weights_dtype],
                             fix_key=te.fix_checkpoint_key, source=f"{folder}/text_encoder", mesh=stage_mesh(options))
        return cls(load_tokenizer(folder / "tokenizer"), encoder, params, options)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def encode(self, prompts: list[str]) -> tuple[jax.Array, list[str], float]:
        """(hidden states (P, L, D), per prompt the text truncation dropped ("" if none), compile seconds)."""
        tokens = self.tokenizer.tokenize(prompts)
        ids = jnp.asarray(tokens.input_ids, jnp.int32)
        run, compile_s = self.programs.get("encode", self._encode, self.params, ids, batched=(1,))
        return run(self.params, ids), list(tokens.removed_text), compile_s


class DenoiserStage:
    """Conditioning + initial noise → final latents: the UNet under any sampler, as a running batch of slots.

    `slots(...)` turns a request into one `denoise.Slot` per image; `new_batch()` gives a
    `denoise.RunningBatch` whose chunks run one compiled program for every sampler, step
    count, guidance value and request mix. `run(...)` is the one-request path on top.
    """

    def __init__(self, unet: un.UNet2DConditionModel, scheduler_json: dict[str, Any], params: Any, options: RuntimeOptions):
        self.unet, self.scheduler_json, self.options = unet, scheduler_json, options
        self.scheduler = ddim.DDIMConfig.from_json(scheduler_json)  # the training schedule's facts (prediction type, range)
        self.mesh = stage_mesh(options)
        self.params = params if self.mesh is None else sharding.shard_params(params, self.mesh)
        self.programs = Programs(options.precision, self.mesh)
        self._noise = jax.jit(initial_noise, static_argnums=1)  # the shape is static
        self._keys = jax.jit(_image_keys, static_argnums=1)
        self.low_res_alphas: np.ndarray | None = None  # the x4 upscaler's low-res noise schedule
        self.max_noise_level = conditioning.DEFAULT_MAX_NOISE_LEVEL

    @property
    def kind(self) -> str:
        """text | inpaint | depth | upscale: what the UNet's input channels say it is for (services/modes.py)."""
        c = self.unet.config
        return modes.model_kind(c.in_channels, c.out_channels, c.class_labels_shape is not None)

    @classmethod
    def load(cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), load: LoadOptions = LoadOptions()) -> "DenoiserStage":
        unet_json, files, label = _unet_source(folder, load.unet_checkpoint, load.variant, load.allow_pickle)
        config = un.UNetConfig.from_json(unet_json)
        unet = un.UNet2DConditionModel(config, dtype=DTYPES[options.activations_dtype], attention_impl=options.attention)
        params = load_params(files, un.init_shapes(config), dtype=DTYPES[options.weights_dtype],
                             fix_key=un.fix_checkpoint_key, source=label, mesh=stage_mesh(options))
        scheduler_json = fix_old_scheduler_config(checkpoint.read_config(folder, "scheduler", "scheduler_config.json"))
        stage = cls(unet, scheduler_json, params, options)
        if is_upscaler(folder):
            stage.low_res_alphas = conditioning.low_res_alphas_cumprod(
                checkpoint.read_config(folder, "low_res_scheduler", "scheduler_config.json"))
            stage.max_noise_level = conditioning.max_noise_level(model_index(folder))
        return stage

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def max_steps(self) -> int:
        return min(MAX_STEPS, ddim.max_steps(self.scheduler))

    @property
    def samplers(self) -> tuple[str, ...]:
        return samplers.SAMPLER_NAMES

    @property
    def default_sampler(self) -> str:
        """The checkpoint's own sampler, named by its scheduler config (as diffusers' pipeline would use it)."""
        return samplers.default_sampler(self.scheduler_json)

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

    def slots(
        self,
        noise: Any,
        cond: Any,
        uncond: Any | None,
        *,
        steps: int,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        seed: int = 0,
        sampler: str | None = None,
        owner: Any = None,
        init_latents: Any | None = None,
        strength: float = 1.0,
        noise_at_full_strength: bool = False,
        extra: Any | None = None,
        class_labels: Any | None = None,
        blend_mask: Any | None = None,
    ) -> list[dn.Slot]:
        """One slot per image. `noise` (N, h, w, C) is unit Gaussian (`noise()` or given latents); each image's
        η/ancestral noise comes from its own stream of `seed`, so batching never changes it.

        Image-conditioned runs (all (N, h, w, ·) NHWC): `init_latents` start the run part-way, at `strength`
        (StableDiffusionImg2ImgPipeline's get_timesteps; with `noise_at_full_strength`, strength 1 starts from
        pure noise as the inpainting pipeline does); `extra` channels join the UNet input; `class_labels` feed a
        class embedding; `blend_mask` (1 repaints) blends towards the noised `init_latents` after every step.
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
        pure_noise = init_latents is None or (noise_at_full_strength and strength >= 1.0)
        keys = np.asarray(self._keys(seed_key(seed), noise.shape[0]))

        def start(k: int) -> np.ndarray:
            if pure_noise:
                return plan.init_noise_sigma * noise[k]
            return plan.start_lat * init_latents[k] + plan.start_noise * noise[k]

        def row(a: Any | None, k: int) -> np.ndarray | None:
            return None if a is None else np.asarray(a[k], np.float32)

        return [
            dn.Slot(plan=plan, x=start(k), cond=cond[k], uncond=None if uncond is None else uncond[k],
                    guidance=float(guidance_scale), rescale=float(guidance_rescale), key=keys[k], owner=owner,
                    extra=row(extra, k), class_label=row(class_labels, k),
                    blend=None if blend_mask is None else (row(blend_mask, k), init_latents[k], noise[k]))
            for k in range(noise.shape[0])
        ]

    def new_batch(self, buckets: Sequence[int]) -> dn.RunningBatch:
        """An empty running batch compiled at these batch sizes (a batch of n slots runs at the smallest ≥ n)."""
        return dn.RunningBatch(self._run_chunk, self.unet.config.class_labels_shape, buckets)

    def _run_chunk(self, with_uncond: bool, inputs: dn.SlotInputs, state: table.SlotState, cursor: dn.Cursor,
                   iterations: int) -> tuple[table.SlotState, dn.Cursor, float]:
        fn = functools.partial(dn.denoise_chunk, self.unet, with_uncond)
        name = "denoise" if with_uncond else "denoise-unguided"
        n = jnp.int32(iterations)
        program, compile_s = self.programs.get(name, fn, self.params, inputs, state, cursor, n, batched=(1, 2, 3))
        state, cursor = program(self.params, inputs, state, cursor, n)
        jax.block_until_ready(state)
        return state, cursor, compile_s

    def run(
        self,
        latents: jax.Array,
        cond: jax.Array,
        uncond: jax.Array | None,
        *,
        steps: int,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        seed: int = 0,
        sampler: str | None = None,
        chunk: int | None = None,
        **image_inputs: Any,
    ) -> Iterator[tuple[int, jax.Array | None, float]]:
        """One request alone: yield (steps done, latents, compile seconds) after each chunk of `chunk` steps.

        Latents (N, h, w, C) come with the last chunk (None before). A caller that stops
        iterating stops the work at the next chunk boundary. `image_inputs`: the image-conditioned
        keywords of `slots` (init_latents, strength, extra, class_labels, blend_mask, …).
        """
        slots = self.slots(latents, cond, uncond, steps=steps, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, eta=eta, seed=seed, sampler=sampler, **image_inputs)
        steps = min(steps, slots[0].plan.evaluations)  # img2img runs fewer; PLMS evaluates once more
        batch = self.new_batch([len(slots)])
        batch.join(slots)
        evaluations = slots[0].plan.evaluations
        chunk = chunk or evaluations
        while not slots[0].done:
            compile_s = batch.run_chunk(min(chunk, evaluations - slots[0].step))
            done = round(slots[0].step * steps / evaluations)  # PLMS evaluates steps + 1 times
            if slots[0].done:
                finished = batch.leave(lambda s: False)
                yield steps, jnp.asarray(np.stack([x for _, x in finished])), compile_s
            else:
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

    @classmethod
    def load(cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), load: LoadOptions = LoadOptions()) -> "DecoderStage":
        vae_json = checkpoint.read_config(folder, "vae")
        if is_upscaler(folder):
            vae_json = conditioning.fix_upscaler_vae_config(vae_json)  # as StableDiffusionUpscalePipeline.__init__ does
        config = va.VAEConfig.from_json(vae_json)
        vae = va.AutoencoderKL(config, dtype=DTYPES[options.activations_dtype], attention_impl=options.attention)
        params = load_params(load.files(folder, "vae"), va.init_shapes(config), dtype=DTYPES[options.weights_dtype],
                             fix_key=va.fix_checkpoint_key, fix_tensor=va.fix_checkpoint_tensor, source=f"{folder}/vae",
                             mesh=stage_mesh(options))
        return cls(vae, params, options)

    @property
    def scale_factor(self) -> int:
        return self.vae.config.scale_factor

    def decode(self, latents: jax.Array) -> tuple[np.ndarray, float]:
        """((N, H, W, 3) uint8 images, compile seconds)."""
        program, compile_s = self.programs.get("decode", self._decode, self.params, latents, batched=(1,))
        return np.asarray(program(self.params, latents)), compile_s

    def encode_image(self, images: Any, *, seed: int | None = None, stream: int = 0,
                     noise: Any | None = None) -> tuple[np.ndarray, float]:
        """Images (N, H, W, 3) float32 in [-1, 1] → (scaled latents (N, h, w, C), compile seconds).

        The posterior sample's noise comes from `stream` of `seed` (None: the posterior mean), or is given.
        """
        images = jnp.asarray(images, jnp.float32)
        if noise is None and seed is not None:
            f, c = self.scale_factor, self.vae.config.latent_channels
            shape = (images.shape[0], images.shape[1] // f, images.shape[2] // f, c)
            noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(seed_key(seed), 3), stream), shape, jnp.float32)
        args = (self.params, images) if noise is None else (self.params, images, jnp.asarray(noise, jnp.float32))
        program, compile_s = self.programs.get("encode-image", self._encode_image, *args, batched=tuple(range(1, len(args))))
        return np.asarray(program(*args)), compile_s


class StableDiffusion:
    """The three stages in one process, chained by passing device arrays."""

    def __init__(self, text_encoder: TextEncoderStage, denoiser: DenoiserStage, decoder: DecoderStage):
        if text_encoder.hidden_size != denoiser.unet.config.context_dim:
            raise CheckpointError(
                f"the text encoder's hidden_size ({text_encoder.hidden_size}) differs from the UNet's cross_attention_dim "
                f"({denoiser.unet.config.context_dim}); the UNet does not belong with this text encoder"
            )
        self.text_encoder, self.denoiser, self.decoder = text_encoder, denoiser, decoder

    @classmethod
    def load(
        cls,
        model: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        unet_checkpoint: str | None = None,
        allow_pickle: bool = False,
        options: RuntimeOptions = RuntimeOptions(),
    ) -> "StableDiffusion":
        if options.jax_cache_dir:
            enable_compilation_cache(options.jax_cache_dir)
        folder = checkpoint.resolve(model, revision=revision, variant=variant)
        load = LoadOptions(variant=variant, allow_pickle=allow_pickle, unet_checkpoint=unet_checkpoint)
        return cls(TextEncoderStage.load(folder, options, load), DenoiserStage.load(folder, options, load),
                   DecoderStage.load(folder, options, load))

    # -- facts about the model --

    @property
    def unet(self) -> un.UNet2DConditionModel:
        return self.denoiser.unet

    @property
    def vae_scale_factor(self) -> int:
        return self.decoder.scale_factor

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (the UNet follows its skips' sizes, as diffusers' does)."""
        return self.vae_scale_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) from the UNet's sample_size, as diffusers' pipeline defaults them."""
        sample = self.unet.config.sample_size
        if sample is None:
            raise InvalidRequest("this UNet's config names no sample_size, so there is no default size: give height and width")
        h, w = (sample, sample) if isinstance(sample, int) else sample
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    # -- running --

    def validate(self, request: GenerationRequest) -> tuple[list[str], list[str], modes.ModeInputs]:
        """Check a request before any work; returns (prompts, negative prompts, the mode with its output size, no
        images encoded yet). Raises InvalidRequest."""
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidRequest("prompt must be a string or a non-empty list of strings")
        neg = request.negative_prompt
        negatives = [neg or ""] * len(prompts) if neg is None or isinstance(neg, str) else list(neg)
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise InvalidRequest(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt or a single one")
        if not isinstance(request.num_images, int) or not 1 <= request.num_images * len(prompts) <= MAX_IMAGES:
            raise InvalidRequest(f"num_images must be at least 1 and at most {MAX_IMAGES} in all, got {request.num_images} per prompt")
        max_steps = self.denoiser.max_steps
        if not isinstance(request.steps, int) or not 1 <= request.steps <= max_steps:
            raise InvalidRequest(f"steps must be an integer from 1 to {max_steps}, got {request.steps}")
        for name in ("guidance_scale", "guidance_rescale", "eta"):
            value = getattr(request, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= request.guidance_rescale <= 1.0:
            raise InvalidRequest(f"guidance_rescale must be between 0 and 1, got {request.guidance_rescale}")
        if request.eta < 0:
            raise InvalidRequest(f"eta must be ≥ 0, got {request.eta}")
        if request.seed is not None and (not isinstance(request.seed, int) or not 0 <= request.seed < 2**64):
            raise InvalidRequest(f"seed must be an integer between 0 and 2^64−1, got {request.seed!r}")
        if request.sampler is not None:
            self.denoiser.plan(request.steps, sampler=request.sampler, eta=request.eta)  # raises InvalidRequest
        rows = len(prompts) * request.num_images
        c, f = self.denoiser.latent_channels, self.vae_scale_factor
        # the mode's checks, with a stand-in encoder: nothing runs on the device yet
        mode = self._mode(request, rows, seed=0, encode=lambda img, _: np.zeros((1, img.shape[1] // f, img.shape[2] // f, c), np.float32))
        if mode.mode == "text-to-image":
            default_h, default_w = self.default_size if request.height is None or request.width is None else (0, 0)
            height = default_h if request.height is None else request.height
            width = default_w if request.width is None else request.width
            m = self.size_multiple
            for name, v in (("height", height), ("width", width)):
                if not isinstance(v, int) or v < m or v % m or v > 4096:
                    raise InvalidRequest(f"{name} must be a multiple of {m} between {m} and 4096 for this model, got {v}")
            mode = dataclasses.replace(mode, height=height, width=width, latent_size=(height // f, width // f))
        if request.latents is not None:
            want = (rows, c, *mode.latent_size)
            lat = request.latents
            if not isinstance(lat, np.ndarray) or lat.dtype != np.float32 or lat.shape != want:
                got = f"{lat.dtype} {lat.shape}" if isinstance(lat, np.ndarray) else type(lat).__name__
                raise InvalidRequest(f"latents must be float32 NCHW of shape {want} for this request, got {got}")
            if not np.isfinite(lat).all():
                raise InvalidRequest("latents contain NaN or infinity")
        return prompts, negatives, mode

    def _mode(self, request: GenerationRequest, rows: int, *, seed: int,
              encode: Callable[[np.ndarray, int], np.ndarray], low_res_noise: np.ndarray | None = None) -> modes.ModeInputs:
        for name in ("init_image", "mask_image"):
            value = getattr(request, name)
            if value is not None and (not isinstance(value, np.ndarray) or value.dtype != np.uint8
                                      or value.ndim != (3 if name == "init_image" else 2)
                                      or (name == "init_image" and value.shape[-1] != 3)):
                want = "(H, W, 3) uint8 RGB" if name == "init_image" else "(H, W) uint8"
                raise InvalidRequest(f"{name} must be a {want} array (services.images decodes PNG/JPEG bytes into one)")
        return modes.prepare(
            self.denoiser.kind, rows=rows, init_image=request.init_image, mask_image=request.mask_image,
            depth_map=request.depth_map, strength=request.strength, noise_level=request.noise_level,
            scale_factor=self.vae_scale_factor, encode=encode, seed=seed, height=request.height, width=request.width,
            low_res_alphas=self.denoiser.low_res_alphas, max_noise_level=self.denoiser.max_noise_level,
            low_res_noise=low_res_noise)

    def generate(self, request: GenerationRequest, progress: Callable[[int, int], None] | None = None,
                 chunk: int | None = None, noise: dict[str, np.ndarray] | None = None) -> GenerationResult:
        """Text (and images) → images. `progress(step, total)` is called between compiled chunks of `chunk` steps.

        `noise` supplies draws that otherwise come from the seed, to reproduce another implementation's:
        "image" / "masked_image" (posterior samples, NHWC like the latents) and "low_res" (the x4 upscaler's).
        """
        prompts, negatives, mode = self.validate(request)
        noise = noise or {}
        t_start = time.perf_counter()
        n = request.num_images
        guided = request.guidance_scale > 1.0  # as diffusers: no unconditional pass at scale ≤ 1

        t0 = time.perf_counter()
        hidden, removed, compile_encode = self.text_encoder.encode(prompts + (negatives if guided else []))
        hidden = jnp.repeat(hidden, n, axis=0)  # each prompt's row num_images times: (P·n [+ P·n], L, D)
        batch = len(prompts) * n
        cond, uncond = (hidden[:batch], hidden[batch:]) if guided else (hidden, None)
        cond.block_until_ready()
        encode_s = time.perf_counter() - t0 - compile_encode

        seed = request.seed
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**32))
        t0 = time.perf_counter()
        compile_image = 0.0
        if mode.mode not in ("text-to-image", "upscale"):
            def encode(images: np.ndarray, stream: int) -> np.ndarray:
                nonlocal compile_image
                given = noise.get("image" if stream == modes.IMAGE_STREAM else "masked_image")
                latents, compile_s = self.decoder.encode_image(images, seed=seed, stream=stream, noise=given)
                compile_image += compile_s
                return latents

            mode = self._mode(request, batch, seed=seed, encode=encode)
        elif mode.mode == "upscale":
            mode = self._mode(request, batch, seed=seed, encode=None, low_res_noise=noise.get("low_res"))
        image_s = time.perf_counter() - t0 - compile_image

        t0 = time.perf_counter()
        h, w = mode.latent_size
        if request.latents is not None:
            latents = jnp.asarray(request.latents.transpose(0, 2, 3, 1))  # NCHW → NHWC
        else:
            latents = self.denoiser.noise(seed, (batch, h, w, self.denoiser.latent_channels))
        image_inputs = dict(init_latents=mode.init_latents, strength=mode.strength,
                            noise_at_full_strength=mode.noise_at_full_strength, extra=mode.extra,
                            class_labels=mode.class_labels, blend_mask=mode.blend_mask)
        first = 0 if mode.init_latents is None else conditioning.img2img_start(request.steps, mode.strength)[0]
        total = min(request.steps - first, self.denoiser.plan(request.steps, sampler=request.sampler, eta=request.eta,
                                                              first=first).evaluations)  # steps this run takes
        compile_denoise = 0.0
        for done, final, compile_s in self.denoiser.run(
            latents, cond, uncond, steps=request.steps, guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale, eta=request.eta, seed=seed, sampler=request.sampler, chunk=chunk,
            **image_inputs,
        ):
            latents = final if final is not None else latents
            compile_denoise += compile_s
            if progress is not None:
                progress(done, total)
        denoise_s = time.perf_counter() - t0 - compile_denoise

        t0 = time.perf_counter()
        images, compile_decode = self.decoder.decode(latents)
        decode_s = time.perf_counter() - t0 - compile_decode
        timings = {"compile": compile_encode + compile_image + compile_denoise + compile_decode, "encode": encode_s,
                   "encode_image": image_s, "denoise": denoise_s, "decode": decode_s,
                   "total": time.perf_counter() - t_start}
        return GenerationResult(images=images, seed=seed,
                                truncated=[r for r in removed[: len(prompts)] if r], timings=timings)


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
