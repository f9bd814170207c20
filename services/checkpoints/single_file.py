"""Single-file Stable Diffusion 1.x/2.x checkpoints (the CompVis / A1111 layout) → a diffusers folder.

    convert_single_file("v1-5-pruned-emaonly.safetensors", out)     # configs inferred from the tensors' shapes
    convert_single_file("tiny.safetensors", out, config="models/tiny-sd2")   # configs from a diffusers folder / Hub id

What such a file holds (the latent-diffusion repo's module names):
  model.diffusion_model.*          UNet: time_embed, input_blocks.N.M, middle_block.M, output_blocks.N.M, out
  first_stage_model.*              VAE: encoder.down.N.block.M, {encoder,decoder}.mid.{block_1,attn_1,block_2},
                                   decoder.up.N (numbered bottom-up, the reverse of diffusers' up_blocks)
  cond_stage_model.transformer.*   SD 1.x: transformers' CLIP ViT-L text model (diffusers' names already)
  cond_stage_model.model.*         SD 2.x: OpenCLIP ViT-H, transformer.resblocks.N with q;k;v packed in in_proj
  model_ema.*, optimizer state…    ignored: like diffusers we take the non-EMA weights
A `state_dict` nesting (Lightning .ckpt files) is unwrapped.

The folder written is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json, unet/ vae/
text_encoder/ tokenizer/ scheduler/), so every stage loads it unchanged. Tensors keep their dtype (an fp16 file
makes an fp16 folder; the stages cast on load) and stream one at a time from the file into the folder.
`checkpoint.resolve` calls this once per file and caches the folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.checkpoints.weights import CheckpointError, safetensors_dtypes
from sdmesh.services.inputs.tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction")

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

# Single files carry no tokenizer: each family's is CLIP's vocabulary, written from the package's copy. They differ
# only in padding (openai/clip-vit-large-patch14 pads with EOS; SD 2's OpenCLIP tokenizer with "!", id 0).
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# SD's training schedule (the latent-diffusion configs' linear_start/linear_end, "scaled_linear"), with the
# sampler settings the official diffusers repos ship: SD 1.x a PNDM config, SD 2.x a DDIM one.
_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}
_PIPELINES = {
    "text-to-image": "StableDiffusionPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
    "depth": "StableDiffusionDepth2ImgPipeline",
}
# The diffusers version the folders we write claim (diffusers reads it, e.g. to tell pre-0.6 inpainting models).
_DIFFUSERS_VERSION = "0.30.0"
# SD's GroupNorm group count: not in the weights, so a file whose widths it does not divide needs --config.
_NORM_GROUPS = 32
# SD 2.x's attention (num_head_channels: 64) and both CLIP text models' head size.
_HEAD_DIM = 64
# SD 1.x's UNet attention (num_heads: 8).
_SD1_HEADS = 8
# The SD 2 base checkpoint's training step: diffusers' one hint that an SD 2 file predicts ε, not v.
_SD2_BASE_GLOBAL_STEP = 875000


# --- Reading the file --------------------------------------------------------------


class _Source:
    """A single file's tensors by key: shapes up front, data read on demand (one tensor at a time)."""

    def __init__(
        self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype], read: Callable, step: Any
    ):
        self.path, self.shapes, self.dtypes, self._read, self.global_step = path, shapes, dtypes, read, step

    def read(self, key: str) -> np.ndarray:
        return self._read(key)


def _open_safetensors(path: Path) -> _Source:
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError(f"header length {header_len} for a file of {size} bytes")
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e}); re-download it") from e
    base = 8 + header_len
    header.pop("__metadata__", None)
    types = safetensors_dtypes()
    shapes, dtypes, offsets = {}, {}, {}
    for key, entry in header.items():
        if entry["dtype"] not in types:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which sdmesh cannot load")
        begin, end = entry["data_offsets"]
        dtypes[key], shapes[key], offsets[key] = np.dtype(types[entry["dtype"]]), tuple(entry["shape"]), (begin, end)
        if end - begin != int(np.prod(shapes[key], dtype=np.int64)) * dtypes[key].itemsize or base + end > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} runs past the end of the file (the file is truncated); re-download it"
            )

    def read(key: str) -> np.ndarray:
        begin, end = offsets[key]
        with open(path, "rb") as f:
            f.seek(base + begin)
            data = np.fromfile(f, dtype=dtypes[key], count=(end - begin) // dtypes[key].itemsize)
        return data.reshape(shapes[key])

    return _Source(path, shapes, dtypes, read, None)


def _open_pickle(path: Path) -> _Source:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch)") from e

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            state = load(mmap=False)
    except Exception as e:  # pickle.UnpicklingError and friends: objects beyond tensors, or a damaged file
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:200]}); "
            "it is damaged or pickles Python objects besides tensors. Convert it to .safetensors with a tool you "
            "trust, or re-download it"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    step = state.get("global_step")
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def numpy_dtype(t: Any) -> np.dtype:
        return np.dtype(np.float32) if t.dtype == torch.bfloat16 else torch.empty((), dtype=t.dtype).numpy().dtype

    def read(key: str) -> np.ndarray:
        t = tensors[key]
        return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()

    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return _Source(path, shapes, {k: numpy_dtype(v) for k, v in tensors.items()}, read, step)


