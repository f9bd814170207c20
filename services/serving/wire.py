"""The contract's types ↔ their sdmesh.v1 messages, for the services that send and receive them. JAX-free.

    facts_to_proto(facts) / facts_from_proto(message, source=...)      ModelFacts ↔ common.ModelFacts
    denoise_job_to_proto(job) / denoise_job_from_proto(request, facts) DenoiseJob ↔ DenoiseRequest
    latent_preview_to_proto(map) / latent_preview_from_proto(message)  LatentPreview ↔ common.LatentPreview

Arrays are NHWC inside and NCHW on the wire (as diffusers' latents); tensors are checked on arrival
(`sdmesh.v1.tensors`). What a value may be is `contract`'s business: these functions only move it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import ControlInput, DenoiseJob, LatentPreview, LoraChoice, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.v1 import common_pb2, denoiser_pb2
from sdmesh.v1.tensors import from_proto, to_proto


def facts_to_proto(facts: ModelFacts) -> common_pb2.ModelFacts:
    height, width = facts.default_size or (0, 0)
    return common_pb2.ModelFacts(
        kind=facts.kind, vae_scale_factor=facts.vae_scale_factor, latent_channels=facts.latent_channels,
        default_height=height, default_width=width, max_steps=facts.max_steps, samplers=list(facts.samplers),
        default_sampler=facts.default_sampler, hidden_size=facts.hidden_size, max_length=facts.max_length,
        prediction_type=facts.prediction_type, extra_channels=facts.extra_channels,
        has_class_labels=facts.class_labels_shape is not None, class_labels_shape=list(facts.class_labels_shape or ()),
        max_noise_level=facts.max_noise_level, max_images=contract.MAX_IMAGES, controlnets=list(facts.controlnets),
    )  # fmt: skip


def facts_from_proto(message: common_pb2.ModelFacts, *, source: str) -> ModelFacts:
    """The facts a Denoiser (or Gateway) reported; a message without them is an error naming `source`."""
    if not message.kind or not message.vae_scale_factor or not message.max_steps or not message.samplers:
        raise ValueError(
            f"{source} reported no model facts in its ModelInfo (kind, vae_scale_factor, max_steps, samplers); "
            "it may run an older sdmesh: run the same version on every service"
        )
    size = (message.default_height, message.default_width) if message.default_height and message.default_width else None
    return ModelFacts(
        kind=message.kind, vae_scale_factor=message.vae_scale_factor, latent_channels=message.latent_channels,
        default_size=size, max_steps=message.max_steps, samplers=tuple(message.samplers),
        default_sampler=message.default_sampler, hidden_size=message.hidden_size, max_length=message.max_length,
        prediction_type=message.prediction_type, extra_channels=message.extra_channels,
        class_labels_shape=tuple(message.class_labels_shape) if message.has_class_labels else None,
        max_noise_level=message.max_noise_level, controlnets=tuple(message.controlnets),
    )  # fmt: skip


def latent_preview_to_proto(projection: LatentPreview) -> common_pb2.LatentPreview:
    return common_pb2.LatentPreview(
        weights=np.asarray(projection.weights, np.float32).ravel().tolist(),  # (3, C) row-major
        bias=np.asarray(projection.bias, np.float32).ravel().tolist(),
    )


def latent_preview_from_proto(message: common_pb2.LatentPreview) -> LatentPreview:
    """The map as sent: 3 × C weights as (3, C) (any other count kept flat, for the contract's check to name)."""
    weights = np.asarray(message.weights, np.float32)
    bias = np.asarray(message.bias, np.float32)
    return LatentPreview(weights=weights.reshape(3, -1) if weights.size and weights.size % 3 == 0 else weights,
                         bias=bias)  # fmt: skip


def nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2))


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def denoise_job_to_proto(job: DenoiseJob) -> denoiser_pb2.DenoiseRequest:
    request = denoiser_pb2.DenoiseRequest(
        cond=to_proto(np.asarray(job.cond, np.float32)), num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale, guidance_rescale=job.guidance_rescale, eta=job.eta, height=job.height,
        width=job.width, sampler=job.sampler or "", priority=job.priority, tenant=job.tenant,
        guidance_cutoff=job.guidance_cutoff if job.guidance_cutoff < 1 else 0.0,
        preview_every=job.preview_every, loras=[common_pb2.Lora(name=n, weight=w) for n, w in job.loras],
    )  # fmt: skip
    if job.preview_projection is not None:
        request.preview_projection.CopyFrom(latent_preview_to_proto(job.preview_projection))
    if job.uncond is not None:
        request.uncond.CopyFrom(to_proto(np.asarray(job.uncond, np.float32)))
    request.noise_seed = job.seed
    if job.latents is None:
        request.seed = job.seed
    else:
        request.latents.CopyFrom(to_proto(nchw(job.latents)))
    if job.init_latents is not None:
        request.init_latents.CopyFrom(to_proto(nchw(job.init_latents)))
        request.strength = job.strength
    for name in ("extra", "blend_mask"):
        value = getattr(job, name)
        if value is not None:
            getattr(request, name).CopyFrom(to_proto(nchw(value)))
    if job.class_labels is not None:
        request.class_labels.CopyFrom(to_proto(np.asarray(job.class_labels, np.float32)))
    for control in job.controls:
        request.controls.add(name=control.name, image=to_proto(nchw(control.image)), scale=control.scale,
                             start=control.start, end=control.end, guess_mode=control.guess_mode)  # fmt: skip
    return request


