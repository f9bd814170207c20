"""The request contract: every limit and default of a generation request, and its one validation. JAX-free.

    facts = ModelFacts(...)              what the model takes: from the stages in process, from ModelInfo over gRPC
    job = validate(request, facts)       GenerationRequest → Job: checked, defaults filled, mode and output size decided
    check_denoise_job(job, facts)        a denoiser call's arrays against the UNet (what only the denoiser knows)

The in-process pipeline, the gateway and every stage service check requests here, so a rule
has one place and one wording. Images arrive decoded (`images.decode_*` turns PNG/JPEG bytes
into the arrays a GenerationRequest holds). Everything raises `InvalidRequest` naming the fix.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from sdmesh.services.inputs import conditioning
from sdmesh.services.inputs.errors import InvalidRequest

# --- Limits --------------------------------------------------------------------------------------
MAX_IMAGES = 64  # images per request (prompts × num_images), and rows per stage call
MAX_STEPS = 1000  # no scheduler trains on more
MAX_SIDE = 4096  # pixels per side, of any image in or out
MAX_PROMPT_CHARS = 10_000  # far past any tokenizer's limit: longer is a mistake, not a prompt
MAX_CONTEXT_LENGTH = 1024  # tokens per conditioning row; CLIP gives 77
MAX_GUIDANCE = 1000.0  # |guidance_scale|; real use stays under 30
MAX_ETA = 1000.0
MAX_PRIORITY = 2**31 - 1  # int32 on the wire
MAX_PREVIEW_EVERY = 2**32 - 1  # uint32 on the wire; past the step count it just means no preview before the end
UPSCALE_FACTOR = 4  # the x4 upscaler's
MAX_LORAS = 8  # LoRAs per request
MAX_LORA_WEIGHT = 100.0  # |weight|; real use stays within ±2
MAX_ADAPTER_NAME = 200  # characters: a file's stem
MAX_CONTROLS = 4  # ControlNets per request
MAX_CONTROL_SCALE = 100.0  # real use stays within 0–2
PREPROCESSORS = ("none", "canny")  # what may turn a control image into its map (services/inputs/control.py)
DEFAULT_CANNY_THRESHOLDS = (100.0, 200.0)  # diffusers' ControlNet docs' and A1111's canny defaults

# --- Request defaults (diffusers' pipelines' own) ------------------------------------------------
DEFAULT_NUM_IMAGES = 1
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_STRENGTH = {"img2img": 0.8, "inpainting": 1.0, "depth": 0.8}
DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline's
DEFAULT_MAX_NOISE_LEVEL = 350  # its constructor's; checkpoints store theirs in model_index.json

# --- Serving defaults ----------------------------------------------------------------------------
DEFAULT_MAX_QUEUE = 8  # calls that may wait for a stage's device
DEFAULT_MAX_BATCH = 8  # the denoiser's running batch, in images
DEFAULT_CHUNK_STEPS = 5  # denoiser steps per compiled chunk: a cancelled request stops within one
DEFAULT_MAX_INFLIGHT = 32  # requests the gateway holds at once
DEFAULT_DRAIN_SECONDS = 30.0  # on SIGTERM: how long running requests may finish before they are ended
# The work one served request may ask for, in image-steps at the model's native size: e.g. 8 images × 150 steps
# at twice the native side. A stage's memory and time grow with images × steps × area; past this, one request
# would hold a device for everyone else's share.
DEFAULT_MAX_WORK = 8 * 150 * 4
DEFAULT_MAX_SIDE_FACTOR = 8  # the largest side a server takes by default: this × the native side (≤ MAX_SIDE)

# What a checkpoint is built for (its UNet's inputs), and what a request does with it.
KINDS = ("text-to-image", "inpainting", "depth", "upscaling")
MODES = ("text-to-image", "img2img", "inpainting", "depth", "upscaling")


def model_kind(in_channels: int, latent_channels: int, has_class_labels: bool) -> str:
    """What a UNet is for, from its input channels: text-to-image (C), inpainting (2C + 1), depth (C + 1),
    upscaling (C + 3 with a noise-level class label)."""
    if has_class_labels and in_channels == latent_channels + 3:
        return "upscaling"
    if in_channels == latent_channels:
        return "text-to-image"
    if in_channels == 2 * latent_channels + 1:
        return "inpainting"
    if in_channels == latent_channels + 1:
        return "depth"
    raise InvalidRequest(
        f"a UNet with {in_channels} input channels for {latent_channels} latent channels is none of "
        "text-to-image, inpainting, depth or x4 upscaling"
    )


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What requests are checked against: the UNet's, the scheduler's, the VAE's and the text encoder's numbers."""

    kind: str  # one of KINDS
    vae_scale_factor: int  # image pixels per latent pixel: sizes are multiples of it
    latent_channels: int
    default_size: tuple[int, int] | None  # (height, width) from the UNet's sample_size; None: requests must give one
    max_steps: int  # the most steps the scheduler's training range allows (≤ MAX_STEPS)
    samplers: tuple[str, ...]
    default_sampler: str  # the checkpoint's own (its scheduler config)
    hidden_size: int  # D of the conditioning: the UNet's cross_attention_dim
    max_length: int  # L the text encoder gives
    prediction_type: str  # epsilon | v_prediction | sample
    extra_channels: int  # UNet input channels beyond the latents (inpainting C + 1, depth 1, upscaling 3)
    class_labels_shape: tuple[int, ...] | None  # per image; None: the UNet takes no class labels
    max_noise_level: int  # the x4 upscaler's largest noise_level (0 for other kinds)
    controlnets: tuple[str, ...] = ()  # the ControlNets requests may name

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.vae_scale_factor < 1 or self.latent_channels < 1 or not 1 <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"model facts out of range: {self}")
        if self.default_sampler not in self.samplers:
            raise ValueError(f"default sampler {self.default_sampler!r} is not among {self.samplers}")