def open_single_file(path: str | Path, *, allow_pickle: bool = False) -> _Source:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a PyTorch pickle ({path.suffix}); pickles can run code when loaded. Use a .safetensors "
                "copy, or pass --allow-pickle to read it with torch.load(weights_only=True)"
            )
        return _open_pickle(path)
    return _open_safetensors(path)


# --- What the file is ---------------------------------------------------------------


def _section(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}


def _prefixes(keys: Iterable[str]) -> str:
    seen = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(seen[:8]) + (f" (+{len(seen) - 8} more)" if len(seen) > 8 else "") if seen else "no tensors"


def family(source: _Source) -> str:
    """'sd1' (CLIP ViT-L text encoder) or 'sd2' (OpenCLIP); refuses anything that is not SD 1.x/2.x."""
    keys = source.shapes
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(
            f"{source.path} is an SDXL checkpoint (conditioner.embedders.*); sdmesh runs Stable Diffusion 1.x/2.x"
        )
    missing = [
        name
        for name, prefix in (("UNet", UNET + "input_blocks."), ("VAE", VAE + "encoder."))
        if not any(k.startswith(prefix) for k in keys)
    ]
    has_clip = any(k.startswith(CLIP) for k in keys)
    has_open_clip = any(k.startswith(OPEN_CLIP + "transformer.") for k in keys)
    if not (has_clip or has_open_clip):
        missing.append("text encoder")
    if missing:
        raise CheckpointError(
            f"{source.path} is not a Stable Diffusion 1.x/2.x checkpoint: no {' or '.join(missing)} "
            f"({UNET}*, {VAE}*, {CLIP}* or {OPEN_CLIP}*); it holds {_prefixes(keys)}"
        )
    return "sd1" if has_clip else "sd2"


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """What the UNet's key names say: levels, resnets per level, which levels attend."""

    levels: int
    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]


def unet_layout(unet: dict[str, tuple[int, ...]], where: str) -> UNetLayout:
    blocks = sorted({int(k.split(".")[1]) for k in unet if k.startswith("input_blocks.")})
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(downsamplers) + 1
    per_level, rest = divmod(len(blocks) - 1 - len(downsamplers), levels)
    outputs = sorted({int(k.split(".")[1]) for k in unet if k.startswith("output_blocks.")})
    if (
        rest
        or per_level < 1
        or blocks != list(range(len(blocks)))
        or downsamplers != [(per_level + 1) * (n + 1) for n in range(levels - 1)]
        or outputs != list(range(levels * (per_level + 1)))
    ):
        raise CheckpointError(
            f"{where}: the UNet's blocks (input_blocks 0–{blocks[-1] if blocks else '?'}, downsampling at "
            f"{downsamplers}, {len(outputs)} output_blocks) are not laid out as an SD 1.x/2.x UNet's"
        )
    down = tuple(f"input_blocks.{1 + n * (per_level + 1)}.1.proj_in.weight" in unet for n in range(levels))
    up = tuple(f"output_blocks.{n * (per_level + 1)}.1.proj_in.weight" in unet for n in range(levels))
    return UNetLayout(levels, per_level, down, up)


# --- Key maps: LDM name → diffusers name --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the output: its diffusers name, where it comes from and how it is reshaped."""

    name: str
    source: str
    part: int | None = None  # the part-th third along dim 0 (OpenCLIP's packed q;k;v)
    squeeze: bool = False  # (out, in, 1, 1) 1×1 conv → (out, in) linear (the VAE's mid attention)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.part is not None:
            shape = (shape[0] // 3, *shape[1:])
        return shape[:2] if self.squeeze and len(shape) == 4 else shape

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.part is not None:
            n = array.shape[0] // 3
            array = array[self.part * n : (self.part + 1) * n]
        return array[:, :, 0, 0] if self.squeeze and array.ndim == 4 else array


_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d)\.(.+)$")


def _resnet(rest: str) -> str | None:
    module, _, leaf = rest.rpartition(".")
    return f"{_UNET_RESNET[module]}.{leaf}" if module in _UNET_RESNET else None


