"""Diffusers-format checkpoints with random weights, built by the reference classes (dev extra: torch, diffusers).

Nothing here can reach the Hugging Face Hub, so tests, the demo and the benchmarks
make their checkpoints locally: `StableDiffusionPipeline(...).save_pretrained(dir)`
writes exactly what users download, minus trained weights.

    sdmesh make-checkpoint tiny-sd2 models/tiny-sd2      # seconds; what tests and the demo use
    sdmesh make-checkpoint full-sd2 models/full-sd2      # SD 2.x architecture, ~5 GB, about a minute

The image-conditioned SD 2 checkpoints have tiny specs too, each saved by its own diffusers
pipeline class so the folder layout (model_index.json, extra components) is the real one:
"tiny-sd2-inpaint" (9-channel UNet), "tiny-sd2-depth" (5-channel UNet, plus a tiny DPT depth
estimator that sdmesh never runs: depth maps come with the request) and "tiny-sd2-upscale"
(the x4 upscaler: 7-channel UNet with a noise-level table, 3-level VAE, a DDPM low_res_scheduler).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sdmesh.services.inputs.tokenizer import write_tiny_vocab

TINY_VAE = dict(
    block_out_channels=(16, 32),
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    sample_size=16,
    scaling_factor=0.18215,
)

# Tiny configs: every option SD uses, at toy widths. "sd2" is 2.1-shaped (v-prediction,
# per-block heads, linear projections, gelu, pad "!"); "sd1" is 1.5-shaped.
TINY = {
    "sd2": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=8,
        ),
        "vae": TINY_VAE,
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=32,
        ),
        "scheduler": dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type="v_prediction",
            timestep_spacing="leading",
        ),
        "pad_token": "!",
    },
    "sd1": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            use_linear_projection=False,
            norm_num_groups=8,
        ),
        "vae": TINY_VAE,
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=32,
        ),
        "scheduler": dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            set_alpha_to_one=False,
            prediction_type="epsilon",
            skip_prk_steps=True,
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
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
    ),
    "vae": dict(
        block_out_channels=(128, 256, 512, 512),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        sample_size=768,
        scaling_factor=0.18215,
        norm_num_groups=32,
    ),
    "text_encoder": dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
    ),
    "scheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
        timestep_spacing="leading",
    ),
    "pad_token": "!",
}

_TINY_SD2_UNET = TINY["sd2"]["unet"]

# stabilityai/stable-diffusion-2-inpainting: the SD 2 UNet with 9 input channels (latents, mask,
# masked-image latents), ε-prediction, shipped with a PNDM scheduler config.
TINY["sd2-inpaint"] = {
    **TINY["sd2"],
    "pipeline": "inpaint",
    "unet": dict(_TINY_SD2_UNET, in_channels=9, upcast_attention=False),
    "scheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        skip_prk_steps=True,
    ),
    "scheduler_class": "PNDMScheduler",
    "scheduler_json_extra": {"clip_sample": False},
}

# stabilityai/stable-diffusion-2-depth: 5 input channels (latents, depth), ε-prediction, a DPT depth
# estimator beside it (here tiny; the pipeline class needs one to save a real layout).
TINY["sd2-depth"] = {
    **TINY["sd2"],
    "pipeline": "depth",
    "unet": dict(_TINY_SD2_UNET, in_channels=5, upcast_attention=False),
    "scheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    ),
    "depth_estimator": dict(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        head_hidden_size=8,
        is_hybrid=False,
    ),
}

# stabilityai/stable-diffusion-x4-upscaler: latents at the low-res image's size, 7 input channels
# (latents, noised low-res RGB), the noise level as class label (num_class_embeds), attention only
# below the first level (only_cross_attention in the first three), a 3-level VAE (×4) with its own
# scaling_factor, and a DDPM low_res_scheduler that noises the low-res image (up to max_noise_level).
TINY["sd2-upscale"] = {
    **TINY["sd2"],
    "pipeline": "upscale",
    "unet": dict(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=8,
        num_class_embeds=1000,
        only_cross_attention=(True, True, True, False),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    "vae": dict(
        TINY_VAE,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        sample_size=64,
        scaling_factor=0.08333,
    ),
    "scheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    ),
    "low_res_scheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        num_train_timesteps=1000,
        variance_type="fixed_small",
    ),
    "max_noise_level": 350,
}

SPECS = {
    "tiny-sd2": TINY["sd2"],
    "tiny-sd1": TINY["sd1"],
    "full-sd2": FULL_SD2,
    "tiny-sd2-inpaint": TINY["sd2-inpaint"],
    "tiny-sd2-depth": TINY["sd2-depth"],
    "tiny-sd2-upscale": TINY["sd2-upscale"],
}


def build(directory: str | Path, spec: dict[str, Any], *, seed: int = 0, perturb: float = 0.0) -> Path:
    """Save the spec's diffusers pipeline (StableDiffusionPipeline unless `spec["pipeline"]` names
    another) with random weights to `directory` and return it.

    `perturb` adds N(0, perturb²) to every parameter: diffusers zero-initialises some
    layers (e.g. the UNet's conv_out), and a parity test should not pass by multiplying by zero.
    """
    try:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
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
    te_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
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
    pipe = _pipeline(spec, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(directory, safe_serialization=True)
    if spec.get("scheduler_json_extra"):
        path = directory / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **spec["scheduler_json_extra"]}, indent=2))
    return directory


def _pipeline(spec: dict[str, Any], **components: Any) -> Any:
    """The diffusers pipeline object the spec's checkpoint is saved from (what its model_index.json names)."""
    import diffusers

    kind = spec.get("pipeline", "text2img")
    if kind == "text2img":
        return diffusers.StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    if kind == "inpaint":
        return diffusers.StableDiffusionInpaintPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    if kind == "depth":
        from transformers import DPTConfig, DPTForDepthEstimation

        try:  # the PIL-backed processor: DPTImageProcessor proper needs torchvision, which we do not install
            from transformers import DPTImageProcessorPil as processor
        except ImportError:  # transformers before the split
            from transformers import DPTImageProcessor as processor
        size = spec["depth_estimator"]["image_size"]
        return diffusers.StableDiffusionDepth2ImgPipeline(
            **components,
            depth_estimator=DPTForDepthEstimation(DPTConfig(**spec["depth_estimator"])).eval(),
            feature_extractor=processor(size={"height": size, "width": size}),
        )
    if kind == "upscale":
        return diffusers.StableDiffusionUpscalePipeline(
            **components,
            low_res_scheduler=diffusers.DDPMScheduler(**spec["low_res_scheduler"]),
            max_noise_level=spec["max_noise_level"],
        )
    raise ValueError(f"unknown pipeline kind {kind!r} in reference spec")


# --- ControlNets ----------------------------------------------------------------------------------------------

# The tiny VAEs shrink images by 2, so a tiny ControlNet's conditioning embedding downsamples by 2 too
# (SD's (16, 32, 96, 256) downsamples by 8, as SD's VAE does).
TINY_CONTROLNET_EMBEDDING = (8, 16)


def make_tiny_controlnet(
    folder: str | Path,
    unet_config: dict[str, Any] | str | Path,
    *,
    seed: int = 0,
    conditioning_embedding_out_channels: tuple[int, ...] = TINY_CONTROLNET_EMBEDDING,
    controlnet_conditioning_channel_order: str = "rgb",
    zero_conv_std: float = 0.1,
) -> Path:
    """Save a random-weight diffusers ControlNet (config.json + diffusion_pytorch_model.safetensors) to `folder`.

    `unet_config` is UNet2DConditionModel kwargs (e.g. `TINY["sd2"]["unet"]`, weights drawn from `seed`) or a
    checkpoint folder whose UNet the ControlNet is copied from, as diffusers' `ControlNetModel.from_unet` does
    when training starts. Training starts with zero convs; here they are drawn N(0, zero_conv_std²), so the
    residuals are not trivially zero.
    """
    try:
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel
    except ImportError as e:
        raise RuntimeError(
            "building reference checkpoints needs the dev extra (torch, diffusers): "
            "pip install torch==2.13.0 && pip install -e '.[dev]'"
        ) from e
    torch.manual_seed(seed)
    if isinstance(unet_config, dict):
        unet = UNet2DConditionModel(**copy.deepcopy(unet_config))
    else:
        unet = UNet2DConditionModel.from_pretrained(Path(unet_config) / "unet")
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
    )
    zero_convs = ("controlnet_cond_embedding.conv_out.", "controlnet_down_blocks.", "controlnet_mid_block.")
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(zero_convs):
                p.copy_(torch.randn_like(p) * zero_conv_std)
    folder = Path(folder)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