class LoraChoice(NamedTuple):
    """A LoRA a request applies: the file's stem in the stages' --lora-dir and its weights.

    `weight` scales both parts of the file (text encoder and UNet), as A1111's `<lora:name:weight>` and diffusers'
    `set_adapters` do; `unet_weight`, when set, replaces it for the UNet (A1111's `<lora:name:te:unet>`).
    """

    name: str
    weight: float = 1.0
    unet_weight: float | None = None

    @property
    def text_encoder_scale(self) -> float:
        return self.weight

    @property
    def unet_scale(self) -> float:
        return self.weight if self.unet_weight is None else self.unet_weight


class ControlChoice(NamedTuple):
    """A ControlNet a request applies: the denoiser's name for it, the control image, and how it steers.

    `start`/`end` are the fractions of the steps it applies between (diffusers' control_guidance_start/end);
    `guess_mode` lets it act without the prompt's help (on the conditional half only, its residuals ramped);
    `preprocessor` turns `image` into the map ("none": it is the map; "canny": its edges, at the thresholds).
    """

    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, any size: resized to the output size
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocessor: str = "none"
    low_threshold: float = DEFAULT_CANNY_THRESHOLDS[0]
    high_threshold: float = DEFAULT_CANNY_THRESHOLDS[1]


class ControlInput(NamedTuple):
    """A ControlNet's input to one denoiser call: its map at the output size, ready for the model."""

    name: str
    image: np.ndarray  # (1 or N, H, W, 3) float32 in [0, 1]; one row: the same map for every image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for; `validate` checks it against a model and fills the defaults."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    num_images: int = DEFAULT_NUM_IMAGES  # per prompt
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # ≤ 1 turns classifier-free guidance off, as in diffusers
    guidance_rescale: float = 0.0
    # The fraction of the schedule that is guided, (0, 1]: later steps take the conditional output alone and skip
    # the unconditional pass (A1111/ComfyUI's CFG truncation). Below 1 it changes the image.
    guidance_cutoff: float = 1.0
    eta: float = 0.0
    height: int | None = None  # None: the model's native size (text-to-image) or the init image's
    width: int | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    latents: np.ndarray | None = None  # initial noise, NCHW float32 (N, C, H/f, W/f), as diffusers' `latents`
    sampler: str | None = None  # None: the checkpoint's own
    priority: int = 0  # higher joins the denoiser's running batch first
    # Image-conditioned generation (which checkpoint takes what: see `validate`):
    init_image: np.ndarray | None = (
        None  # (H, W, 3) uint8 RGB: img2img, inpainting, depth; the upscaler's low-res image
    )
    mask_image: np.ndarray | None = None  # (H, W) uint8: inpainting, white repaints
    strength: float | None = None  # with init_image, (0, 1]; None: DEFAULT_STRENGTH of the mode
    depth_map: np.ndarray | None = None  # (H, W) float: depth checkpoints
    noise_level: int | None = None  # x4 upscaler; None: DEFAULT_NOISE_LEVEL
    preview_every: int = 0  # k > 0: denoise progress carries a preview of the first image about every k steps
    # LoRAs for every image of the request: LoraChoice, or (name, weight) pairs. `<lora:name:weight>` in a prompt
    # adds one too (removed from the text the encoder sees).
    loras: Sequence[LoraChoice | tuple[str, float]] = ()
    controls: Sequence[ControlChoice] = ()  # ControlNets, by the denoiser's names (ModelFacts.controlnets)


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: every default filled in, its mode and output size decided. Images: prompts × num_images."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # one per prompt
    num_images: int  # per prompt
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    seed: int
    sampler: str | None  # None: the checkpoint's own
    priority: int
    mode: str  # one of MODES
    height: int  # output pixels
    width: int
    latent_size: tuple[int, int]  # (h, w) of the latents the denoiser runs on
    latents: np.ndarray | None = None  # NCHW float32, as given
    guidance_cutoff: float = 1.0  # GenerationRequest.guidance_cutoff
    init_image: np.ndarray | None = None
    mask_image: np.ndarray | None = None
    depth_map: np.ndarray | None = None
    strength: float | None = None  # set in img2img, inpainting and depth
    noise_level: int | None = None  # set in upscaling
    preview_every: int = 0  # 0: no previews
    loras: tuple[LoraChoice, ...] = ()  # the request's and its prompts' `<lora:…>` tags, one per name
    controls: tuple[ControlChoice, ...] = ()

    @property
    def images(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0  # as diffusers: no unconditional pass at scale ≤ 1


@dataclasses.dataclass(frozen=True)
class LatentPreview:
    """A cheap latent → RGB map for previews (instead of a VAE decode): rgb = weights @ z + bias, per latent pixel,
    with z the C channels of x̂₀ in the UNet's scaled latent space and rgb in [-1, 1] once clamped."""

    weights: np.ndarray  # (3, C) float32
    bias: np.ndarray  # (3,) float32

    @classmethod
    def fallback(cls, channels: int) -> LatentPreview:
        """What a denoiser uses when the caller sends no map: channel r mod C as colour r (the first three
        channels as R, G, B), no bias. Only a rough picture: the Decoder's fitted map has the model's colours."""
        weights = np.zeros((3, channels), np.float32)
        weights[np.arange(3), np.arange(3) % channels] = 1.0
        return cls(weights, np.zeros(3, np.float32))

    def rgb(self, x0: np.ndarray) -> np.ndarray:
        """x̂₀ (h, w, C) → (h, w, 3) uint8."""
        rgb = np.asarray(x0, np.float32) @ self.weights.T + self.bias  # (h, w, 3), [-1, 1] once clamped
        rgb = np.clip(np.nan_to_num(rgb), -1.0, 1.0)  # a diverged x̂₀: NaN grey, ±inf white or black
        return np.round((rgb + 1.0) * 127.5).astype(np.uint8)


def preview_due(before: int, after: int, total: int, every: int) -> bool:
    """Whether a chunk that took a request from `before` to `after` of its `total` steps ends with a preview: it
    passed a multiple of `every`, and it was not the last (the final latents follow that one)."""
    return every > 0 and after < total and after // every > before // every


@dataclasses.dataclass(frozen=True)
class DenoiseJob:
    """One denoiser call: conditioning and initial noise in, final latents out. Arrays float32 NHWC, a row per image."""

    cond: np.ndarray  # (N, L, D)
    uncond: np.ndarray | None  # (N, L, D); None: no classifier-free guidance
    latents: np.ndarray | None  # (N, h, w, C) initial noise; None: drawn from `seed`
    seed: int  # the initial noise (when not given) and each image's η/ancestral noise stream
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int  # output pixels: the latents are (height, width) / vae_scale_factor
    width: int
    sampler: str | None = None
    priority: int = 0
    init_latents: np.ndarray | None = None  # (N, h, w, C): start part-way from these, at `strength`
    strength: float = 1.0
    guidance_cutoff: float = 1.0  # the fraction of the schedule guided (GenerationRequest's)
    extra: np.ndarray | None = None  # (N, h, w, E): channels joining the UNet input
    blend_mask: np.ndarray | None = None  # (N, h, w, 1): latent blending towards init_latents (1 repaints)
    class_labels: np.ndarray | None = None  # (N, *class_labels_shape)
    tenant: str = ""  # who asked (the gateway's API-key tenant): the denoiser shares its batch fairly between them
    preview_every: int = 0  # k > 0: a preview after each chunk that passes a multiple of k steps (`preview_due`)
    preview_projection: LatentPreview | None = None  # the latent → RGB map; None: LatentPreview.fallback
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA name, UNet weight) for every image of the call
    controls: tuple[ControlInput, ...] = ()  # ControlNets for every image of the call

    @property
    def images(self) -> int:
        return int(self.cond.shape[0])