def unet_name(key: str, layout: UNetLayout) -> str | None:
    """'input_blocks.4.1.proj_in.weight' → 'down_blocks.1.attentions.0.proj_in.weight' (None: not an SD UNet key).

    The transformer blocks inside an attention keep their names: diffusers kept the LDM ones there."""
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    n = layout.layers_per_block + 1  # blocks per level: the resnets (each maybe with attention), then a resampler
    m = _MIDDLE.match(key)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        name = _resnet(rest)
        return f"mid_block.resnets.{index // 2}.{name}" if name and index in (0, 2) else None
    m = _BLOCK.match(key)
    if not m:
        return None
    kind, block, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        level, j = divmod(block - 1, n)
        if j == n - 1:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        if sub == 0:
            name = _resnet(rest)
            return f"down_blocks.{level}.resnets.{j}.{name}" if name else None
        return f"down_blocks.{level}.attentions.{j}.{rest}" if sub == 1 else None
    level, j = divmod(block, n)
    if sub == 0:
        name = _resnet(rest)
        return f"up_blocks.{level}.resnets.{j}.{name}" if name else None
    if rest.startswith("conv.") and (sub == 2 or (sub == 1 and not layout.up_attention[level])):
        return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}" if j == n - 1 else None
    return f"up_blocks.{level}.attentions.{j}.{rest}" if sub == 1 else None


_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_PATTERNS = (
    (re.compile(r"^(encoder|decoder)\.norm_out\.(\w+)$"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(r"^((?:en|de)coder\.conv_(?:in|out)|(?:post_)?quant_conv)\.(\w+)$"), lambda m, n: m[0]),
    (
        re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_vae_resnet(m[3])}.{m[4]}",
    ),
    (
        re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(\w+)$"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_vae_resnet(m[3])}.{m[4]}",
    ),
    (
        re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(\w+)$"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)$"),
        lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_vae_resnet(m[3])}.{m[4]}",
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(\w+)$"),
        lambda m, n: f"{m[1]}.mid_block.attentions.0.{_VAE_ATTENTION[m[2]]}.{m[3]}",
    ),
)


def _vae_resnet(module: str) -> str:
    return "conv_shortcut" if module == "nin_shortcut" else module


def vae_name(key: str, levels: int) -> str | None:
    """'decoder.up.0.block.2.nin_shortcut.weight' → 'decoder.up_blocks.{levels-1}.resnets.2.conv_shortcut.weight'."""
    for pattern, name in _VAE_PATTERNS:
        m = pattern.match(key)
        if m:
            return name(m, levels)
    return None


_OPEN_CLIP_FIXED = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
# OpenCLIP tensors a CLIPTextModel has no use for (SD reads the hidden states, not the projected embedding).
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(\w+)$")
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def open_clip_entries(key: str, layers: int) -> list[tuple[str, int | None]] | None:
    """An OpenCLIP key → [(diffusers name, third of in_proj or None)]; [] to drop it; None: unknown.

    Blocks at or past `layers` are dropped: SD 2 conditions on the penultimate layer, so its
    diffusers text encoder has one block fewer than the file."""
    if key in _OPEN_CLIP_FIXED:
        return [(_OPEN_CLIP_FIXED[key], None)]
    if key in _OPEN_CLIP_UNUSED:
        return []
    m = _RESBLOCK.match(key)
    if not m:
        return None
    n, module, leaf = int(m[1]), m[2], m[3]
    if n >= layers:
        return []
    prefix = f"encoder.layers.{n}"
    if module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
        kind = leaf.removeprefix("in_proj_")
        return [(f"{prefix}.self_attn.{p}_proj.{kind}", i) for i, p in enumerate("qkv")]
    return [(f"{prefix}.{_OPEN_CLIP_LAYER[module]}.{leaf}", None)] if module in _OPEN_CLIP_LAYER else None


def clip_name(key: str, layers: int) -> str | None:
    """A transformers CLIP key under cond_stage_model.transformer. → the key CLIPTextModel saves ('' to drop)."""
    key = key.removeprefix("text_model.")
    if key == "embeddings.position_ids":  # a buffer: arange(77)
        return ""
    m = _CLIP_LAYER.match(key)
    if m:
        return key if int(m[1]) < layers else ""
    return key if key.startswith(("embeddings.", "final_layer_norm.")) else None


def _clip_blocks(source: _Source, fam: str) -> int:
    if fam == "sd1":
        te = _section(source.shapes, CLIP)
        return len({int(m[1]) for k in te if (m := _CLIP_LAYER.match(k.removeprefix("text_model.")))})
    return len({int(m[1]) for k in _section(source.shapes, OPEN_CLIP) if (m := _RESBLOCK.match(k))})


