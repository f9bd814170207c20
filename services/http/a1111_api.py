"""AUTOMATIC1111's web UI API (`/sdapi/v1/*`) in front of the gateway, so its clients (the `webuiapi` package, and
the tools built on A1111's API) work unchanged with their address pointing here.

    POST /sdapi/v1/txt2img          prompt, negative_prompt, steps, cfg_scale, width, height, seed (-1: random),
                                    sampler_name (+ scheduler), batch_size, n_iter → images, parameters, info
    POST /sdapi/v1/img2img          the same + init_images, denoising_strength, resize_mode, mask,
                                    inpainting_mask_invert
    GET  /sdapi/v1/progress         the caller's call in progress: progress 0–1, eta_relative, state, current_image
    POST /sdapi/v1/interrupt|skip   stop the caller's generations
    GET  /sdapi/v1/samplers|schedulers|sd-models|loras|embeddings|options|scripts
    POST /sdapi/v1/options          sd_model_checkpoint: the caller's model from then on; other settings ignored
    GET  /controlnet/model_list|module_list|version   the sd-webui-controlnet extension's listings

How A1111's meaning maps onto the gateway's:

- Seeds. A1111 gives image i of a call the seed `seed + i` and draws each image's noise from its own seed; the
  gateway draws the noise of all n images of one request from one seed. So every image here is one gateway request
  with seed `seed + i` (batch_size × n_iter of them, at most contract.MAX_IMAGES), and `info.all_seeds[i]` remakes
  `images[i]` on its own (batch_size 1, n_iter 1), as in A1111. The requests are submitted one after another and
  the denoiser's running batch joins them; each takes one of the tenant's and one of the gateway's places (and
  counts against the tenant's rate), and when a place is lacking the next waits until one of its own call's images
  is done. seed -1 (or none): the front draws one in [0, 2^32), as A1111 does.
- Samplers (SAMPLERS): A1111's names and aliases ("Euler a", "DPM++ 2M Karras", "k_euler", ...) and sdmesh's own
  names (exact: a scheduler does not change them). A1111 ≥ 1.9 sends the schedule as `scheduler`: "Automatic" is
  the sampler's own, which for "DPM++ 2M" is Karras there (dpm++2m-karras here); "Uniform" is the checkpoint's
  own spacing (dpm++2m); "Karras" exists only for DPM++ 2M here. DDIM and PLMS take no schedule (as in A1111). No
  sampler: the checkpoint's own (A1111 would use Euler). An unknown name is 400 listing those that work.
- Sizes. No width/height: the model's own size (A1111: 512). img2img resizes the init image (and the mask) to
  width × height as A1111's resize_mode does (0 just resize, PIL Lanczos; 1 crop and resize; 2 resize and fill; 3,
  A1111's latent resize, is done as 0), since the gateway makes images of its init image's size. Transparent init
  pixels are flattened onto white (A1111's img2img background); a mask with transparency is read by its alpha, as
  A1111 reads it, and inpainting_mask_invert=1 inverts it (the gateway repaints white).
- Interrupt. /interrupt (and /skip) cancels the caller's running generations (its tenant's, /v1/jobs ones too;
  without API keys every caller is one tenant, as A1111 has one queue): the interrupted txt2img/img2img
  answers 200 with the images that were finished before it (A1111 also gives the partly made ones; the gateway
  has none to give) and `info.sdmesh_notes` saying so.
- ControlNet. txt2img and img2img take the sd-webui-controlnet extension's units, `alwayson_scripts: {"controlnet":
  {"args": [unit, ...]}}` as webuiapi's ControlNetUnit sends them (ControlNetUnit here): `model` is a ControlNet the
  denoiser loaded (A1111's " [hash]" suffix is dropped; /controlnet/model_list lists them), `image` the control
  image (img2img without one: the init image, as the extension does), `module` "none" or "canny" (threshold_a and
  threshold_b are canny's low and high; -1: 100 and 200), weight, guidance_start and guidance_end as the
  extension's; control_mode "ControlNet is more important" is guess mode, the others balanced. The image is sized
  to the output by `resize_mode` ("Just Resize" by the gateway, with Lanczos; "Crop and Resize", the extension's
  default, and "Resize and Fill" here, as img2img's modes) and flattened onto white where transparent. Units with
  enabled false are skipped; the unit mask, pixel_perfect, processor_res, low_vram and hr_option are not used.
- Models. /sd-models lists the gateway's models (title "name [hash]" with the short hash the denoiser reports,
  model_name the name, filename its checkpoint; sha256 null: the full hash is not known). A call runs on the model
  its override_settings.sd_model_checkpoint names (a title, a name or a hash), else the one the caller's last POST
  /options sd_model_checkpoint named, else the gateway's first; info's sd_model_name and sd_model_hash are the
  model that made the images. POST /options switches the model for the caller's tenant only (without API keys every
  caller is one tenant, as A1111's one global model), not for other tenants, and changes nothing else. A name not
  served is ignored, as A1111 falls back to its default checkpoint: noted, and the default (or the caller's) runs.
- Ignored, named in `info.sdmesh_notes` when set: hires fix (enable_hr), restore_faces, tiling, styles,
  override_settings other than sd_model_checkpoint, alwayson_scripts other than controlnet, scripts, subseeds,
  refiners, mask blur, inpaint "only masked", and the like.
  Unknown fields are ignored; a field of the wrong type is 422 naming it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdmesh.services.http.common import Front, decode_base64, generate_request, invalid
from sdmesh.services.http.jobs import Job
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import ModelFacts
from sdmesh.services.serving.gateway import Refused, model_title
from sdmesh.services.serving.tenants import Tenant
from sdmesh.v1 import gateway_pb2

DEFAULT_STRENGTH = 0.75  # A1111's img2img denoising_strength
BACKGROUND = (255, 255, 255)  # A1111's img2img_background_color: what transparent init pixels become
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", "just resize (latent upscale)")
CONTROLNET_SCRIPT = "controlnet"  # its alwayson_scripts key (A1111 matches script names without case)
CONTROL_MODULES = ("none", "canny")  # the extension's preprocessors sdmesh runs (contract.PREPROCESSORS)
CONTROL_MODES = ("balanced", "my prompt is more important", "controlnet is more important")  # the extension's 0, 1, 2
# The extension's resize modes by name (its older names too) → RESIZE_MODES' index; its default is Crop and Resize.
CONTROL_RESIZE = {"just resize": 0, "crop and resize": 1, "resize and fill": 2, "scale to fit (inner fit)": 1,
                  "inner fit (scale to fit)": 1, "envelope (outer fit)": 2, "outer fit (shrink to fit)": 2}  # fmt: skip
CONTROLNET_API_VERSION = 2  # what the extension's /controlnet/version answers for the unit shape above


# --- samplers ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One of A1111's samplers and what it is here."""

    name: str
    aliases: tuple[str, ...]
    uniform: str  # ours with the checkpoint's own timestep spacing (A1111's "Uniform" schedule)
    karras: str | None = None  # ours with Karras σ (A1111's "Karras"); None: none here
    karras_by_default: bool = False  # A1111 ≥ 1.9's "Automatic" schedule for it is Karras
    scheduled: bool = True  # False: A1111 applies no schedule to it (its timestep samplers)