@dataclasses.dataclass(frozen=True)
class WorkBudget:
    """What one request may ask of a server (`--max-work`, `--max-side`): its largest side in pixels, and its
    work in image-steps at the model's native size (images × steps × area / native area)."""

    max_side: int
    max_work: float
    native_area: int  # latent pixels of one native-size image: the unit of work

    @classmethod
    def for_model(cls, facts: ModelFacts, max_work: float | None = None, max_side: int | None = None) -> WorkBudget:
        """The defaults for this model (DEFAULT_MAX_WORK; DEFAULT_MAX_SIDE_FACTOR × its native side, ≤ MAX_SIDE),
        or the given limits."""
        native = facts.default_size or (512, 512)
        f = facts.vae_scale_factor
        side = max_side or min(MAX_SIDE, DEFAULT_MAX_SIDE_FACTOR * max(native))
        if not 1 <= side <= MAX_SIDE:
            raise InvalidRequest(f"--max-side must be 1 to {MAX_SIDE} pixels, got {side}")
        work = DEFAULT_MAX_WORK if max_work is None else max_work
        if not (math.isfinite(work) and work > 0):
            raise InvalidRequest(f"--max-work must be a positive number of image-steps, got {work}")
        return cls(max_side=side, max_work=float(work), native_area=max(1, (native[0] // f) * (native[1] // f)))


def check_work(
    images: int, steps: int, height: int, width: int, latent_size: tuple[int, int], budget: WorkBudget
) -> None:
    """A request within the server's budget: no side past max_side, no more work than max_work (InvalidRequest
    naming the limit and what to ask for instead)."""
    if max(height, width) > budget.max_side:
        raise InvalidRequest(
            f"{height}x{width} is larger than this server takes: at most {budget.max_side} pixels a side "
            "(--max-side); ask for a smaller size"
        )
    area = latent_size[0] * latent_size[1] / budget.native_area
    work = images * steps * area
    if work > budget.max_work:
        raise InvalidRequest(
            f"this request is {work:.0f} image-steps of work ({images} images × {steps} steps × {area:.2g} × the "
            f"native area); this server takes at most {budget.max_work:.0f} (--max-work): ask for fewer images, "
            "fewer steps or a smaller size"
        )


# --- Checks, each one rule ------------------------------------------------------------------------


def check_prompts(prompts: Sequence[Any], negatives: Sequence[Any]) -> None:
    """Prompts: at least one, at most MAX_IMAGES; negatives: one per prompt or none; every text a bounded string."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("give at least one prompt: a string or a non-empty list of strings")
    if len(prompts) > MAX_IMAGES:
        raise InvalidRequest(f"{len(prompts)} prompts in one request; at most {MAX_IMAGES}: split the request")
    if negatives and (len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives)):
        raise InvalidRequest(
            f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt or a single one"
        )
    for what, texts in (("prompt", prompts), ("negative prompt", negatives)):
        for i, text in enumerate(texts):
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidRequest(
                    f"{what} {i} is {len(text)} characters; at most {MAX_PROMPT_CHARS} "
                    "(the model reads at most 13 chunks of 75 tokens)"
                )


# A1111's extra-network tags: <lora:NAME>, <lora:NAME:W>, <lora:NAME:TE:UNET>, <lora:NAME:te=W:unet=W>
# (<lyco:…> is A1111's older spelling of the same). The name runs to the next colon or '>'.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*)*)>", re.IGNORECASE)


def split_lora_tags(text: str) -> tuple[str, list[LoraChoice]]:
    """A prompt without its `<lora:…>` tags, and the LoRAs they name (A1111's meaning of each argument)."""
    found: list[LoraChoice] = []

    def take(match: re.Match[str]) -> str:
        name, args = match.group(1).strip(), [a.strip() for a in match.group(2).split(":")[1:]]
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        unknown = set(named) - {"te", "unet", "dyn"}
        if unknown:
            raise InvalidRequest(
                f"{match.group(0)!r}: unknown argument {sorted(unknown)[0]!r}; a LoRA tag reads "
                "<lora:NAME:WEIGHT> or <lora:NAME:te=W:unet=W>"
            )

        def number(text: str) -> float:
            try:
                return float(text)
            except ValueError:
                raise InvalidRequest(
                    f"{match.group(0)!r}: {text!r} is not a number; a LoRA tag reads <lora:NAME:WEIGHT>"
                ) from None

        weight = number(named.get("te", positional[0] if positional else "1"))
        unet = named.get("unet", positional[1] if len(positional) > 1 else None)
        found.append(LoraChoice(name, weight, None if unet is None else number(unet)))
        return ""

    return LORA_TAG.sub(take, text), found


def check_loras(loras: Sequence[Any], limit: int = MAX_LORAS) -> tuple[LoraChoice, ...]:
    """LoRA choices: at most `limit`, each a file stem once, with finite weights within ±MAX_LORA_WEIGHT."""
    if isinstance(loras, (str, bytes)) or not isinstance(loras, Sequence):
        raise InvalidRequest("loras must be a list of (name, weight) pairs")
    if len(loras) > limit:
        raise InvalidRequest(f"{len(loras)} LoRAs in one request; at most {limit}")
    checked: list[LoraChoice] = []
    for item in loras:
        if isinstance(item, str):
            item = (item,)
        if not isinstance(item, tuple) or not 1 <= len(item) <= 3:
            raise InvalidRequest(f"each LoRA is (name, weight), got {shown(repr(item))}")
        choice = LoraChoice(*item)
        name = choice.name
        if not isinstance(name, str) or not name or len(name) > MAX_ADAPTER_NAME or name != name.strip():
            raise InvalidRequest(f"LoRA name {shown(repr(name))}: give the file's stem (1 to {MAX_ADAPTER_NAME} chars)")
        if any(c in name for c in "/\\\0") or name in (".", ".."):
            raise InvalidRequest(
                f"LoRA name {shown(name)!r} names a path; give the file's stem in the stage's --lora-dir"
            )
        weights = [choice.weight] + ([] if choice.unet_weight is None else [choice.unet_weight])
        for w in weights:
            check_number(f"LoRA {shown(name)!r} weight", w, -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
        if any(c.name == name for c in checked):
            raise InvalidRequest(f"LoRA {shown(name)!r} is named twice; give it once, with the weight you want")
        checked.append(
            LoraChoice(name, float(choice.weight), None if choice.unet_weight is None else float(choice.unet_weight))
        )
    return tuple(checked)


def check_control_use(name: Any, scale: Any, start: Any, end: Any, guess_mode: Any, facts: ModelFacts) -> None:
    """What every ControlNet use must be, in a request or a denoiser call."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("each control names a ControlNet: give its name")
    if name not in facts.controlnets:
        loaded = ", ".join(facts.controlnets) or "none (start the denoiser with --controlnet NAME=PATH)"
        raise InvalidRequest(f"ControlNet {shown(name)} is not loaded; the denoiser has: {loaded}")
    check_number(f"ControlNet {shown(name)} scale", scale, 0.0, MAX_CONTROL_SCALE)
    check_number(f"ControlNet {shown(name)} start", start, 0.0, 1.0)
    check_number(f"ControlNet {shown(name)} end", end, 0.0, 1.0)
    if not start < end:
        raise InvalidRequest(
            f"ControlNet {shown(name)}: start ({start:g}) must be before end ({end:g}); both are fractions of the "
            "steps, 0 ≤ start < end ≤ 1"
        )
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise InvalidRequest(f"ControlNet {shown(name)} guess_mode must be true or false, got {guess_mode!r}")


def check_controls(controls: Sequence[Any], facts: ModelFacts) -> tuple[ControlChoice, ...]:
    """A request's ControlNets: at most MAX_CONTROLS, each loaded, its image an RGB array, its numbers in range."""
    if isinstance(controls, (str, bytes)) or not isinstance(controls, Sequence):
        raise InvalidRequest("controls must be a list of ControlChoice")
    if len(controls) > MAX_CONTROLS:
        raise InvalidRequest(f"{len(controls)} controls in one request; at most {MAX_CONTROLS}")
    checked = []
    for c in controls:
        if not isinstance(c, ControlChoice):
            raise InvalidRequest(f"each control is a ControlChoice, got {type(c).__name__}")
        check_control_use(c.name, c.scale, c.start, c.end, c.guess_mode, facts)
        image = c.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InvalidRequest(
                f"ControlNet {shown(c.name)}: the control image must be a (H, W, 3) uint8 RGB array "
                "(services.inputs.images decodes PNG/JPEG bytes into one)"
            )
        if min(image.shape[:2]) < 1 or max(image.shape[:2]) > MAX_SIDE:
            raise InvalidRequest(
                f"ControlNet {shown(c.name)}: the control image is {image.shape[1]}×{image.shape[0]}; "
                f"give one of 1 to {MAX_SIDE} pixels a side"
            )
        if c.preprocessor not in PREPROCESSORS:
            raise InvalidRequest(
                f"ControlNet {shown(c.name)}: preprocessor {shown(str(c.preprocessor))} is not one of "
                f'{", ".join(PREPROCESSORS)} (other maps are made by the caller and sent with "none")'
            )
        low = check_number("canny low_threshold", c.low_threshold, 0.0, 255.0)
        high = check_number("canny high_threshold", c.high_threshold, 0.0, 255.0)
        if low > high:
            raise InvalidRequest(f"canny low_threshold ({low:g}) must not exceed high_threshold ({high:g})")
        checked.append(c._replace(scale=float(c.scale), start=float(c.start), end=float(c.end),
                                  guess_mode=bool(c.guess_mode), low_threshold=low, high_threshold=high))  # fmt: skip
    return tuple(checked)


def check_steps(steps: Any, max_steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= max_steps:
        raise InvalidRequest(f"steps must be an integer from 1 to {max_steps}, got {steps!r}")
    return int(steps)


def check_number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a finite number from {low:g} to {high:g}, got {value}")
    return float(value)


def check_guidance(guidance_scale: Any, guidance_rescale: Any, eta: Any) -> tuple[float, float, float]:
    return (
        check_number("guidance_scale", guidance_scale, -MAX_GUIDANCE, MAX_GUIDANCE),
        check_number("guidance_rescale", guidance_rescale, 0.0, 1.0),
        check_number("eta", eta, 0.0, MAX_ETA),
    )


def check_guidance_cutoff(value: Any) -> float:
    cutoff = check_number("guidance_cutoff", value, 0.0, 1.0)
    if cutoff == 0:
        raise InvalidRequest(
            "guidance_cutoff must be above 0 (the fraction of the steps that are guided); to turn guidance off, "
            "set guidance_scale to 1"
        )
    return cutoff


def check_sampler(sampler: str | None, facts: ModelFacts) -> str | None:
    """None or "" is the checkpoint's own; anything else must be a sampler the denoiser has."""
    if not sampler:
        return None
    if sampler not in facts.samplers:
        raise InvalidRequest(f"sampler {shown(sampler)} is not one of {', '.join(facts.samplers)}")
    return sampler


def shown(text: str, limit: int = 40) -> str:
    """A caller's string as an error quotes it: cut to `limit` characters, since a status message past ~8 kB
    (after gRPC's percent-encoding) is dropped on the way back and the caller gets RESOURCE_EXHAUSTED instead."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise InvalidRequest(f"seed must be an integer between 0 and 2^64−1, got {seed!r}")
    return int(seed)


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)) or abs(int(priority)) > MAX_PRIORITY:
        raise InvalidRequest(f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}, got {priority!r}")
    return int(priority)


def check_preview_every(preview_every: Any) -> int:
    if (
        isinstance(preview_every, bool)
        or not isinstance(preview_every, (int, np.integer))
        or not 0 <= preview_every <= MAX_PREVIEW_EVERY
    ):
        raise InvalidRequest(
            f"preview_every must be a whole number of steps, 0 (no previews) or more (a preview about every that "
            f"many steps), got {preview_every!r}"
        )
    return int(preview_every)


def check_preview_projection(projection: LatentPreview, channels: int) -> None:
    """A latent → RGB map for this UNet: (3, C) finite weights and 3 finite biases."""
    weights, bias = np.asarray(projection.weights), np.asarray(projection.bias)
    if weights.shape != (3, channels) or bias.shape != (3,):
        raise InvalidRequest(
            f"preview_projection has {weights.size} weights and {bias.size} biases; this UNet needs {3 * channels} "
            f"weights (3 × {channels} latent channels, row-major) and 3 biases (the Decoder's ModelInfo.latent_preview)"
        )
    check_finite("preview_projection", np.concatenate([weights.ravel(), bias.ravel()]).astype(np.float32))


def check_size(height: Any, width: Any, *, multiple: int, what: str = "") -> None:
    """Each side a multiple of the VAE factor, from it up to MAX_SIDE. `what` names an image whose size it is."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < multiple or v % multiple or v > MAX_SIDE:
            if what:
                near = max(multiple, v - v % multiple) if isinstance(v, (int, np.integer)) else multiple
                raise InvalidRequest(
                    f"{what} {name} is {v}; it must be a multiple of {multiple} between {multiple} and {MAX_SIDE} for "
                    f"this model: crop or resize it (e.g. to {near})"
                )
            raise InvalidRequest(
                f"{name} must be a multiple of {multiple} between {multiple} and {MAX_SIDE} for this model, got {v}"
            )


def check_strength(strength: Any, steps: int) -> float:
    """(0, 1], and enough to run at least one of `steps` (diffusers' get_timesteps: int(steps × strength) ≥ 1)."""
    strength = check_number("strength", strength, 0.0, 1.0)
    if strength <= 0.0:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength}")
    conditioning.img2img_start(steps, strength)  # raises when no step would run
    return strength


def check_noise_level(noise_level: Any, maximum: int) -> int:
    if (
        isinstance(noise_level, bool)
        or not isinstance(noise_level, (int, np.integer))
        or not 0 <= noise_level <= maximum
    ):
        raise InvalidRequest(
            f"noise_level must be an integer from 0 to {maximum} (this checkpoint's max_noise_level), "
            f"got {noise_level!r}"
        )
    return int(noise_level)


def check_finite(name: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise InvalidRequest(f"{name} contains NaN or infinity")


# --- A generation request --------------------------------------------------------------------------


def validate(request: GenerationRequest, facts: ModelFacts, *, draw_seed: Callable[[], int] | None = None) -> Job:
    """Check a request against a model before any work and fill its defaults; raises InvalidRequest.

    What each kind of checkpoint takes (each as the diffusers pipeline it is tested against):

        text-to-image  nothing; + init_image → img2img (strength 0.8); + init_image + mask_image → inpainting by
                       latent blending (strength 1)
        inpainting     init_image + mask_image (9-channel UNet: mask and masked-image latents join its input)
        depth          init_image + depth_map (5-channel UNet), strength 0.8
        upscaling      init_image (the low-res image, output 4×) + noise_level (20)
    """
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt or ())
    neg = request.negative_prompt
    negatives = [neg or ""] * len(prompts) if neg is None or isinstance(neg, str) else list(neg)
    check_prompts(prompts, negatives)
    # <lora:…> tags, in any prompt or negative, apply to the whole request, as A1111 activates a batch's tags
    tagged: list[LoraChoice] = []
    for texts in (prompts, negatives):
        for i, text in enumerate(texts):
            texts[i], found = split_lora_tags(text)
            tagged += [c for c in found if all(c.name != t.name for t in tagged)]
    given = check_loras(request.loras)
    loras = check_loras([*given, *(t for t in tagged if all(t.name != c.name for c in given))])
    n = request.num_images
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n * len(prompts) <= MAX_IMAGES:
        raise InvalidRequest(f"num_images must be at least 1 and at most {MAX_IMAGES} in all, got {n!r} per prompt")
    steps = check_steps(request.steps, facts.max_steps)
    guidance_scale, guidance_rescale, eta = check_guidance(
        request.guidance_scale, request.guidance_rescale, request.eta
    )
    guidance_cutoff = check_guidance_cutoff(request.guidance_cutoff)
    sampler = check_sampler(request.sampler, facts)
    priority = check_priority(request.priority)
    preview_every = check_preview_every(request.preview_every)
    if request.seed is not None:
        seed = check_seed(request.seed)
    else:  # as diffusers' generator seeds: [0, 2^32)
        seed = draw_seed() if draw_seed else random.SystemRandom().randrange(2**32)
    _check_arrays(request)
    controls = check_controls(request.controls, facts)
    rows = len(prompts) * int(n)
    mode = _mode(request, facts, steps)
    if request.latents is not None:
        want = (rows, facts.latent_channels, *mode["latent_size"])
        lat = request.latents
        if not isinstance(lat, np.ndarray) or lat.dtype != np.float32 or lat.shape != want:
            got = f"{lat.dtype} {lat.shape}" if isinstance(lat, np.ndarray) else type(lat).__name__
            raise InvalidRequest(f"latents must be float32 NCHW of shape {want} for this request, got {got}")
        check_finite("latents", lat)
    return Job(
        prompts=tuple(prompts), negative_prompts=tuple(negatives), num_images=int(n), steps=steps,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, seed=seed, sampler=sampler,
        priority=priority, latents=request.latents, guidance_cutoff=guidance_cutoff, init_image=request.init_image,
        mask_image=request.mask_image,
        depth_map=None if request.depth_map is None else np.asarray(request.depth_map, np.float32),
        preview_every=preview_every, loras=loras, controls=controls, **mode,
    )  # fmt: skip


def _check_arrays(request: GenerationRequest) -> None:
    fix = "(services.inputs.images decodes PNG/JPEG bytes into one)"
    image, mask, depth = request.init_image, request.mask_image, request.depth_map
    if image is not None and (
        not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3
    ):
        raise InvalidRequest(f"init_image must be a (H, W, 3) uint8 RGB array {fix}")
    if mask is not None and (not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2):
        raise InvalidRequest(f"mask_image must be a (H, W) uint8 array {fix}")
    if depth is not None:
        if not isinstance(depth, np.ndarray) or depth.ndim not in (2, 3) or min(depth.shape) < 1:
            raise InvalidRequest("depth_map must be a (H, W) float array (or (1, H, W))")
        if depth.ndim == 3 and depth.shape[0] != 1:
            raise InvalidRequest(f"depth_map has shape {list(depth.shape)}; give one map, (H, W) or (1, H, W)")
        check_finite("depth_map", np.asarray(depth, np.float32))


def _mode(request: GenerationRequest, facts: ModelFacts, steps: int) -> dict[str, Any]:
    """The request's mode and output size (Job's fields), from the checkpoint's kind and the images given."""
    kind, f = facts.kind, facts.vae_scale_factor
    image, mask, depth = request.init_image, request.mask_image, request.depth_map
    if kind == "upscaling":
        if image is None:
            raise InvalidRequest("this is the x4 upscaler: give init_image, the low-resolution image to upscale")
        for name, value in (("mask_image", mask), ("depth_map", depth), ("strength", request.strength)):
            if value is not None:
                raise InvalidRequest(f"{name} does not apply to the x4 upscaler; drop it")
        level = DEFAULT_NOISE_LEVEL if request.noise_level is None else request.noise_level
        level = check_noise_level(level, facts.max_noise_level)
        h, w = image.shape[:2]
        if max(h, w) * UPSCALE_FACTOR > MAX_SIDE:
            raise InvalidRequest(
                f"init_image is {w}×{h}: upscaled {UPSCALE_FACTOR}× it would pass {MAX_SIDE} pixels; send a smaller one"
            )
        for name, asked, got in (
            ("height", request.height, h * UPSCALE_FACTOR),
            ("width", request.width, w * UPSCALE_FACTOR),
        ):
            if asked and asked != got:
                raise InvalidRequest(
                    f"{name} {asked} disagrees with the upscaled init_image's {got}; drop it or send {got}"
                )
        return dict(mode="upscaling", height=h * UPSCALE_FACTOR, width=w * UPSCALE_FACTOR, latent_size=(h, w),
                    noise_level=level)  # fmt: skip
    if request.noise_level is not None:
        raise InvalidRequest("noise_level is for the x4 upscaler; this checkpoint is not one")
    if kind == "text-to-image" and image is None:
        for name, value in (("mask_image", mask), ("depth_map", depth), ("strength", request.strength)):
            if value is not None:
                raise InvalidRequest(f"{name} needs an init image (img2img/inpainting); give init_image too or drop it")
        if (request.height is None or request.width is None) and facts.default_size is None:
            raise InvalidRequest(
                "this model has no native size (its UNet config names no sample_size): give height and width"
            )
        native = facts.default_size or (0, 0)  # unused when None: both sides were given
        height = native[0] if request.height is None else request.height
        width = native[1] if request.width is None else request.width
        check_size(height, width, multiple=f)
        return dict(mode="text-to-image", height=int(height), width=int(width), latent_size=(height // f, width // f))
    if image is None:
        inputs = "init_image and mask_image" if kind == "inpainting" else "init_image and depth_map"
        raise InvalidRequest(
            f"this is {'an inpainting' if kind == 'inpainting' else 'a depth'} checkpoint: give {inputs}"
        )
    h, w = image.shape[:2]
    check_size(h, w, multiple=f, what="init_image")
    for name, asked, got in (("height", request.height, h), ("width", request.width, w)):
        if asked and asked != got:
            raise InvalidRequest(
                f"{name} {asked} disagrees with init_image's {got}; the output has the init image's size"
            )
    if kind == "depth" and depth is None:
        raise InvalidRequest("this is a depth checkpoint: give depth_map (a grayscale PNG or .npy), with init_image")
    if kind != "depth" and depth is not None:
        raise InvalidRequest("depth_map is for depth checkpoints (a 5-channel UNet); this one is not")
    if kind == "inpainting" and mask is None:
        raise InvalidRequest("this is an inpainting checkpoint: give mask_image (white repaints, black keeps)")
    if kind == "depth" and mask is not None:
        raise InvalidRequest("mask_image is for inpainting; a depth checkpoint takes init_image and depth_map")
    if mask is not None and mask.shape[:2] != (h, w):
        raise InvalidRequest(
            f"mask_image is {mask.shape[1]}×{mask.shape[0]} but init_image is {w}×{h}; they must be the same size"
        )
    mode = "inpainting" if mask is not None else ("depth" if kind == "depth" else "img2img")
    strength = DEFAULT_STRENGTH[mode] if request.strength is None else request.strength
    return dict(mode=mode, height=h, width=w, latent_size=(h // f, w // f), strength=check_strength(strength, steps))


# --- A denoiser call ---------------------------------------------------------------------------------


def check_denoise_job(job: DenoiseJob, facts: ModelFacts) -> None:
    """Check a denoiser call's arrays and numbers against the model; raises InvalidRequest saying what to fix."""
    n, f, c, e = job.images, facts.vae_scale_factor, facts.latent_channels, facts.extra_channels
    check_loras(job.loras)
    if job.cond.ndim != 3 or not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest(
            f"cond has shape {list(job.cond.shape)}: one row per image; give 1 to {MAX_IMAGES} rows (N, L, D)"
        )
    length, dim = job.cond.shape[1:]
    if dim != facts.hidden_size or not 1 <= length <= MAX_CONTEXT_LENGTH:
        raise InvalidRequest(
            f"cond has shape {list(job.cond.shape)}; this UNet needs (N, L, {facts.hidden_size}) with L ≤ "
            f"{MAX_CONTEXT_LENGTH} (is the text encoder from the same model?)"
        )
    check_finite("cond", job.cond)
    if job.uncond is not None:
        if job.uncond.shape != job.cond.shape:
            raise InvalidRequest(
                f"uncond has shape {list(job.uncond.shape)} but cond has {list(job.cond.shape)}; they must match"
            )
        check_finite("uncond", job.uncond)
    check_steps(job.steps, facts.max_steps)
    check_guidance(job.guidance_scale, job.guidance_rescale, job.eta)
    check_guidance_cutoff(job.guidance_cutoff)
    check_sampler(job.sampler, facts)
    check_priority(job.priority)
    check_preview_every(job.preview_every)
    if job.preview_projection is not None:
        check_preview_projection(job.preview_projection, c)
    check_size(job.height, job.width, multiple=f)
    latent = (job.height // f, job.width // f)
    if job.latents is not None:
        if job.latents.shape != (n, *latent, c):
            raise InvalidRequest(
                f"latents have shape {_nchw(job.latents.shape)}; need NCHW ({n}, {c}, h, w) with h, w from 1 to "
                f"{MAX_SIDE // f} ({n} rows as cond, {c} latent channels)"
            )
        check_finite("latents", job.latents)

    def rows(name: str, array: np.ndarray, channels: int, what: str) -> None:
        want = (n, *latent, channels)
        if array.shape != want:
            raise InvalidRequest(
                f"{name} has shape {_nchw(array.shape)}; this request needs NCHW {_nchw(want)} ({what})"
            )
        check_finite(name, array)

    if job.init_latents is not None:
        rows("init_latents", job.init_latents, c, "the init image's latents, Decoder.EncodeImage")
        check_strength(job.strength, job.steps)
    if e and job.extra is None:
        raise InvalidRequest(
            f"this UNet takes {e} conditioning channels beyond the latents (an inpainting, depth or upscaling "
            "model): send them as extra (N, E, h, w)"
        )
    if job.extra is not None:
        if not e:
            raise InvalidRequest(
                "extra was given but this UNet takes only the latents; drop it or use an inpainting/depth model"
            )
        rows("extra", job.extra, e, f"{e} channels beyond the latents")
    if job.blend_mask is not None:
        if job.init_latents is None:
            raise InvalidRequest("blend_mask needs init_latents: the latents to keep where the mask is 0")
        rows("blend_mask", job.blend_mask, 1, "1 repaints, 0 keeps")
        if job.blend_mask.min() < 0 or job.blend_mask.max() > 1:
            raise InvalidRequest("blend_mask values must lie in [0, 1]")
    if len(job.controls) > MAX_CONTROLS:
        raise InvalidRequest(f"{len(job.controls)} controls in one call; at most {MAX_CONTROLS}")
    for control in job.controls:
        check_control_use(control.name, control.scale, control.start, control.end, control.guess_mode, facts)
        image = control.image
        want = f"(1 or {n}, 3, {job.height}, {job.width}) float32 in [0, 1]: the map at the output size"
        if image.ndim != 4 or image.shape[0] not in (1, n) or image.shape[1:] != (job.height, job.width, 3):
            raise InvalidRequest(f"ControlNet {shown(control.name)} image has shape {_nchw(image.shape)}; need {want}")
        check_finite(f"ControlNet {shown(control.name)} image", image)
    shape = facts.class_labels_shape
    if shape is not None and job.class_labels is None:
        raise InvalidRequest("this UNet has a class embedding (the x4 upscaler: the noise level); send class_labels")
    if job.class_labels is not None:
        labels = job.class_labels
        if shape is None:
            raise InvalidRequest("class_labels were given but this UNet has no class embedding; drop them")
        if labels.shape != (n, *shape):
            raise InvalidRequest(f"class_labels have shape {list(labels.shape)}; need {[n, *shape]}")
        check_finite("class_labels", labels)
        if facts.kind == "upscaling":
            level = labels.reshape(-1)[0]
            if np.any(labels != level) or level % 1 or not 0 <= level <= facts.max_noise_level:
                raise InvalidRequest(
                    f"the x4 upscaler's class_labels are its noise level: one integer from 0 to "
                    f"{facts.max_noise_level} for every row, got {labels.tolist()}"
                )


def _nchw(nhwc: tuple[int, ...]) -> list[int]:
    """An NHWC shape as the NCHW the wire and the messages speak."""
    return [nhwc[0], nhwc[3], nhwc[1], nhwc[2]] if len(nhwc) == 4 else list(nhwc)