def control_input_from_proto(message: denoiser_pb2.ControlInput) -> ControlInput:
    """A ControlInput message as the contract's (scale and end unset → 1); the values are `contract`'s to check."""
    if not message.HasField("image"):
        raise InvalidRequest(f"ControlNet {message.name!r}: image is missing; send its map, (1, 3, H, W) float32")
    image = nhwc(from_proto(message.image, name=f"ControlNet {message.name!r} image", dtype="float32", ndim=4))
    return ControlInput(
        name=message.name, image=image, scale=message.scale if message.HasField("scale") else 1.0,
        start=message.start, end=message.end if message.HasField("end") else 1.0, guess_mode=message.guess_mode,
    )  # fmt: skip


def denoise_job_from_proto(request: denoiser_pb2.DenoiseRequest, facts: ModelFacts) -> DenoiseJob:
    """A DenoiseRequest as a DenoiseJob (defaults filled: the native size); raises InvalidRequest or TensorError.
    The values are checked by `contract.check_denoise_job` (the stage's `check`)."""
    if not request.HasField("cond"):
        raise InvalidRequest("cond is missing: send the text encoder's conditioning, (N, L, D) float32")
    cond = from_proto(request.cond, name="cond", dtype="float32", ndim=3)
    uncond = from_proto(request.uncond, name="uncond", dtype="float32", ndim=3) if request.HasField("uncond") else None
    f = facts.vae_scale_factor
    which = request.WhichOneof("init")
    if which == "latents":
        latents = nhwc(from_proto(request.latents, name="latents", dtype="float32", ndim=4))  # (N, h, w, C)
        height, width, seed = latents.shape[1] * f, latents.shape[2] * f, request.noise_seed
        for name, asked, got in (("height", request.height, height), ("width", request.width, width)):
            if asked and asked != got:
                raise InvalidRequest(
                    f"{name} {asked} disagrees with the latents' {got // f} × {f} = {got} pixels; send 0 or {got}"
                )
    elif which == "seed":
        latents, height, width, seed = None, request.height, request.width, request.seed
        if not height or not width:
            if facts.default_size is None:
                raise InvalidRequest(
                    "this UNet's config names no sample_size, so there is no default size: give height and width"
                )
            height, width = height or facts.default_size[0], width or facts.default_size[1]
    else:
        raise InvalidRequest("give the initial noise: a seed, or latents (N, C, H/f, W/f)")
    if request.HasField("strength") and not request.HasField("init_latents"):
        raise InvalidRequest("strength needs init_latents (the init image's latents from Decoder.EncodeImage)")

    def image_input(name: str) -> np.ndarray | None:
        return (
            nhwc(from_proto(getattr(request, name), name=name, dtype="float32", ndim=4))
            if request.HasField(name)
            else None
        )

    labels = None
    if request.HasField("class_labels"):
        shape = facts.class_labels_shape or ()
        labels = from_proto(request.class_labels, name="class_labels", dtype="float32", ndim=1 + len(shape))
    return DenoiseJob(
        cond=cond, uncond=uncond, latents=latents, seed=seed, steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, guidance_rescale=request.guidance_rescale, eta=request.eta,
        guidance_cutoff=request.guidance_cutoff or 1.0, height=height, width=width, sampler=request.sampler or None,
        priority=request.priority,
        init_latents=image_input("init_latents"), strength=request.strength if request.HasField("strength") else 1.0,
        extra=image_input("extra"), blend_mask=image_input("blend_mask"), class_labels=labels,
        tenant=request.tenant, preview_every=request.preview_every,
        preview_projection=(latent_preview_from_proto(request.preview_projection)
                            if request.HasField("preview_projection") else None),
        loras=tuple((lora.name, unet_weight(lora)) for lora in request.loras),
        controls=tuple(control_input_from_proto(c) for c in request.controls),
    )  # fmt: skip


def lora_choice(lora: common_pb2.Lora) -> LoraChoice:
    """A Lora message as the contract's choice (weight unset → 1)."""
    return LoraChoice(
        lora.name, lora.weight if lora.HasField("weight") else 1.0,
        lora.unet_weight if lora.HasField("unet_weight") else None,
    )  # fmt: skip


def lora_to_proto(choice: LoraChoice) -> common_pb2.Lora:
    message = common_pb2.Lora(name=choice.name, weight=choice.weight)
    if choice.unet_weight is not None:
        message.unet_weight = choice.unet_weight
    return message


def unet_weight(lora: common_pb2.Lora) -> float:
    return lora_choice(lora).unet_scale


def text_encoder_weight(lora: common_pb2.Lora) -> float:
    return lora_choice(lora).text_encoder_scale


def lora_adapters_to_proto(info: Sequence[tuple[str, bool, int, str]]) -> list[common_pb2.Adapter]:
    """ModelInfo.adapters for a stage's LoRAs: (name, on the device now, rank, why it cannot be used) each."""
    return [
        common_pb2.Adapter(name=name, kind="lora", resident=resident, rank=rank, error=error)
        for name, resident, rank, error in info
    ]