SAMPLERS = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpm++2m", karras="dpm++2m-karras", karras_by_default=True),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler-ancestral"),
    Sampler("Euler", ("k_euler",), "euler"),
    Sampler("DDIM", (), "ddim", scheduled=False),
    Sampler("PLMS", (), "plms", scheduled=False),
)
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}  # A1111's names → its labels
OUR_SAMPLERS = ("ddim", "euler", "euler-ancestral", "dpm++2m", "dpm++2m-karras", "plms")  # services.samplers'
_BY_NAME = {name.lower(): s for s in SAMPLERS for name in (s.name, *s.aliases)}


def our_sampler(name: str | None, scheduler: str | None, served: Sequence[str]) -> str | None:
    """A1111's sampler name and scheduler → our sampler (None: the checkpoint's own); Refused when there is none
    here, naming those that work. A name ending in a schedule ("DPM++ 2M Karras") sets it, as in A1111."""
    name = (name or "").strip()
    if not name:
        return None
    if name in OUR_SAMPLERS:
        ours = name
    else:
        base, schedule = name, (scheduler or "").strip().lower() or "automatic"
        for known in SCHEDULES:
            if name.lower().endswith(" " + known):
                base, schedule = name[: -len(known) - 1].strip(), known
                break
        sampler = _BY_NAME.get(base.lower())
        if sampler is None:
            raise invalid(
                f"sampler_name {name!r} is not a sampler here; these work: {', '.join(sampler_names(served))}"
            )
        if sampler.scheduled and schedule not in SCHEDULES:
            raise invalid(f"scheduler {scheduler!r} is not one sdmesh has; give {', '.join(SCHEDULES.values())}")
        karras = schedule == "karras" or (schedule == "automatic" and sampler.karras_by_default)
        if not sampler.scheduled or not karras:
            ours = sampler.uniform
        elif sampler.karras is None:
            raise invalid(f"{sampler.name} with the Karras schedule is not a sampler sdmesh has; give scheduler "
                          "Automatic, or DPM++ 2M (Karras)")  # fmt: skip
        else:
            ours = sampler.karras
    if ours not in served:
        raise invalid(f"sampler_name {name!r} ({ours} here) is not one this model serves; these work: "
                      f"{', '.join(sampler_names(served))}")  # fmt: skip
    return ours


def sampler_names(served: Sequence[str]) -> list[str]:
    """The names that work with a model serving `served`: A1111's, then ours."""
    names = [item.name for item in sampler_items(served)]
    return names + [s for s in OUR_SAMPLERS if s in served]


def a1111_sampler(ours: str) -> tuple[str, str]:
    """Our sampler → A1111's (name, schedule label), for info."""
    for s in SAMPLERS:
        if ours == s.karras:
            return s.name, SCHEDULES["karras"]
        if ours == s.uniform:
            return s.name, SCHEDULES["uniform" if s.karras_by_default else "automatic"]
    return ours, SCHEDULES["automatic"]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str] = Field(description='A1111\'s; "sdmesh": the sampler it is here.')


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


def sampler_items(served: Sequence[str]) -> list[SamplerItem]:
    """The A1111 samplers a model serving `served` has (with its "Automatic" schedule), and "DPM++ 2M Karras", the
    name A1111 < 1.9 clients send."""
    items = []
    for s in SAMPLERS:
        automatic = s.karras if s.karras_by_default and s.karras else s.uniform
        if automatic in served:
            options = {"sdmesh": automatic} | ({"scheduler": "karras"} if s.karras_by_default else {})
            items.append(SamplerItem(name=s.name, aliases=list(s.aliases), options=options))
    if "dpm++2m-karras" in served:
        items.append(SamplerItem(name="DPM++ 2M Karras", aliases=["k_dpmpp_2m_ka"],
                                 options={"scheduler": "karras", "sdmesh": "dpm++2m-karras"}))  # fmt: skip
    return items


# --- requests and answers ----------------------------------------------------------------


