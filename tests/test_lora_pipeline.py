"""Per-request LoRAs through the whole pipeline equal diffusers' `load_lora_weights` + `set_adapters`.

The LoRA files are made with peft on the tiny SD2 checkpoint's own UNet and text encoder and saved as diffusers'
training scripts save them; the same files are loaded by diffusers and named by our requests. Nothing is merged on
our side: a request's LoRAs are applied per image, so a request without them still gives the base model's image.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402

from sdmesh.services.inputs.contract import GenerationRequest  # noqa: E402
from sdmesh.services.pipeline import StableDiffusion  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SIZE, STEPS = 32, 3  # the tiny VAE halves: latents are 16×16


def save_lora(pipe: StableDiffusionPipeline, folder, name: str, seed: int, *, rank: int, text: bool) -> None:
    """A random (non-zero) LoRA on the pipeline's UNet attention and, with `text`, its CLIP attention and MLP."""
    torch.manual_seed(seed)
    unet_config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    if text:
        text_config = LoraConfig(
            r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            init_lora_weights=False,
        )  # fmt: skip
        encoder = inject_adapter_in_model(text_config, copy.deepcopy(pipe.text_encoder))
        layers["text_encoder_lora_layers"] = {
            k.replace(".default", ""): v for k, v in encoder.state_dict().items() if ".lora_" in k
        }
        metadata["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=f"{name}.safetensors", **layers, **metadata)


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    folder = tiny_checkpoints["sd2"]
    loras = tmp_path_factory.mktemp("loras")
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    save_lora(reference, loras, "style", 1, rank=4, text=True)
    save_lora(reference, loras, "detail", 2, rank=8, text=False)
    for name in ("style", "detail"):
        reference.load_lora_weights(loras, weight_name=f"{name}.safetensors", adapter_name=name)
    ours = StableDiffusion.load(str(folder), lora_dir=loras)
    return reference, ours


def latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


def reference_image(reference: StableDiffusionPipeline, x: np.ndarray, adapters: dict[str, float]) -> np.ndarray:
    if adapters:
        reference.enable_lora()
        reference.set_adapters(list(adapters), list(adapters.values()))
    else:
        reference.disable_lora()
    out = reference(
        PROMPT, latents=torch.from_numpy(x), num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np"
    ).images
    return (out * 255).round().astype(np.uint8)


def our_image(ours: StableDiffusion, x: np.ndarray | None, **fields) -> np.ndarray:
    request = GenerationRequest(
        **{"prompt": PROMPT, "steps": STEPS, "height": SIZE, "width": SIZE, "sampler": "ddim", **fields}, latents=x
    )
    return ours.generate(request).images


@pytest.mark.parametrize(
    "adapters",
    [{"style": 0.7}, {"detail": 1.0}, {"style": 1.0, "detail": -0.5}, {}],
    ids=["text+unet", "unet-only", "two-mixed", "none"],
)
def test_images_equal_diffusers_with_the_same_loras_and_weights(setup, adapters):
    reference, ours = setup
    x = latents(3)
    expected = reference_image(reference, x, adapters)
    got = our_image(ours, x, loras=list(adapters.items()))
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"


def test_a_prompt_tag_is_the_same_as_the_request_field(setup):
    _, ours = setup
    x = latents(4)
    tagged = our_image(ours, x, prompt=f"{PROMPT} <lora:style:0.7>")
    field = our_image(ours, x, loras=[("style", 0.7)])
    np.testing.assert_array_equal(tagged, field)


def test_a_lora_changes_the_image_and_leaves_the_next_request_alone(setup):
    _, ours = setup
    x = latents(5)
    base = our_image(ours, x)
    assert np.abs(our_image(ours, x, loras=[("style", 1.0)]).astype(int) - base).max() > 2
    np.testing.assert_array_equal(our_image(ours, x), base)


def test_through_the_gateway_concurrent_requests_with_different_loras_each_equal_the_pipeline(setup, tiny_checkpoints):
    """Encoder and denoiser services on the same stages (each batches up to 2 requests), a gateway in front:
    requests naming different LoRAs, sent at once, share batches and each get the in-process image."""
    from concurrent.futures import ThreadPoolExecutor

    from test_modes import Served

    from sdmesh.client import Client

    _, ours = setup
    cases = [[("style", 0.7)], [("detail", 1.0), ("style", -0.3)], []]
    expected = [our_image(ours, None, loras=loras, seed=30 + k) for k, loras in enumerate(cases)]
    served = Served(ours, tiny_checkpoints["sd2"])
    try:
        with Client(served.address) as client:
            info = client.model_info()
            assert {(a.name, a.kind) for a in info.adapters} >= {("style", "lora"), ("detail", "lora")}

            def generate(k: int) -> np.ndarray:
                result = client.generate(
                    PROMPT, steps=STEPS, height=SIZE, width=SIZE, sampler="ddim", seed=30 + k, loras=cases[k],
                    timeout=300,
                )  # fmt: skip
                return np.stack([np.asarray(im) for im in result.images])

            with ThreadPoolExecutor(len(cases)) as pool:
                got = list(pool.map(generate, range(len(cases))))
    finally:
        served.close()
    for g, e in zip(got, expected):  # batch-mates change float32 sums' order at most: a rounding flip, not more
        assert np.abs(g.astype(int) - e).max() <= 1