def plan(source: _Source, fam: str, layout: UNetLayout, vae_levels: int, te_layers: int) -> dict[str, list[Entry]]:
    """Every output tensor, per component, from the file's keys; a key of a component that fits nowhere is refused."""
    out: dict[str, list[Entry]] = {"unet": [], "vae": [], "text_encoder": []}
    te_prefix = CLIP if fam == "sd1" else OPEN_CLIP
    for key in source.shapes:
        if key.startswith(UNET):
            name = unet_name(key[len(UNET) :], layout)
            if name is None:
                hint = " (a class-conditioned UNet: the x4 upscaler, or SDXL)" if "label_emb" in key else ""
                raise CheckpointError(f"{source.path}: {key} has no place in an SD 1.x/2.x UNet{hint}")
            out["unet"].append(Entry(name, key))
        elif key.startswith(VAE):
            rest = key[len(VAE) :]
            if rest.startswith("loss."):  # the autoencoder's training discriminator, saved by some trainers
                continue
            name = vae_name(rest, vae_levels)
            if name is None:
                raise CheckpointError(f"{source.path}: {key} has no place in an SD VAE (AutoencoderKL)")
            out["vae"].append(Entry(name, key, squeeze=".mid_block.attentions." in name and name.endswith("weight")))
        elif key.startswith(te_prefix):
            rest = key[len(te_prefix) :]
            if fam == "sd1":
                name = clip_name(rest, te_layers)
                parts = None if name is None else ([(name, None)] if name else [])
            else:
                parts = open_clip_entries(rest, te_layers)
            if parts is None:
                raise CheckpointError(f"{source.path}: {key} has no place in a CLIP text encoder")
            out["text_encoder"] += [Entry(n, key, part=p) for n, p in parts]
    return out


# --- Configs from shapes -------------------------------------------------------------