class Generation(BaseModel):
    """What A1111's txt2img and img2img share (its StableDiffusionProcessing fields). Fields sdmesh does not do are
    accepted and, when set, named in info.sdmesh_notes."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = Field(-1, description="-1 or none: random. Image i of the call has seed + i.")
    subseed: int | None = Field(-1, description="Ignored (variation seeds).")
    subseed_strength: float = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(None, description='"Euler a", "DPM++ 2M", "DDIM", ... (or ours); none: the '
                                     "checkpoint's own. GET /sdapi/v1/samplers lists them.")  # fmt: skip
    sampler_index: str | None = Field(None, description="Deprecated in A1111: used when sampler_name is empty.")
    scheduler: str | None = Field(None, description='"Automatic" (default), "Uniform" or "Karras".')
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="Pixels; none: the model's own size (A1111: 512).")
    height: int | None = None
    eta: float | None = Field(None, description="DDIM's η; none: 0.")
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    s_min_uncond: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    styles: list[str] | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    script_name: str | None = None
    script_args: list[Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = Field(True, description="False: answer without the images (info only).")
    save_images: bool = Field(False, description="Ignored: nothing is saved on the server.")

    def ignored(self) -> list[str]:
        """The fields set here that sdmesh does not do."""
        named = {
            "restore_faces": self.restore_faces, "tiling": self.tiling, "styles": self.styles,
            "override_settings": sorted(self.override_settings or {}), "alwayson_scripts": self.other_scripts(),
            "script_name": self.script_name, "subseed_strength": self.subseed_strength,
            "seed_resize_from_h": (self.seed_resize_from_h or 0) > 0,
            "seed_resize_from_w": (self.seed_resize_from_w or 0) > 0,
            "s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax,
            "s_noise": self.s_noise not in (None, 1.0), "s_min_uncond": self.s_min_uncond,
            "refiner_checkpoint": self.refiner_checkpoint, "save_images": self.save_images,
        }  # fmt: skip
        return [name for name, value in named.items() if value]

    def other_scripts(self) -> list[str]:
        """The alwayson_scripts sent that sdmesh does not run (all but ControlNet)."""
        return sorted(name for name in self.alwayson_scripts or {} if name.lower() != CONTROLNET_SCRIPT)

    def sampler(self) -> str | None:
        return self.sampler_name or self.sampler_index

    def image_fields(self, seed: int, sampler: str | None, preview_every: int) -> dict[str, Any]:
        """generate_request's fields for one image."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, n=1, steps=self.steps,
                    guidance_scale=self.cfg_scale, sampler=sampler, seed=seed, eta=self.eta or 0.0,
                    preview_every=preview_every)  # fmt: skip


class TextToImageRequest(Generation):
    """A1111's POST /sdapi/v1/txt2img body."""

    enable_hr: bool = Field(False, description="Ignored: no hires fix.")
    denoising_strength: float | None = Field(None, description="The hires fix's; ignored.")
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    def ignored(self) -> list[str]:
        return (["enable_hr"] if self.enable_hr else []) + super().ignored()


class ImageToImageRequest(Generation):
    """A1111's POST /sdapi/v1/img2img body."""

    init_images: list[str] | None = Field(None, description="Base64 PNG/JPEG (data: URLs too): the image to start "
                                          "from; several: one per image of a batch, as A1111.")  # fmt: skip
    resize_mode: int = Field(0, description="To width × height: 0 just resize, 1 crop and resize, 2 resize and fill.")
    denoising_strength: float = Field(DEFAULT_STRENGTH, description="How much of the schedule runs, (0, 1].")
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="Base64 PNG: white repaints, black keeps (with alpha: opaque repaints).")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="Ignored: the masked area starts from the original (A1111's 1).")
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int | bool = Field(0, description="1: repaint black instead of white.")
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False

    def ignored(self) -> list[str]:
        masked = bool(self.mask)
        blur = self.mask_blur if self.mask_blur is not None else max(self.mask_blur_x, self.mask_blur_y)
        named = {
            "mask_blur": masked and blur > 0, "inpaint_full_res": masked and self.inpaint_full_res,
            "inpainting_fill": masked and self.inpainting_fill != 1,  # the masked area starts from the original
            "initial_noise_multiplier": self.initial_noise_multiplier not in (None, 1.0),
            "latent_mask": self.latent_mask, "include_init_images": self.include_init_images,
        }  # fmt: skip
        return super().ignored() + [name for name, value in named.items() if value]


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    parameters: dict[str, Any] = Field(description="The request as read.")
    info: str = Field(description="JSON: seed, all_seeds (image i's own), prompts, sizes, sampler, sdmesh_notes.")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = Field(default=0, description="Images of the call in progress; 0: none.")
    job_timestamp: str = "0"
    job_no: int = Field(default=0, description="Its images done.")
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1 over the whole call.")
    eta_relative: float = Field(description="Seconds left at the rate so far.")
    state: ProgressState
    current_image: str | None = Field(default=None, description="Base64 PNG of the image being made (a live preview).")
    textinfo: str | None = None
    current_task: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


# --- a call's images: one gateway request each ------------------------------------------


class Batch:
    """One txt2img/img2img call in progress: its images' jobs (one gateway request each). Only the event loop
    touches it."""

    def __init__(self, tenant: Tenant, kind: str, count: int):
        self.tenant, self.kind, self.count = tenant, kind, count
        self.jobs: list[Job] = []
        self.interrupted = False
        self.started = time.time()

    @property
    def progress(self) -> float:
        return sum(job.progress for job in self.jobs) / self.count

    def pending(self) -> list[Job]:
        """Its jobs that have not yet given their places back."""
        return [job for job in self.jobs if job.finished is None]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def interrupt(self) -> None:
        self.interrupted = True
        self.cancel()

    def check(self) -> None:
        """Raise the first job's error, unless it is the cancellation an interrupt asked for."""
        for job in self.jobs:
            if job.done and job.error is not None and not (self.interrupted and job.state == "cancelled"):
                raise job.error


async def run_batch(front: Front, batch: Batch, requests: list[gateway_pb2.GenerateRequest], http: Request) -> None:
    """Submit the images' requests in turn and wait for all of them; raises the first one's error (the others are
    cancelled). An interrupt stops it with what is done; a client that hangs up cancels it."""
    try:
        for request in requests:
            job = await _admit(front, batch, request, http)
            if job is None:  # interrupted before its turn
                break
            batch.jobs.append(job)
            if batch.interrupted:  # the interrupt came while the gateway admitted it
                job.cancel()
        await _settle(batch, http, lambda: not batch.pending())
        batch.check()
    except BaseException:
        batch.cancel()
        raise
    finally:
        for job in batch.jobs:
            front.jobs.forget(job)


