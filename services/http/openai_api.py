"""OpenAI's Images API in front of the gateway: `POST /v1/images/generations` and `POST /v1/images/edits`.

Answers in OpenAI's shape (`created`, `data[].b64_json` or `data[].url`) and errors in its error shape, so the
`openai` package (and what is built on it: open-webui, LiteLLM, SillyTavern) works unchanged with `base_url`
pointing here. sdmesh's own fields (negative_prompt, steps, guidance_scale, guidance_rescale, seed, sampler,
strength) are accepted beside OpenAI's; OpenAI fields that have no meaning here (quality, style, background,
moderation, output_format, ...) are ignored.

`model` names one of the gateway's models (`/v1/models` lists them; A1111's "name [hash]" and the hash work too);
none, "" and OpenAI's own names (dall-e-2, dall-e-3, gpt-image-*), which clients send by default, are the gateway's
first model. Any other name that is not served is 400, listing those that are.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from sdmesh.services.http.common import Caller, Front, LoraBody, generate_request, invalid, parse_size
from sdmesh.services.http.jobs import Job

ResponseFormat = Literal["b64_json", "url"]
OPENAI_MODELS = ("dall-e-", "gpt-image-")  # OpenAI's image models, by prefix: clients' defaults, not ours


def served_model(model: str | None) -> str:
    """OpenAI's `model` as the gateway request's: OpenAI's own names (and none) are the gateway's first model."""
    name = (model or "").strip()
    return "" if name.lower().startswith(OPENAI_MODELS) else name


class ImageGenerationRequest(BaseModel):
    """OpenAI's `images.generate` body, with sdmesh's own generation fields beside it."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="What to draw.")
    n: int = Field(1, description="How many images (up to the model's max_images).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "512x512"; none or "auto": the model\'s own.')
    response_format: ResponseFormat | None = Field(
        None, description="b64_json (default): the PNGs inline; url: links served by this front for a while."
    )
    model: str | None = Field(None, description="One of the gateway's models (GET /v1/models); none or OpenAI's "
                              "own names (dall-e-2, ...): its first.")  # fmt: skip
    user: str | None = Field(None, description="Accepted; tenants come from API keys.")
    negative_prompt: str = ""
    steps: int | None = Field(None, description="Denoising steps (default 50).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance (default 7.5; ≤ 1: off).")
    guidance_rescale: float = 0.0
    guidance_cutoff: float = 1.0
    seed: int | None = Field(None, description="The same seed and request give the same images; none: random.")
    sampler: str | None = Field(None, description="ddim, euler, euler-ancestral, dpm++2m, dpm++2m-karras, plms.")
    loras: list[LoraBody] = Field(default_factory=list, description="sdmesh: LoRAs (or <lora:NAME:W> in the prompt).")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int | None = Field(default=None, description="sdmesh: the seed used (the first image's).")
    expires_at: int | None = Field(default=None, description="sdmesh: when `url` links stop working (Unix time).")


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sdmesh"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def router(front: Front) -> APIRouter:
    """The OpenAI routes."""
    api = APIRouter(tags=["OpenAI Images"])

    @api.get("/v1/models", response_model=ModelList)
    async def list_models(who: Caller) -> ModelList:
        """The models the gateway serves, the default first, as OpenAI's model list (clients list models before
        they ask); an id is what `model` takes."""
        return ModelList(data=[Model(id=m.name) for m in await asyncio.to_thread(front.models)])

    @api.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_image(body: ImageGenerationRequest, request: Request, who: Caller) -> ImagesResponse:
        """Text to image, as OpenAI's `images.generate`."""
        width, height = parse_size(body.size)
        job = await front.run(
            generate_request(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                n=body.n,
                width=width,
                height=height,
                steps=body.steps,
                guidance_scale=body.guidance_scale,
                guidance_rescale=body.guidance_rescale,
                guidance_cutoff=body.guidance_cutoff,
                sampler=body.sampler,
                seed=body.seed,
                loras=body.loras,
                model=served_model(body.model),
            ),
            who,
            request,
        )
        return answer(front, job, body.response_format, request)

    @api.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
    async def edit_image(
        request: Request,
        who: Caller,
        prompt: Annotated[str, Form()],
        image: Annotated[list[UploadFile] | None, File(description="The PNG or JPEG to edit.")] = None,
        image_array: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
        mask: Annotated[UploadFile | None, File(description="Transparent (alpha 0) where to repaint.")] = None,
        n: Annotated[int, Form()] = 1,
        size: Annotated[str | None, Form()] = None,
        response_format: Annotated[ResponseFormat | None, Form()] = None,
        negative_prompt: Annotated[str, Form()] = "",
        steps: Annotated[int | None, Form()] = None,
        guidance_scale: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        sampler: Annotated[str | None, Form()] = None,
        strength: Annotated[float | None, Form()] = None,
        model: Annotated[str | None, Form()] = None,
    ) -> ImagesResponse:
        """An image edited by a prompt, as OpenAI's `images.edit`: with a mask (or transparent pixels in the image)
        the masked part is repainted (inpainting); without, the whole image is redrawn from it (img2img)."""
        files = (image or []) + (image_array or [])
        if len(files) != 1:
            raise invalid(f"image: give exactly one image to edit (got {len(files)})")
        init = await files[0].read()
        mask_png = await mask.read() if mask is not None else b""
        width, height = parse_size(size)
        init, mask_png = openai_mask(init, mask_png)
        job = await front.run(
            generate_request(
                prompt=prompt,
                negative_prompt=negative_prompt,
                n=n,
                width=width,
                height=height,
                steps=steps,
                guidance_scale=guidance_scale,
                sampler=sampler,
                seed=seed,
                strength=strength,
                init_image=init,
                mask_image=mask_png,
                model=served_model(model),
            ),
            who,
            request,
        )
        return answer(front, job, response_format, request)

    return api


def answer(front: Front, job: Job, response_format: str | None, request: Request) -> ImagesResponse:
    created = int(job.created)
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        named = [front.files.put(png) for png in job.images]
        data = [ImageData(url=f"{base}/v1/files/{name}") for name, _ in named]
        return ImagesResponse(created=created, data=data, seed=job.seed, expires_at=int(min(e for _, e in named)))
    data = [ImageData(b64_json=_b64(png)) for png in job.images]
    return ImagesResponse(created=created, data=data, seed=job.seed)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def openai_mask(image: bytes, mask: bytes) -> tuple[bytes, bytes]:
    """OpenAI's masks are transparency: repaint where the mask's (or, without a mask, the image's) alpha is 0.
    Returns (image, mask) as the gateway takes them: the image without alpha, and a mask white where to repaint
    (b"": none, img2img). A mask without an alpha channel is taken as the gateway's own (white repaints).
    Bytes that are not an image are passed on for the gateway to refuse with its message."""
    from PIL import Image

    def opened(data: bytes) -> Image.Image | None:
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
            return picture
        except Exception:
            return None

    picture = opened(image)
    source = opened(mask) if mask else picture
    if source is None or "A" not in source.getbands():
        return image, mask
    alpha = np.asarray(source.getchannel("A"))
    if not mask and alpha.min() == 255:  # an opaque image and no mask: img2img
        return image, b""
    repaint = Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), mode="L")
    if picture is not None and "A" in picture.getbands():
        image = _png(picture.convert("RGB"))
    return image, _png(repaint)


def _png(picture: Any) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