def unet_facts(unet: dict[str, tuple[int, ...]], layout: UNetLayout) -> dict[str, Any]:
    """The UNet config fields its tensors' shapes fix."""
    n = layout.layers_per_block + 1
    channels = [unet[f"input_blocks.{1 + level * n}.0.out_layers.3.weight"][0] for level in range(layout.levels)]
    attn = [k for k in unet if k.endswith("attn2.to_k.weight")]
    if not attn:
        raise CheckpointError("the UNet has no cross-attention (attn2): it is not a text-conditioned SD UNet")
    first = next((i for i, a in enumerate(layout.down_attention) if a), None)
    if first is None:
        raise CheckpointError("the UNet's down blocks have no attention: it is not an SD 1.x/2.x UNet")
    prefix = f"input_blocks.{1 + first * n}.1."
    depth = len({k.split(".")[4] for k in unet if k.startswith(prefix + "transformer_blocks.")})
    facts: dict[str, Any] = {
        "in_channels": unet["input_blocks.0.0.weight"][1],
        "out_channels": unet["out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "cross_attention_dim": unet[attn[0]][1],
        "use_linear_projection": len(unet[prefix + "proj_in.weight"]) == 2,
    }
    if depth != 1:
        facts["transformer_layers_per_block"] = depth
    return facts


def vae_facts(vae: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    levels = len({k.split(".")[2] for k in vae if k.startswith("encoder.down.")})
    return {
        "in_channels": vae["encoder.conv_in.weight"][1],
        "out_channels": vae["decoder.conv_out.weight"][0],
        "latent_channels": vae["post_quant_conv.weight"][1],
        "block_out_channels": [vae[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "layers_per_block": len({k.split(".")[4] for k in vae if k.startswith("encoder.down.0.block.")}),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_encoder_facts(source: _Source, fam: str) -> dict[str, Any]:
    if fam == "sd1":
        te = {k.removeprefix("text_model."): s for k, s in _section(source.shapes, CLIP).items()}
        token, position = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
        fc1 = "encoder.layers.0.mlp.fc1.weight"
    else:
        te = _section(source.shapes, OPEN_CLIP)
        token, position, fc1 = (
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.0.mlp.c_fc.weight",
        )
    missing = [k for k in (token, position, fc1) if k not in te]
    if missing:
        raise CheckpointError(f"{source.path}: the text encoder has no {missing[0]}; the file is incomplete")
    blocks = _clip_blocks(source, fam)
    return {
        "vocab_size": te[token][0],
        "hidden_size": te[token][1],
        "max_position_embeddings": te[position][0],
        "intermediate_size": te[fc1][0],
        # SD 2 conditions on OpenCLIP's penultimate layer: diffusers' encoder stops one block short
        "num_hidden_layers": blocks if fam == "sd1" else blocks - 1,
    }


def _need_config(what: str) -> CheckpointError:
    return CheckpointError(
        f"{what}, so its config cannot be inferred from the weights; pass --config with a diffusers folder or Hub id "
        "whose configs match the file"
    )


def _check_divisible(widths: Iterable[int], by: int, what: str) -> None:
    bad = [w for w in widths if w % by]
    if bad:
        raise _need_config(f"{what} {bad[0]} is not a multiple of {by}")


def default_prediction_type(fam: str, in_channels: int, latent_channels: int, global_step: Any) -> str:
    """diffusers' rule: SD 2.x text-to-image files are v-prediction (the 768-v models) unless their global_step is
    the SD 2 base model's; everything else (SD 1.x, SD 2 inpainting and depth) predicts ε."""
    if fam == "sd2" and in_channels == latent_channels:
        return "epsilon" if global_step == _SD2_BASE_GLOBAL_STEP else "v_prediction"
    return "epsilon"


def _image_size(fam: str, prediction_type: str) -> int:
    """The side each family was trained at (diffusers' default image sizes): 768 for SD 2.x v-models, else 512."""
    return 768 if fam == "sd2" and prediction_type == "v_prediction" else 512


def infer_unet(
    facts: dict[str, Any], fam: str, prediction_type: str, vae_levels: int, heads: Any = None
) -> dict[str, Any]:
    """The UNet config from its shape facts and SD's rules: SD 1.x has 8 heads everywhere, SD 2.x heads of 64
    (unless `heads`, diffusers' attention_head_dim, is given)."""
    channels = facts["block_out_channels"]
    _check_divisible(channels, _NORM_GROUPS, "a UNet width")
    if heads is not None:
        pass
    elif fam == "sd2":
        _check_divisible(channels, _HEAD_DIM, "a UNet attention width")
        heads: Any = [c // _HEAD_DIM for c in channels]  # diffusers' attention_head_dim is the head count
    else:
        _check_divisible(channels, _SD1_HEADS, "a UNet attention width")
        heads = _SD1_HEADS
    v_model = fam == "sd2" and prediction_type == "v_prediction"
    return {
        "_class_name": "UNet2DConditionModel",
        **facts,
        "sample_size": _image_size(fam, prediction_type) // 2 ** (vae_levels - 1),
        "attention_head_dim": heads,
        "upcast_attention": v_model,  # SD 2.1 768-v: diffusers upcasts its attention to fp32
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": _NORM_GROUPS,
        "act_fn": "silu",
    }


def infer_vae(facts: dict[str, Any], fam: str, prediction_type: str) -> dict[str, Any]:
    _check_divisible(facts["block_out_channels"], _NORM_GROUPS, "a VAE width")
    return {
        "_class_name": "AutoencoderKL",
        **facts,
        "sample_size": _image_size(fam, prediction_type),
        "norm_num_groups": _NORM_GROUPS,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }


def infer_text_encoder(facts: dict[str, Any], fam: str) -> dict[str, Any]:
    """CLIP ViT-L (SD 1.x) or OpenCLIP ViT-H (SD 2.x): both have heads of 64."""
    _check_divisible([facts["hidden_size"]], _HEAD_DIM, "the text encoder's width")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **facts,
        "num_attention_heads": facts["hidden_size"] // _HEAD_DIM,
        "hidden_act": "quick_gelu" if fam == "sd1" else "gelu",  # OpenAI's CLIP vs OpenCLIP
        "layer_norm_eps": 1e-5,
        "projection_dim": 768 if fam == "sd1" else 512,
    }


def infer_scheduler(fam: str, prediction_type: str) -> dict[str, Any]:
    if fam == "sd1":
        return {
            "_class_name": "PNDMScheduler",
            **_SCHEDULER,
            "prediction_type": prediction_type,
            "skip_prk_steps": True,
        }
    return {"_class_name": "DDIMScheduler", **_SCHEDULER, "prediction_type": prediction_type}


_PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}


def original_config_values(path: str | Path, facts: dict[str, dict[str, Any]], fam: str) -> dict[str, dict[str, Any]]:
    """The diffusers config values a latent-diffusion inference YAML states (Stability's v2-inference-v.yaml,
    v2-inference.yaml, v1-inference.yaml…): what tensors cannot tell (ε or v, the training schedule, the attention
    heads, the VAE's scale, which CLIP layer conditions) and what they can, which must then agree with them."""
    import yaml

    where = f"--original-config {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError, IsADirectoryError) as e:
        raise CheckpointError(f"{where}: not a YAML file ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(
            f"{where}: no model.params; pass a latent-diffusion inference config such as v2-inference-v.yaml"
        )

    def section(name: str, within: dict[str, Any] = params) -> dict[str, Any]:
        value = within.get(name) or {}
        return value if isinstance(value, dict) else {}

    unet, first, cond = section("params", section("unet_config")), section("params", section("first_stage_config")), (
        section("params", section("cond_stage_config"))
    )  # fmt: skip
    ddconfig = section("ddconfig", first)
    out: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}

    parameterization = params.get("parameterization", "eps")
    if parameterization not in _PARAMETERIZATIONS:
        raise CheckpointError(f"{where}: parameterization {parameterization!r}: sdmesh serves 'eps' and 'v' models")
    out["scheduler"]["prediction_type"] = _PARAMETERIZATIONS[parameterization]

    def copy(to: dict[str, Any], frm: dict[str, Any], names: Iterable[tuple[str, str]]) -> None:
        for ours, theirs in names:
            if theirs in frm:
                to[ours] = frm[theirs]

    copy(out["scheduler"], params, (("beta_start", "linear_start"), ("beta_end", "linear_end")))
    copy(out["scheduler"], params, (("num_train_timesteps", "timesteps"),))
    copy(out["vae"], params, (("scaling_factor", "scale_factor"),))
    copy(out["vae"], first, (("latent_channels", "embed_dim"),))
    copy(out["vae"], ddconfig, (("in_channels", "in_channels"), ("out_channels", "out_ch")))
    copy(out["vae"], ddconfig, (("layers_per_block", "num_res_blocks"),))
    if "ch" in ddconfig and "ch_mult" in ddconfig:
        out["vae"]["block_out_channels"] = [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]

    copy(out["unet"], unet, (("in_channels", "in_channels"), ("out_channels", "out_channels")))
    copy(out["unet"], unet, (("layers_per_block", "num_res_blocks"), ("cross_attention_dim", "context_dim")))
    copy(out["unet"], unet, (("use_linear_projection", "use_linear_in_transformer"),))
    channels = facts["unet"]["block_out_channels"]
    if "model_channels" in unet and "channel_mult" in unet:
        out["unet"]["block_out_channels"] = channels = [unet["model_channels"] * m for m in unet["channel_mult"]]
    if unet.get("transformer_depth", 1) != 1:
        out["unet"]["transformer_layers_per_block"] = unet["transformer_depth"]
    head_channels, heads = unet.get("num_head_channels", -1), unet.get("num_heads", -1)
    if head_channels not in (None, -1):
        out["unet"]["attention_head_dim"] = [c // head_channels for c in channels]  # diffusers' name: the count
    elif heads not in (None, -1):
        out["unet"]["attention_head_dim"] = heads

    # SD 2 conditions on OpenCLIP's penultimate layer (diffusers' encoder stops a block short), SD 1 on the last
    layer = cond.get("layer", "penultimate" if fam == "sd2" else "last")
    blocks = facts["text_encoder"]["num_hidden_layers"] + (1 if fam == "sd2" else 0)
    if layer == "last":
        out["text_encoder"]["num_hidden_layers"] = blocks
    elif layer == "penultimate" and fam == "sd2":
        out["text_encoder"]["num_hidden_layers"] = blocks - 1
    else:
        raise CheckpointError(f"{where}: cond_stage_config layer {layer!r} is not one sdmesh reads ('last'"
                              + (", 'penultimate')" if fam == "sd2" else ")"))  # fmt: skip
    return {c: v for c, v in out.items() if v}


def _facts(source: _Source, fam: str, layout: UNetLayout) -> dict[str, dict[str, Any]]:
    return {
        "unet": unet_facts(_section(source.shapes, UNET), layout),
        "vae": vae_facts(_section(source.shapes, VAE)),
        "text_encoder": text_encoder_facts(source, fam),
    }


def _infer(
    component: str, facts: dict[str, dict[str, Any]], fam: str, prediction_type: str, given: dict[str, Any]
) -> dict[str, Any]:
    """A component's config inferred, with `given` (an original config's values) in place of the guesses."""
    if component == "text_encoder":
        return {**infer_text_encoder(facts["text_encoder"], fam), **given}
    inferred = _infer_diffusers(component, facts, fam, prediction_type, given)
    return {"_diffusers_version": _DIFFUSERS_VERSION, **inferred, **given}


def _infer_diffusers(
    component: str, facts: dict[str, dict[str, Any]], fam: str, prediction_type: str, given: dict[str, Any]
) -> dict:
    if component == "unet":
        levels = len(facts["vae"]["block_out_channels"])
        return infer_unet(facts["unet"], fam, prediction_type, levels, given.get("attention_head_dim"))
    if component == "vae":
        return infer_vae(facts["vae"], fam, prediction_type)
    return infer_scheduler(fam, prediction_type)


COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


def infer_configs(
    source: _Source, *, prediction_type: str | None = None, original_config: str | Path | None = None
) -> dict[str, dict[str, Any]]:
    """Diffusers configs for unet, vae, text_encoder and scheduler from the file's shapes and SD's rules, or from
    `original_config` (a latent-diffusion inference YAML) where it says."""
    fam = family(source)
    facts = _facts(source, fam, unet_layout(_section(source.shapes, UNET), str(source.path)))
    return _complete({}, facts, fam, _originals(original_config, facts, fam), prediction_type, source)


def _complete(
    configs: dict[str, dict[str, Any]],
    facts: dict[str, dict[str, Any]],
    fam: str,
    originals: dict[str, dict[str, Any]],
    prediction_type: str | None,
    source: _Source,
) -> dict[str, dict[str, Any]]:
    """Every component's config: those given (--config) as they are, the others inferred with the original
    config's values. The prediction type: `prediction_type`, else --config's, else the original config's, else
    diffusers' guess."""
    if prediction_type is None:
        prediction_type = (
            configs.get("scheduler", {}).get("prediction_type")
            or originals.get("scheduler", {}).get("prediction_type")
            or default_prediction_type(
                fam, facts["unet"]["in_channels"], facts["vae"]["latent_channels"], source.global_step
            )
        )
    configs = {
        c: configs[c] if c in configs else _infer(c, facts, fam, prediction_type, originals.get(c, {}))
        for c in COMPONENTS
    }
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
    return configs


def _originals(original_config: str | Path | None, facts: dict[str, dict[str, Any]], fam: str) -> dict[str, dict]:
    """An original config's values, checked against what the tensors say."""
    if original_config is None:
        return {}
    originals = original_config_values(original_config, facts, fam)
    for component, values in originals.items():
        if component in ("unet", "vae"):
            _check_agrees(values, facts[component], component, f"--original-config {original_config}")
    return originals


# --- Writing -------------------------------------------------------------------------


def _st_name(dtype: np.dtype) -> str:
    for name, t in safetensors_dtypes().items():
        if np.dtype(t) == dtype:
            return name
    raise CheckpointError(f"cannot write dtype {dtype} to safetensors")


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype]], arrays: Iterator[np.ndarray]):
    """Write `tensors` (name, shape, dtype), whose data `arrays` yields in the same order, one at a time."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _st_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, shape, dtype), array in zip(tensors, arrays, strict=True):
            if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                raise AssertionError(f"{name}: planned {shape} {dtype}, got {array.shape} {array.dtype}")
            f.write(np.ascontiguousarray(array).tobytes())


def _write_component(folder: Path, stem: str, source: _Source, entries: list[Entry]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entries = sorted(entries, key=lambda e: e.name)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"{source.path}: two tensors map to {dup}; the file is not an SD 1.x/2.x checkpoint")
    specs = [(e.name, e.shape(source.shapes[e.source]), source.dtypes[e.source]) for e in entries]

    def arrays() -> Iterator[np.ndarray]:
        cached: tuple[str, np.ndarray] | None = None  # q, k and v come from one packed tensor: read it once
        for e in entries:
            if cached is None or cached[0] != e.source:
                cached = (e.source, source.read(e.source))
            yield e.apply(cached[1])

    write_safetensors(folder / f"{stem}.safetensors", specs, arrays())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(tokenizer: Path, out: Path) -> None:
    if not (tokenizer / "vocab.json").is_file() and (tokenizer / "tokenizer").is_dir():
        tokenizer = tokenizer / "tokenizer"
    files = [tokenizer / n for n in _TOKENIZER_FILES if (tokenizer / n).is_file()]
    names = {f.name for f in files}
    if not ({"vocab.json", "merges.txt"} <= names or "tokenizer.json" in names):
        raise CheckpointError(
            f"--tokenizer {tokenizer}: no CLIP tokenizer files there (vocab.json + merges.txt, or tokenizer.json)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, out / f.name)


# --- The conversion ------------------------------------------------------------------


def _local(name: str | Path, *, flag: str, patterns: list[str]) -> Path:
    """A local folder, or a Hub id fetched (just `patterns`) into huggingface_hub's cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    return checkpoint.hub_snapshot(str(name), patterns=patterns, flag=flag)


def _configs_from(folder: Path) -> dict[str, dict[str, Any]]:
    """The component configs a diffusers folder has (each overrides inference; a missing one is inferred)."""
    found = {}
    for component, name in (
        ("unet", "config.json"),
        ("vae", "config.json"),
        ("text_encoder", "config.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        if (folder / component / name).is_file():
            found[component] = checkpoint.read_config(folder, component, name)
    if not found:
        raise CheckpointError(
            f"--config {folder}: no unet/config.json, vae/config.json, text_encoder/config.json or "
            "scheduler/scheduler_config.json there; point it at a diffusers-format model folder"
        )
    return found


def _same(given: Any, fact: Any) -> bool:
    if isinstance(given, (list, tuple)):
        if isinstance(fact, (list, tuple)):
            return list(given) == list(fact)
        return all(g == fact for g in given)  # diffusers writes a per-block list or one value for all
    return given == fact


def _check_agrees(given: dict[str, Any], facts: dict[str, Any], component: str, where: str) -> None:
    """A config given with --config or --original-config must describe the file's tensors (else the load fails
    later, less clearly); `where` names the flag and its value."""
    for key, fact in facts.items():
        if key not in given:
            continue
        if key == "num_hidden_layers":  # a config may use fewer layers than the file has, not more
            if given[key] > fact:
                raise CheckpointError(f"{where}: {component} num_hidden_layers is {given[key]} but the file has {fact}")
        elif not _same(given[key], fact):
            raise CheckpointError(
                f"{where}: {component} {key} is {given[key]} but the file's weights say {fact}; "
                "the config belongs to a different model"
            )


def convert_single_file(
    path: str | Path,
    out_folder: str | Path,
    *,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    prediction_type: str | None = None,
    original_config: str | Path | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write `path` (an SD 1.x/2.x .safetensors, or .ckpt with allow_pickle) as a diffusers folder at `out_folder`.

    `config`: a diffusers folder or Hub id whose JSON configs replace the inferred ones, component by component
    (diffusers' `from_single_file(config=)`); `original_config`: a latent-diffusion inference YAML whose values
    replace the inferred ones (`from_single_file(original_config=)`), below `config`; `tokenizer`: a folder or
    Hub id (default: `config`'s tokenizer/, else CLIP's, from the package); `prediction_type` overrides both.
    """
    path, out = Path(path), Path(out_folder)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"--prediction-type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}")
    source = open_single_file(path, allow_pickle=allow_pickle)
    fam = family(source)
    layout = unet_layout(_section(source.shapes, UNET), str(path))
    facts = _facts(source, fam, layout)
    config_folder = None if config is None else _local(config, flag="--config", patterns=["*.json"])
    configs = {} if config_folder is None else _configs_from(config_folder)
    for component, values in configs.items():
        if component in facts:
            _check_agrees(values, facts[component], component, f"--config {config}")
    configs = _complete(configs, facts, fam, _originals(original_config, facts, fam), prediction_type, source)
    kind = _kind(configs["unet"]["in_channels"], facts["vae"]["latent_channels"], path)

    entries = plan(
        source, fam, layout, len(facts["vae"]["block_out_channels"]), configs["text_encoder"]["num_hidden_layers"]
    )
    _write_tokenizer(tokenizer, config_folder, fam, configs["text_encoder"]["vocab_size"], out / "tokenizer")
    for component in ("unet", "vae", "text_encoder"):
        _write_component(out / component, checkpoint.WEIGHT_STEMS[component], source, entries[component])
        _write_json(out / component / "config.json", configs[component])
    _write_json(out / "scheduler" / "scheduler_config.json", configs["scheduler"])
    _write_json(
        out / "model_index.json",
        {
            "_class_name": _PIPELINES[kind],
            "_diffusers_version": _DIFFUSERS_VERSION,
            "_sdmesh_single_file": str(path),
            "scheduler": ["diffusers", configs["scheduler"].get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
    return out


def _kind(in_channels: int, latent_channels: int, path: Path) -> str:
    """contract.model_kind's rule, for the kinds a single file can be."""
    kinds = {latent_channels: "text-to-image", 2 * latent_channels + 1: "inpainting", latent_channels + 1: "depth"}
    if in_channels not in kinds:
        raise CheckpointError(
            f"{path}: a UNet with {in_channels} input channels for {latent_channels} latent channels is none of "
            "text-to-image, inpainting or depth (instruct-pix2pix and others are not supported)"
        )
    return kinds[in_channels]


def _write_tokenizer(
    tokenizer: str | Path | None, config_folder: Path | None, fam: str, vocab_size: int, out: Path
) -> None:
    if tokenizer is not None:
        _copy_tokenizer(_local(tokenizer, flag="--tokenizer", patterns=["*.json", "*.txt"]), out)
    elif config_folder is not None and (config_folder / "tokenizer").is_dir():
        _copy_tokenizer(config_folder / "tokenizer", out)
    elif vocab_size != CLIP_VOCAB_SIZE:
        raise CheckpointError(
            f"the text encoder has a vocabulary of {vocab_size} tokens, not CLIP's {CLIP_VOCAB_SIZE}, so sdmesh's "
            "copy of CLIP's tokenizer does not fit it; pass --tokenizer with the tokenizer folder or Hub id it uses"
        )
    else:
        write_clip_tokenizer(out, pad_token=PAD_TOKENS[fam])