async def _admit(front: Front, batch: Batch, request: gateway_pb2.GenerateRequest, http: Request) -> Job | None:
    """The next image's job; when the tenant or the gateway has no place for it, wait for one of the batch's own to
    end and try again (refused only when none of the batch is running)."""
    while not batch.interrupted:
        try:
            return await front.submit(request, batch.tenant)
        except Refused as e:
            running = len(batch.pending())
            if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED or not running:
                raise
        await _settle(batch, http, _fewer_than(batch, running))
    return None


def _fewer_than(batch: Batch, running: int) -> Callable[[], bool]:
    return lambda: len(batch.pending()) < running


async def _settle(batch: Batch, http: Request, done: Callable[[], bool]) -> None:
    """Wait until done(); a failed image raises at once."""
    while not done():
        batch.check()
        job = batch.pending()[0]
        if job.done:
            await asyncio.sleep(0.005)  # its thread is giving its places back
        else:
            await job.changed(job.version, timeout=0.5)
        if await http.is_disconnected():
            batch.cancel()


def image_seeds(seed: int | None, batch_size: int, n_iter: int) -> list[int]:
    """Each image's seed, A1111's way: seed + i (seed -1 or none: drawn, as A1111, in [0, 2^32))."""
    for name, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if value < 1:
            raise invalid(f"{name}: {value} is out of range; give a whole number from 1")
    n = batch_size * n_iter
    if n > contract.MAX_IMAGES:
        raise invalid(f"batch_size × n_iter is {n} images; at most {contract.MAX_IMAGES} in one call")
    first = random.SystemRandom().randrange(2**32) if seed is None or seed == -1 else seed
    return [first + i for i in range(n)]


def answer(body: Generation, batch: Batch, seeds: list[int], *, sampler: str, size: tuple[int, int],
           model: tuple[str, str], notes: list[str], strength: float | None) -> GenerationResponse:  # fmt: skip
    """A1111's answer: the finished images in order, the request, and info (a JSON string, as A1111's). model: the
    (name, hash) the call asked for; the images' own when they say."""
    made = [job for job in batch.jobs if job.state == "succeeded"]
    model_name, model_hash = next(((job.model, job.model_hash) for job in made if job.model), model)
    name, schedule = a1111_sampler(sampler)
    width, height = size
    if batch.interrupted:
        notes = [f"interrupted: {len(made)} of {batch.count} images were made; sdmesh gives only finished ones"] + notes
    for job in made[:1]:
        notes = notes + job.notes  # prompts cut at the tokenizer's limit
    subseed = body.subseed if body.subseed is not None else -1

    def infotext(seed: int | None) -> str:
        negative = f"\nNegative prompt: {body.negative_prompt}" if body.negative_prompt else ""
        fields = [f"Steps: {body.steps}", f"Sampler: {name}", f"Schedule type: {schedule}", f"CFG scale: "
                  f"{body.cfg_scale}", f"Seed: {seed}", f"Size: {width}x{height}"]  # fmt: skip
        fields += [f"Model hash: {model_hash}"] if model_hash else []
        fields.append(f"Model: {model_name}")
        if strength is not None:
            fields.append(f"Denoising strength: {strength}")
        return f"{body.prompt}{negative}\n{', '.join(fields + ['Version: sdmesh'])}"

    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(made), "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(made), "seed": seeds[0],
        "all_seeds": [job.seed for job in made], "subseed": subseed, "all_subseeds": [subseed] * len(made),
        "subseed_strength": body.subseed_strength, "width": width, "height": height, "sampler_name": name,
        "scheduler": schedule, "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "restore_faces": bool(body.restore_faces), "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash or None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w, "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": strength, "extra_generation_params": {"Schedule type": schedule},
        "index_of_first_image": 0, "infotexts": [infotext(job.seed) for job in made], "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(batch.started)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "sdmesh",
        "sdmesh_sampler": sampler, "sdmesh_notes": notes,
    }  # fmt: skip
    images = [base64.b64encode(job.images[0]).decode("ascii") for job in made] if body.send_images else []
    parameters = body.model_dump()
    if isinstance(body, ImageToImageRequest) and not body.include_init_images:  # as A1111: not echoed back
        parameters["init_images"], parameters["mask"] = None, None
    return GenerationResponse(images=images, parameters=parameters, info=json.dumps(info))


def ignored_note(body: Generation, applied: Sequence[str] = ()) -> list[str]:
    """The note naming what the call set that sdmesh did not do; `applied`: override_settings that it did."""
    overrides = sorted(set(body.override_settings or {}) - set(applied))
    listed = {"override_settings": overrides, "alwayson_scripts": body.other_scripts()}
    names = [f"{n} ({', '.join(listed[n])})" if listed.get(n) else n for n in body.ignored()
             if n != "override_settings" or overrides]  # fmt: skip
    return [f"ignored (sdmesh does not do them): {', '.join(names)}"] if names else []


# --- images -----------------------------------------------------------------------------


def _opened(data: bytes) -> Image.Image | None:
    """The picture in `data`, turned by its EXIF orientation as the gateway reads it; None for what is not an image
    or is past MAX_SIDE (passed on as it is, for the gateway to refuse with its own message)."""
    try:
        picture = Image.open(io.BytesIO(data))
        if max(picture.size) > contract.MAX_SIDE:
            return None
        picture.load()
        return ImageOps.exif_transpose(picture)
    except Exception:
        return None


def _transparent(picture: Image.Image) -> bool:
    return "A" in picture.getbands() or "transparency" in picture.info