# --- Single-file (CompVis / A1111 layout) checkpoints ---------------------------------------------------------
# The inverse of services/checkpoints/single_file.py's key maps, written independently from the LDM module names
# so that diffusers' own converters (diffusers.loaders.single_file_utils) can check it in tests.

_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_LDM_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers UNet key → its name under model.diffusion_model. (config: the UNet's config.json)."""
    import re

    module, _, leaf = key.rpartition(".")
    if module in _LDM_UNET_FIXED:
        return f"{_LDM_UNET_FIXED[module]}.{leaf}"
    n = config["layers_per_block"] + 1
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", key)
    if m:
        side, level, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            block = 1 + level * n + (n - 1 if part == "downsamplers" else j)
            prefix = "input_blocks"
        else:
            block = level * n + (n - 1 if part == "upsamplers" else j)
            prefix = "output_blocks"
        if part == "resnets":
            inner, _, last = rest.rpartition(".")
            return f"{prefix}.{block}.0.{_LDM_RESNET[inner]}.{last}"
        if part == "attentions":
            return f"{prefix}.{block}.1.{rest}"
        if part == "downsamplers":  # rest: conv.weight / conv.bias
            return f"{prefix}.{block}.0.op.{rest.removeprefix('conv.')}"
        has_attention = config["up_block_types"][level].startswith("CrossAttn")
        return f"{prefix}.{block}.{2 if has_attention else 1}.{rest}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        inner, _, last = m[3].rpartition(".")
        return f"middle_block.{2 * int(m[2])}.{_LDM_RESNET[inner]}.{last}"
    raise ValueError(f"no LDM name for UNet key {key}")


def ldm_vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key → its name under first_stage_model. (decoder levels count bottom-up there)."""
    import re

    for side in ("encoder", "decoder"):
        key = key.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
    m = re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", key)
    if m:
        side, direction, level, part, j, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
        if direction == "up":
            level = levels - 1 - level
        if part == "resnets":
            return f"{side}.{direction}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{side}.{direction}.{level}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
    if m:
        if m[2] == "resnets":
            return f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4]}"
        inner, _, last = m[4].rpartition(".")
        return f"{m[1]}.mid.attn_1.{_LDM_VAE_ATTENTION[inner]}.{last}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def ldm_state_dict(folder: str | Path, *, family: str | None = None, seed: int = 0) -> dict[str, Any]:
    """A diffusers SD folder's weights as one LDM state dict (torch tensors), as a CompVis / A1111 file holds them.

    `family` "sd1" writes the text encoder as transformers' CLIP (cond_stage_model.transformer.text_model.*, with
    the position_ids buffer); "sd2" as OpenCLIP (cond_stage_model.model.*, q;k;v packed into in_proj, plus the
    last block and text_projection that SD 2 never uses, random from `seed`). Default: from hidden_act.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    configs = {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}
    weights = {
        c: load_file(folder / c / f"{'model' if c == 'text_encoder' else 'diffusion_pytorch_model'}.safetensors")
        for c in configs
    }
    return ldm_tensors(weights, configs, family=family, seed=seed)


