"""Diffusers-format checkpoints with random weights, built by the reference classes (dev extra: torch, diffusers).

Nothing here can reach the Hugging Face Hub, so tests, the demo and the benchmarks
make their checkpoints locally: `StableDiffusionPipeline(...).save_pretrained(dir)`
writes exactly what users download, minus trained weights.

    sdmesh make-checkpoint tiny-sd2 models/tiny-sd2      # seconds; what tests and the demo use
    sdmesh make-checkpoint full-sd2 models/full-sd2      # SD 2.x architecture, ~5 GB, about a minute
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sdmesh.services.tokenizer import write_tiny_vocab

TINY_VAE = dict(
    block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, sample_size=16, scaling_factor=0.18215,
)

# Tiny configs: every option SD uses, at toy widths. "sd2" is 2.1-shaped (v-prediction,
# per-block heads, linear projections, gelu, pad "!"); "sd1" is 1.5-shaped.
TINY = {
    "sd2": {
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4, 4), use_linear_projection=True,
            upcast_attention=True, norm_num_groups=8,
        ),
        "vae": TINY_VAE,
        "text_encoder": dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
        ),
        "scheduler": dict(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
            set_alpha_to_one=False, prediction_type="v_prediction", timestep_spacing="leading",
        ),
        "pad_token": "!",
    },
    "sd1": {
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, use_linear_projection=False, norm_num_groups=8,
        ),
        "vae": TINY_VAE,
        "text_encoder": dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
        ),
        "scheduler": dict(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            set_alpha_to_one=False, prediction_type="epsilon", skip_prk_steps=True,
        ),
        "pad_token": "<|endoftext|>",
        "scheduler_class": "PNDMScheduler",  # what SD 1.x checkpoints ship
        # SD 1.x's scheduler_config.json carries keys PNDM ignores but DDIM.from_config reads
        "scheduler_json_extra": {"clip_sample": False},
    },
}

# The SD 2.x architecture at full size (stabilityai/stable-diffusion-2-1's configs):
# 865.9M UNet, 340.4M text encoder (OpenCLIP ViT-H), 83.7M VAE parameters.
FULL_SD2 = {
    "unet": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        upcast_attention=True, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
    ),
    "vae": dict(
        block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=768, scaling_factor=0.18215, norm_num_groups=32,
    ),
    "text_encoder": dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    ),
    "scheduler": dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, prediction_type="v_prediction", timestep_spacing="leading",
    ),
    "pad_token": "!",
}

SPECS = {"tiny-sd2": TINY["sd2"], "tiny-sd1": TINY["sd1"], "full-sd2": FULL_SD2}


def build(directory: str | Path, spec: dict[str, Any], *, seed: int = 0, perturb: float = 0.0) -> Path:
    """Save a StableDiffusionPipeline with random weights to `directory` and return it.

    `perturb` adds N(0, perturb²) to every parameter: diffusers zero-initialises some
    layers (e.g. the UNet's conv_out), and a parity test should not pass by multiplying by zero.
    """
    try:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise RuntimeError(
            "building reference checkpoints needs the dev extra (torch, diffusers): "
            "pip install torch==2.13.0 && pip install -e '.[dev]'"
        ) from e
    directory = Path(directory)
    spec = copy.deepcopy(spec)
    write_tiny_vocab(directory / "tokenizer", pad_token=spec["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    torch.manual_seed(seed)
    te_config = dict(spec["text_encoder"])
    te_config.setdefault("vocab_size", len(tokenizer))
    te_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    scheduler_class = PNDMScheduler if spec.get("scheduler_class") == "PNDMScheduler" else DDIMScheduler
    scheduler = scheduler_class(**spec["scheduler"])
    if perturb:
        with torch.no_grad():
            for module in (text_encoder, unet, vae):
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * perturb)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    if spec.get("scheduler_json_extra"):
        path = directory / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **spec["scheduler_json_extra"]}, indent=2))
    return directory