def _on_white(picture: Image.Image) -> Image.Image:
    """RGB, transparent pixels flattened onto BACKGROUND."""
    if _transparent(picture):
        rgba = picture.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        flat.alpha_composite(rgba)
        picture = flat
    return picture.convert("RGB")


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def resize_image(picture: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize_mode (its images.resize_image, without upscalers): 0 just resize (PIL Lanczos; 3, its latent
    variant, the same here); 1 crop and resize: cover width × height, crop the centre; 2 resize and fill: fit inside,
    centre, stretch the edge rows (or columns) into the bars."""
    lanczos = Image.Resampling.LANCZOS
    if mode not in (1, 2):
        return picture.resize((width, height), resample=lanczos)
    ratio, src_ratio = width / height, picture.width / picture.height
    if mode == 1:  # the scaled picture covers width × height
        src_w = width if ratio > src_ratio else picture.width * height // picture.height
        src_h = height if ratio <= src_ratio else picture.height * width // picture.width
    else:  # it fits inside
        src_w = width if ratio < src_ratio else picture.width * height // picture.height
        src_h = height if ratio >= src_ratio else picture.height * width // picture.width
    resized = picture.resize((src_w, src_h), resample=lanczos)
    out = Image.new(picture.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio and (fill := height // 2 - src_h // 2) > 0:  # bars above and below
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, src_h, width, src_h)), box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio and (fill := width // 2 - src_w // 2) > 0:  # bars left and right
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(src_w, 0, src_w, height)), box=(fill + src_w, 0))
    return out


def init_image(
    data: bytes, size: tuple[int | None, int | None], resize_mode: int
) -> tuple[bytes, tuple[int, int] | None]:
    """An A1111 init image as the gateway takes it, and its size: transparent pixels flattened onto white, resized
    to `size` (width, height; a None side: the image's own) by resize_mode. Unchanged bytes when nothing changes;
    size None for bytes that are no image (the gateway refuses them)."""
    picture = _opened(data)
    if picture is None:
        return data, None
    target = (size[0] or picture.width, size[1] or picture.height)
    if not _transparent(picture) and picture.size == target:
        return data, target
    picture = _on_white(picture)
    if picture.size != target:
        picture = resize_image(picture, resize_mode, *target)
    return _png(picture), target


def mask_image(data: bytes, size: tuple[int, int], resize_mode: int, invert: bool) -> bytes:
    """An A1111 mask as the gateway takes it (grayscale, white repaints): a mask with transparency is read by its
    alpha (A1111's create_binary_mask: alpha > 128 repaints), any other by its brightness; inverted on request;
    resized to `size` as the init image was."""
    picture = _opened(data)
    if picture is None:
        return data
    alpha = picture.convert("RGBA").getchannel("A") if _transparent(picture) else None
    if alpha is not None and alpha.getextrema() != (255, 255):
        gray = alpha.point(lambda v: 255 if v > 128 else 0)
    else:
        gray = picture.convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    if gray.size != size:
        gray = resize_image(gray, resize_mode, *size)
    return _png(gray)


def prepared_images(body: ImageToImageRequest) -> tuple[list[bytes], bytes, tuple[int, int]]:
    """(init images, mask, output size) as the gateway takes them, all at the first init image's output size.
    Blocking (PIL): call from a worker thread."""
    for name, side in (("width", body.width), ("height", body.height)):
        if side is not None and not 0 <= side <= contract.MAX_SIDE:
            raise invalid(f"{name}: {side} is out of range; give 1 to {contract.MAX_SIDE} pixels, or none")
    sent = [decode_base64(text, f"init_images[{i}]") for i, text in enumerate(body.init_images or [])]
    if not sent or not sent[0]:
        raise invalid("init_images: give the image to start from (base64 PNG or JPEG)")
    first, size = init_image(sent[0], (body.width, body.height), body.resize_mode)
    mask = decode_base64(body.mask, "mask")
    if size is None:  # not an image: the gateway says so
        return sent, mask, (0, 0)
    inits = [first] + [init_image(data, size, body.resize_mode)[0] for data in sent[1:]]
    if mask:
        mask = mask_image(mask, size, body.resize_mode, bool(body.inpainting_mask_invert))
    return inits, mask, size


# --- ControlNet units (the sd-webui-controlnet extension's) --------------------------------


class ControlNetUnit(BaseModel):
    """One of the extension's units, as webuiapi's ControlNetUnit.to_dict() sends it (`input_image`: the extension's
    older name for `image`). Fields sdmesh does not use are accepted."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    image: str | dict[str, Any] | None = Field(None, description="Base64 PNG/JPEG, or {image, mask}.")
    input_image: str | None = None
    mask: Any = None
    module: str | None = Field("none", description='The preprocessor: "none" (the image is the map) or "canny".')
    model: str | None = Field("None", description="A ControlNet the denoiser loaded (/controlnet/model_list).")
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = Field(0, description='0 Balanced, 1 My prompt is more important, 2 ControlNet is more '
                                    "important (guess mode).")  # fmt: skip
    guessmode: bool | int | None = None  # the extension's older spelling of control_mode 2
    threshold_a: float | None = Field(-1, description="canny's low threshold; -1: 100.")
    threshold_b: float | None = Field(-1, description="canny's high threshold; -1: 200.")
    resize_mode: int | str = Field("Crop and Resize", description='"Just Resize", "Crop and Resize" or "Resize and '
                                   'Fill" (or 0, 1, 2): how the image meets the output size.')  # fmt: skip
    pixel_perfect: bool = False
    processor_res: int | None = -1


def control_units(body: Generation) -> list[tuple[str, ControlNetUnit]]:
    """The enabled units of alwayson_scripts' controlnet, each with its field name for messages; a unit of the wrong
    shape is 422 naming its field, as the body's own fields are."""
    scripts = {name.lower(): value for name, value in (body.alwayson_scripts or {}).items()}
    script = scripts.get(CONTROLNET_SCRIPT)
    if script is None:
        return []
    loc = ("body", "alwayson_scripts", CONTROLNET_SCRIPT, "args")
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise RequestValidationError([{"loc": loc, "msg": 'give {"args": [unit, ...]}', "type": "list_type"}])
    units = []
    for i, unit in enumerate(args):
        try:
            parsed = ControlNetUnit.model_validate(unit)
        except ValidationError as e:
            raise RequestValidationError([{**error, "loc": (*loc, i, *error["loc"])} for error in e.errors()]) from None
        if parsed.enabled:
            units.append((f"alwayson_scripts.controlnet.args[{i}]", parsed))
    return units


def control_messages(units: list[tuple[str, ControlNetUnit]], size: tuple[int, int] | None, init: bytes | None,
                     loaded: Sequence[str]) -> tuple[list[gateway_pb2.Control], list[str]]:  # fmt: skip
    """The units as the gateway's Controls, and notes on what was done otherwise; `size` is the output's (width,
    height) when known, `init` img2img's init image (a unit without an image uses it). What the gateway checks
    (names, numbers, image bytes) it refuses in its own words. Blocking (PIL): call from a worker thread."""
    controls, notes = [], []
    for field, unit in units:
        module = (unit.module or "none").strip().lower()
        if module not in CONTROL_MODULES:
            raise invalid(f"{field}.module: {unit.module!r} is not a preprocessor sdmesh has; give none (and send the "
                          "map your preprocessor made) or canny")  # fmt: skip
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", (unit.model or "").strip())  # A1111's "name [hash]"
        if name in ("", "None"):
            raise invalid(f"{field}.model: give the ControlNet to use; this server has "
                          f"{', '.join(loaded) or 'none'} (GET /controlnet/model_list)")  # fmt: skip
        mode = unit.control_mode
        index = int(mode) if isinstance(mode, int) or mode.strip().isdigit() else None
        if index is None and isinstance(mode, str) and mode.strip().lower() in CONTROL_MODES:
            index = CONTROL_MODES.index(mode.strip().lower())
        if index is None or not 0 <= index < len(CONTROL_MODES):
            raise invalid(f"{field}.control_mode: {mode!r}; give 0 (Balanced), 1 (My prompt is more important) or 2 "
                          "(ControlNet is more important)")  # fmt: skip
        # The extension's "ControlNet is more important" runs the ControlNet on the conditional pass only, its
        # residuals ramped up through the blocks: diffusers' guess mode, which sdmesh has. "My prompt is more
        # important" weakens the residuals layer by layer, which sdmesh does not do: it is Balanced here.
        guess = index == 2 or bool(unit.guessmode)
        if index == 1:
            notes.append(f"{field}: control_mode 'My prompt is more important' is done as Balanced")
        raw = unit.image.get("image") if isinstance(unit.image, dict) else unit.image
        data = decode_base64(raw or unit.input_image, f"{field}.image")
        if not data and init is None:
            raise invalid(f"{field}.image: give the control image (base64 PNG or JPEG)")
        resize = control_resize(unit.resize_mode, field)
        control = gateway_pb2.Control(
            name=name, image=control_picture(data, size, resize) if data else init, scale=unit.weight,
            start=unit.guidance_start, end=unit.guidance_end, guess_mode=guess, preprocessor=module,
        )  # fmt: skip
        if module == "canny":  # the extension's -1: the preprocessor's own default
            for threshold, value in (("low_threshold", unit.threshold_a), ("high_threshold", unit.threshold_b)):
                if value is not None and value >= 0:
                    setattr(control, threshold, value)
        if unit.mask or (isinstance(unit.image, dict) and unit.image.get("mask")):
            notes.append(f"{field}: the unit's mask is not used")
        controls.append(control)
    return controls, notes


def control_resize(mode: int | str, field: str) -> int:
    """The extension's resize_mode (a name or 0–2) as RESIZE_MODES' index."""
    index = mode if isinstance(mode, int) else CONTROL_RESIZE.get(mode.strip().lower())
    if index is None and isinstance(mode, str) and mode.strip().isdigit():
        index = int(mode)
    if index is None or not 0 <= index <= 2:
        raise invalid(f"{field}.resize_mode: {mode!r}; give Just Resize, Crop and Resize or Resize and Fill (0, 1, 2)")
    return index


def control_picture(data: bytes, size: tuple[int, int] | None, resize_mode: int) -> bytes:
    """A control image as the gateway takes it: transparent pixels flattened onto white (the extension's reading of
    alpha), and for crop-and-resize or resize-and-fill, brought to `size` (width, height) by that mode; just resize
    is the gateway's (Lanczos). Unchanged bytes when nothing changes, and for bytes that are no image (the gateway
    refuses them)."""
    picture = _opened(data)
    if picture is None:
        return data
    resize = resize_mode in (1, 2) and size is not None and picture.size != size
    if not _transparent(picture) and not resize:
        return data
    picture = _on_white(picture)
    if resize and size is not None:
        picture = resize_image(picture, resize_mode, *size)
    return _png(picture)


# --- the routes -------------------------------------------------------------------------


def a1111_caller(request: Request) -> Tenant:
    """The caller's tenant from `Authorization: Bearer KEY` or `X-API-Key`, or from HTTP Basic auth with the key as
    the password (A1111's --api-auth, which webuiapi's username/password send); the user name is not read."""
    front: Front = request.app.state.front
    auth = request.headers.get("authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            password = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            password = ""
        return front.tenant({"authorization": f"Bearer {password}"})
    return front.tenant(request.headers)


A1111Caller = Annotated[Tenant, Depends(a1111_caller)]


def router(front: Front) -> APIRouter:
    """The A1111 routes."""
    api = APIRouter(tags=["AUTOMATIC1111"])
    batches: list[Batch] = []  # the calls in progress, for /progress and /interrupt
    every = front.preview_every  # previews for /progress's current_image
    checkpoints: dict[str, str] = {}  # tenant → the model its POST /options sd_model_checkpoint named

    async def facts(who: Tenant, model: str | None = None) -> ModelFacts:
        """The facts of `model` (as a request's), by default the caller's model."""
        return await asyncio.to_thread(front.facts, checkpoints.get(who.name, "") if model is None else model)

    async def checkpoint(body: Generation, who: Tenant) -> tuple[str, tuple[str, str], list[str]]:
        """The model a call runs on: what it sends as the requests' `model`, its (name, hash), and the
        override_settings applied. An override naming no model served here is left to ignored_note (A1111 falls back
        to its default checkpoint too)."""
        wanted = (body.override_settings or {}).get("sd_model_checkpoint")
        if isinstance(wanted, str) and wanted.strip():
            try:
                return wanted, await asyncio.to_thread(front.model, wanted), ["sd_model_checkpoint"]
            except Refused as e:
                if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
        mine = checkpoints.get(who.name, "")
        return mine, await asyncio.to_thread(front.model, mine), []

    async def generate(batch: Batch, requests: list[gateway_pb2.GenerateRequest], http: Request) -> None:
        batches.append(batch)
        try:
            await run_batch(front, batch, requests, http)
        finally:
            batches.remove(batch)

    @api.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    async def txt2img(body: TextToImageRequest, request: Request, who: A1111Caller) -> GenerationResponse:
        """Text to image, as A1111's: batch_size × n_iter images, image i from seed + i."""
        chosen, model, applied = await checkpoint(body, who)
        served = await facts(who, chosen)
        sampler = our_sampler(body.sampler(), body.scheduler, served.samplers)
        seeds = image_seeds(body.seed, body.batch_size, body.n_iter)
        native = served.default_size or (0, 0)
        size = (body.width or native[1], body.height or native[0])
        controls, control_notes = await asyncio.to_thread(
            control_messages, control_units(body), size if all(size) else None, None, served.controlnets
        )
        requests = [generate_request(width=body.width, height=body.height, controls=controls, model=chosen,
                                     **body.image_fields(seed, sampler, every))
                    for seed in seeds]  # fmt: skip
        batch = Batch(who, "txt2img", len(seeds))
        await generate(batch, requests, request)
        return answer(body, batch, seeds, sampler=sampler or served.default_sampler, size=size, model=model,
                      notes=ignored_note(body, applied) + control_notes, strength=None)  # fmt: skip

    @api.post("/sdapi/v1/img2img", response_model=GenerationResponse)
    async def img2img(body: ImageToImageRequest, request: Request, who: A1111Caller) -> GenerationResponse:
        """Image to image, as A1111's: init_images[0] (one per image of a batch when several), resized to width ×
        height by resize_mode; with a mask, inpainting (white repaints; inpainting_mask_invert=1: black)."""
        chosen, model, applied = await checkpoint(body, who)
        served = await facts(who, chosen)
        sampler = our_sampler(body.sampler(), body.scheduler, served.samplers)
        if not 0 <= body.resize_mode < len(RESIZE_MODES):
            raise invalid(f"resize_mode: {body.resize_mode}; give 0 ({RESIZE_MODES[0]}), 1 ({RESIZE_MODES[1]}), "
                          f"2 ({RESIZE_MODES[2]}) or 3")  # fmt: skip
        inits, mask, size = await asyncio.to_thread(prepared_images, body)
        per_batch = body.batch_size
        if len(inits) > 1:  # A1111: one init image per image of the batch
            if len(inits) > body.batch_size:
                raise invalid(f"init_images: {len(inits)} images for batch_size {body.batch_size}; give one, or at "
                              "most batch_size")  # fmt: skip
            per_batch = len(inits)
        seeds = image_seeds(body.seed, per_batch, body.n_iter)
        strength = body.denoising_strength
        controls, control_notes = await asyncio.to_thread(
            control_messages, control_units(body), size if all(size) else None, inits[0], served.controlnets
        )
        requests = [generate_request(init_image=inits[i % len(inits)], mask_image=mask, strength=strength,
                                     controls=controls, model=chosen, **body.image_fields(seed, sampler, every))
                    for i, seed in enumerate(seeds)]  # fmt: skip
        batch = Batch(who, "img2img", len(seeds))
        await generate(batch, requests, request)
        notes = ignored_note(body, applied) + control_notes
        if body.resize_mode == 3:
            notes.append("resize_mode 3 (latent upscale): resized in pixels, as resize_mode 0")
        return answer(body, batch, seeds, sampler=sampler or served.default_sampler, size=size, model=model,
                      notes=notes, strength=strength)  # fmt: skip

    @api.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(who: A1111Caller, skip_current_image: bool = False) -> ProgressResponse:
        """The caller's latest call in progress (or its latest running /v1/jobs job); all zero when none runs."""
        mine = [b for b in batches if b.tenant.name == who.name]
        batch = mine[-1] if mine else None
        if batch is None:
            job = front.jobs.latest(who)
            if job is None or job.done:
                return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
            batch = Batch(who, "job", 1)
            batch.jobs.append(job)
            batch.started = job.started or job.created
        running = [job for job in batch.jobs if not job.done]
        current = running[0] if running else (batch.jobs[-1] if batch.jobs else None)
        done = sum(job.state == "succeeded" for job in batch.jobs)
        fraction = batch.progress
        elapsed = time.time() - batch.started
        state = ProgressState(
            interrupted=batch.interrupted, job=batch.kind, job_count=batch.count, job_no=done,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(batch.started)),
            sampling_step=current.step if current else 0, sampling_steps=current.total_steps if current else 0,
        )  # fmt: skip
        image = None
        preview = next((job.preview for job in ([current] if current else []) + running if job.preview), b"")
        if preview and not skip_current_image:  # A1111 sends a PNG; the denoiser's previews are JPEGs
            image = base64.b64encode(await asyncio.to_thread(_png_of, preview)).decode("ascii")
        return ProgressResponse(
            progress=round(fraction, 4), eta_relative=elapsed / fraction - elapsed if fraction > 0 else 0.0,
            state=state, current_image=image,
            textinfo=f"image {min(done + 1, batch.count)} of {batch.count}, step {state.sampling_step} of "
                     f"{state.sampling_steps}",
        )  # fmt: skip

    @api.post("/sdapi/v1/interrupt")
    async def interrupt(who: A1111Caller) -> dict[str, Any]:
        """Stop the caller's running generations: a txt2img/img2img call answers at once with the images finished
        before (sdmesh has no partly made ones to give)."""
        stop(who)
        return {}

    @api.post("/sdapi/v1/skip")
    async def skip(who: A1111Caller) -> dict[str, Any]:
        """As /interrupt (A1111 skips the current image and goes on; every image here runs at once)."""
        stop(who)
        return {}

    def stop(who: Tenant) -> None:
        for batch in batches:
            if batch.tenant.name == who.name:
                batch.interrupt()
        for job in front.jobs.running(who):
            job.cancel()

    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers(who: A1111Caller) -> list[SamplerItem]:
        """A1111's samplers that the caller's model serves, with their aliases; options.sdmesh names ours."""
        return sampler_items((await facts(who)).samplers)

    @api.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def schedulers(who: A1111Caller) -> list[SchedulerItem]:
        """The schedules a sampler_name takes: Automatic (its own), Uniform, and Karras where DPM++ 2M Karras is
        served."""
        served = (await facts(who)).samplers
        items = [SchedulerItem(name="automatic", label="Automatic"), SchedulerItem(name="uniform", label="Uniform")]
        if "dpm++2m-karras" in served:
            items.append(SchedulerItem(name="karras", label="Karras", default_rho=7.0))
        return items

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models(who: A1111Caller) -> list[SDModelItem]:
        """The gateway's models, its default first: title "name [hash]" (what sd_model_checkpoint takes), the short
        hash its denoiser reports, filename its checkpoint; sha256 is not known."""
        return [SDModelItem(title=model_title(m.name, m.hash), model_name=m.name, hash=m.hash or None,
                            filename=m.source or m.name)
                for m in await asyncio.to_thread(front.models)]  # fmt: skip

    @api.get("/sdapi/v1/loras", response_model=list[LoraItem])
    async def loras(who: A1111Caller) -> list[LoraItem]:
        """The LoRA files the stages hold, as A1111's Lora extension lists them: `<lora:NAME:W>` uses one."""
        found = await asyncio.to_thread(front.adapters)
        return [LoraItem(name=a.name, alias=a.name, path=a.name, metadata={}) for a in found if a.kind == "lora"]

    @api.get("/sdapi/v1/embeddings")
    async def embeddings(who: A1111Caller) -> dict[str, Any]:
        """Textual-inversion embeddings: those a prompt can name, and those skipped (made for another model)."""
        found = [a for a in await asyncio.to_thread(front.adapters) if a.kind == "embedding"]
        item = lambda a: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                          "vectors": a.rank}  # fmt: skip
        return {"loaded": {a.name: item(a) for a in found if not a.error},
                "skipped": {a.name: item(a) for a in found if a.error}}  # fmt: skip

    @api.get("/sdapi/v1/options")
    async def get_options(who: A1111Caller) -> dict[str, Any]:
        """A few of A1111's settings, as they are here: sd_model_checkpoint is the caller's model's title."""
        title = model_title(*await asyncio.to_thread(front.model, checkpoints.get(who.name, "")))
        return {
            "sd_model_checkpoint": title, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "samples_format": "png", "eta_ddim": 0.0, "eta_ancestral": 1.0,
            "live_previews_enable": front.preview_every > 0, "show_progress_every_n_steps": front.preview_every,
            "img2img_background_color": "#ffffff",
        }  # fmt: skip

    @api.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any], who: A1111Caller) -> dict[str, Any]:
        """sd_model_checkpoint naming a model served here is the caller's (its tenant's) model from then on; the other
        settings are the gateway operator's, accepted and ignored."""
        wanted, notes = options.get("sd_model_checkpoint"), []
        applied = False
        if isinstance(wanted, str):
            try:
                await asyncio.to_thread(front.model, wanted)
                checkpoints[who.name], applied = wanted, True
            except Refused as e:
                if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                notes.append(f"sd_model_checkpoint: {e.message}")
        rest = sorted(set(options) - ({"sd_model_checkpoint"} if applied else set()))
        if rest or not applied:
            notes.insert(0, f"settings are not changed over this API; ignored: {', '.join(rest) or 'none'}")
        return {"sdmesh_notes": notes}

    @api.get("/controlnet/model_list", tags=["ControlNet"])
    async def controlnet_models(who: A1111Caller, update: bool = True) -> dict[str, list[str]]:
        """The ControlNets the denoiser loaded (its --controlnet names), as the sd-webui-controlnet extension lists
        them: a unit's `model`. `update` is accepted (the list is the denoiser's)."""
        return {"model_list": list((await facts(who)).controlnets)}

    @api.get("/controlnet/module_list", tags=["ControlNet"])
    async def controlnet_modules(who: A1111Caller, alias_names: bool = False) -> dict[str, list[str]]:
        """The preprocessors a unit's `module` may name: none (the image is the map) and canny."""
        return {"module_list": list(CONTROL_MODULES)}

    @api.get("/controlnet/version", tags=["ControlNet"])
    async def controlnet_version(who: A1111Caller) -> dict[str, int]:
        """The extension's API version whose units this front reads."""
        return {"version": CONTROLNET_API_VERSION}

    @api.get("/sdapi/v1/scripts")
    async def scripts(who: A1111Caller) -> dict[str, list[str]]:
        """No scripts or extensions (webuiapi asks, to find ControlNet and the like)."""
        return {"txt2img": [], "img2img": []}

    return api


def _png_of(data: bytes) -> bytes:
    """A preview (JPEG) as PNG."""
    with Image.open(io.BytesIO(data)) as picture:
        return _png(picture.convert("RGB"))