def ldm_tensors(
    weights: dict[str, dict[str, Any]], configs: dict[str, dict[str, Any]], *, family: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """`ldm_state_dict` from the components' state dicts and configs (by "unet", "vae", "text_encoder"). Tensors
    on the meta device stay there: a full-size model's LDM names and shapes without its memory."""
    import torch

    unet_config, vae_config, te_config = configs["unet"], configs["vae"], configs["text_encoder"]
    if family is None:
        family = "sd1" if te_config["hidden_act"] == "quick_gelu" else "sd2"
    out: dict[str, Any] = {}
    for key, t in weights["unet"].items():
        out["model.diffusion_model." + ldm_unet_key(key, unet_config)] = t
    levels = len(vae_config["block_out_channels"])
    for key, t in weights["vae"].items():
        name = ldm_vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]  # LDM's AttnBlock uses 1×1 convs
        out["first_stage_model." + name] = t
    te = {k.removeprefix("text_model."): t for k, t in weights["text_encoder"].items()}
    te.pop("embeddings.position_ids", None)  # a buffer some transformers versions keep in the state dict
    if family == "sd1":
        for key, t in te.items():
            out["cond_stage_model.transformer.text_model." + key] = t
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            te_config["max_position_embeddings"]
        )[None]
        return out
    p = "cond_stage_model.model."
    layers, hidden = te_config["num_hidden_layers"], te_config["hidden_size"]
    out[p + "token_embedding.weight"] = te["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = te["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = te["final_layer_norm.weight"]
    out[p + "ln_final.bias"] = te["final_layer_norm.bias"]
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    names["self_attn.out_proj"] = "attn.out_proj"
    for n in range(layers):
        src, dst = f"encoder.layers.{n}.", f"{p}transformer.resblocks.{n}."
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = te[f"{src}{ours}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([te[f"{src}self_attn.{q}_proj.{leaf}"] for q in "qkv"])
    # SD 2 reads the penultimate layer: the file's last block and projection exist but are never used
    g = torch.Generator().manual_seed(seed)
    meta = te["final_layer_norm.weight"].is_meta

    def unused(shape: tuple[int, ...]) -> Any:
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g)

    last = f"{p}transformer.resblocks.{layers}."
    for key in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
        out[last + key.removeprefix(f"{p}transformer.resblocks.0.")] = unused(tuple(out[key].shape))
    out[p + "text_projection"] = unused((hidden, hidden))
    return out


def to_single_file(
    folder: str | Path,
    path: str | Path,
    *,
    dtype: Any = None,
    nest: bool = False,
    global_step: int | None = None,
    family: str | None = None,
) -> Path:
    """Write a diffusers SD folder as one CompVis / A1111 checkpoint: .safetensors, or a torch pickle for .ckpt
    (then `nest` puts it under "state_dict" beside `global_step`, as Lightning saves). `dtype`: cast floats."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = ldm_state_dict(folder, family=family)
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    state = {k: t.contiguous() for k, t in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        payload: dict[str, Any] = {"state_dict": state} if nest else dict(state)
        if global_step is not None:
            payload["global_step"] = global_step
        torch.save(payload, path)
    return path
