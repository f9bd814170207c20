"""LoRA files as people have them → one canonical form: per targeted layer, (down, up, scale) in our Flax layout.

    lora = load_lora(path, unet.init_shapes(unet_config), text_encoder.init_shapes(te_config))
    layer = lora.unet["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"]
    # the layer's output gains weight · layer.scale · (x @ layer.down) @ layer.up
    # i.e. its kernel gains weight · scale · down @ up  (Conv: einsum("hwir,ro->hwio", down, up))

Layouts read (a LoRA'd layer is a few tensors sharing a module name):
  kohya / A1111      lora_unet_<m>.lora_down.weight, .lora_up.weight, .alpha;  lora_te_text_model_<m>...
                     <m> is diffusers' module path with every "." made "_". Our parameter paths are the same
                     names with "/" for "." (a list index joins its parent: down_blocks_0), so <m> is looked up
                     in a table made from our own paths with "/" → "_". kohya's LDM/SGM spelling of the UNet
                     (lora_unet_input_blocks_4_1_...) is a second table, made from our block structure.
  diffusers / PEFT   unet.<module>.lora_A.weight / lora_B.weight, text_encoder.<module>...; alpha from the
                     adapter config diffusers stores in the file's metadata ("lora_adapter_metadata"), else = rank.
  older diffusers    <module>.lora.down.weight / .up.weight (LoRACompatible layers),
                     <attn>.processor.to_q_lora.down.weight (attention processors; to_out_lora is to_out.0),
                     text_encoder.<m>.lora_linear_layer.down.weight, and .alpha keys beside any of them.
  Keys without a unet./text_encoder. prefix are the UNet's (diffusers' `save_attn_procs`), unless they start text_model.
Text-encoder names are transformers' with or without the leading text_model. (transformers 5 dropped it,
as `text_encoder.fix_checkpoint_key` does for checkpoints).

Layout: torch Linear (out, in) → our (in, out); Conv (r, in, kh, kw) → (kh, kw, in, r); an up-projection must be
a Linear or a 1×1 conv, whose (out, r, 1, 1) is flattened to (r, out). A 1×1 conv and a Dense are the same map,
so a LoRA saved as one for a layer we hold as the other (SD 1.x's proj_in/proj_out) is reshaped to fit.

Refused, naming the first offending key: a key that maps to no Dense/Conv kernel of this model, ranks that
disagree between down and up, in/out sizes that disagree with the layer, a LoRA for another base (its
cross-attention reads another conditioning width, or its text-encoder part another hidden size), SDXL LoRAs
(two text encoders), LyCORIS' LoHa/LoKr/Tucker (lora_mid) and DoRA, LoRA biases, and pickles unless allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.services.checkpoints.weights import CheckpointError, flax_path, read_safetensors


class LoraError(CheckpointError):
    """A LoRA file that does not fit this model or that sdmesh cannot read."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    down: np.ndarray  # Dense: (in, r); Conv: (kh, kw, in, r) — our Flax kernel layout; float32
    up: np.ndarray  # (r, out); a 1×1-conv up-projection is flattened to this
    scale: float  # alpha / r (alpha / √r under rsLoRA); 1.0 when the file has no alpha


@dataclasses.dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem
    unet: dict[str, LoraLayer]  # the layer's Flax param path, "/"-joined, without "/kernel"
    text_encoder: dict[str, LoraLayer]  # the same for our CLIP text encoder


COMPONENTS = ("unet", "text_encoder")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# Conditioning widths of the bases people train LoRAs for: the UNet's cross-attention input
# (attn2.to_k/to_v) and the text encoder's hidden size.
_CONDITIONING_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_TEXT_ENCODER_BASES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}  # CLIP ViT-L, OpenCLIP ViT-H, OpenCLIP bigG


# --- Reading files -----------------------------------------------------------------


def read_tensor_file(
    path: Path, *, allow_pickle: bool, what: str, error: type[CheckpointError] = LoraError
) -> tuple[Any, dict[str, str]]:
    """(contents, metadata) of a .safetensors file ({key: array}, its __metadata__) or, only with
    `allow_pickle`, of a PyTorch pickle (what torch.load(weights_only=True) returns, tensors as numpy; {}).
    Failures raise `error`, naming the file as a `what` (LoRA, embedding)."""
    if not path.is_file():
        raise error(f"no {what} file at {path}")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise error(
                f"{path} is a PyTorch pickle ({path.suffix}); pickles can run code when loaded. Convert it to "
                "safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        return _torch_load(path, error), {}
    if path.suffix != ".safetensors":
        raise error(f"{path}: a {what} file is .safetensors (or, with --allow-pickle, {'/'.join(PICKLE_SUFFIXES)})")
    try:
        return dict(read_safetensors(path)), _safetensors_metadata(path)
    except CheckpointError as e:  # a truncated or corrupt file: the same words, as this file's error
        raise error(str(e)) from e


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))  # read_safetensors has checked it
    return dict(header.get("__metadata__") or {})


def _torch_load(path: Path, error: type[CheckpointError]) -> Any:
    try:
        import torch
    except ImportError as e:
        raise error(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch)") from e
    try:  # no mmap: older (pre-zipfile) .pt files, common for embeddings, cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for objects weights_only forbids, RuntimeError for corrupt files
        raise error(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
            "it holds more than tensors, or is corrupt"
        ) from e

    def to_numpy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        if isinstance(value, dict):
            return {k: to_numpy(v) for k, v in value.items()}
        return value

    return to_numpy(state)


def load_lora(
    path: str | Path,
    unet_shapes: Mapping[str, Any] | None,
    text_encoder_shapes: Mapping[str, Any] | None,
    *,
    allow_pickle: bool = False,
) -> LoraFile:
    """Read a LoRA file and map it onto our models, given their param-shape trees (`init_shapes`); a component
    given as None is not checked and comes back empty (a stage that holds only the other model)."""
    path = Path(path).expanduser()
    contents, metadata = read_tensor_file(path, allow_pickle=allow_pickle, what="LoRA")
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict):  # a Lightning-style wrapper
        contents = contents["state_dict"]
    if not isinstance(contents, dict) or not all(isinstance(v, np.ndarray) for v in contents.values()):
        raise LoraError(f"{path} is not a LoRA: expected a flat mapping of tensor names to tensors")
    return lora_from_tensors(
        contents,
        unet_shapes,
        text_encoder_shapes,
        name=path.stem,
        adapter_configs=adapter_configs(metadata),
        source=str(path),
    )


def adapter_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_adapter_metadata` (JSON: "unet.lora_alpha", "text_encoder.r", ...) → per component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise LoraError(f"the file's lora_adapter_metadata is not JSON ({e})") from e
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


# --- Parsing keys ------------------------------------------------------------------

# One tensor of a LoRA'd layer: the module's name, then which tensor it is.
_TENSOR = re.compile(
    r"^(?P<module>.+?)(?:"
    r"\.lora_(?P<peft>A|B)\.weight"  # PEFT (diffusers today)
    r"|\.lora_(?P<kohya>down|up)\.weight"  # kohya / A1111
    r"|\.(?:lora|lora_linear_layer)\.(?P<old>down|up)\.weight"  # diffusers' LoRACompatible layers
    r"|_lora\.(?P<processor>down|up)\.weight"  # diffusers' attention processors: to_q_lora.down
    r"|\.(?P<alpha>alpha)"
    r")$"
)
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up"}

# Layouts we recognise and refuse: a substring of the key → why.
_REFUSED = {
    "lora_te1_": "an SDXL LoRA (two text encoders); sdmesh serves SD 1.x and 2.x",
    "lora_te2_": "an SDXL LoRA (two text encoders); sdmesh serves SD 1.x and 2.x",
    "text_encoder_2.": "an SDXL LoRA (two text encoders); sdmesh serves SD 1.x and 2.x",
    "hada_": "a LyCORIS LoHa, not a LoRA; sdmesh reads plain LoRA/LoCon (lora_down/lora_up)",
    "lokr_": "a LyCORIS LoKr, not a LoRA; sdmesh reads plain LoRA/LoCon (lora_down/lora_up)",
    "lora_mid": "a LyCORIS LoCon with Tucker decomposition (lora_mid); sdmesh reads plain LoRA/LoCon",
    "dora_scale": "a DoRA (weight-decomposed LoRA), which sdmesh does not apply",
    "lora_magnitude_vector": "a DoRA (weight-decomposed LoRA), which sdmesh does not apply",
    "bundle_emb.": "a LoRA with bundled textual-inversion embeddings; load the embeddings from their own files",
}

# diffusers' attention-processor names for the projections they wrap.
_PROCESSOR_TARGETS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


@dataclasses.dataclass
class _Module:
    """One LoRA'd layer as the file names it, and its tensors."""

    component: str  # "unet" | "text_encoder"
    name: str  # dotted diffusers module path, or kohya's underscore name (text_model. removed either way)
    kohya: bool
    tensors: dict[str, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # down/up/alpha → (key, t)

    @property
    def first_key(self) -> str:
        return next(iter(self.tensors.values()))[0]


def _parse(key: str, source: str) -> tuple[str, str, bool, str]:
    """A tensor name → (component, module name, is kohya, role)."""
    for marker, why in _REFUSED.items():
        if marker in key:
            raise LoraError(f"{source}: tensor {key!r}: this file is {why}")
    if key.endswith(".bias") and "lora" in key:
        raise LoraError(f"{source}: tensor {key!r}: LoRAs with a bias on the up-projection are not supported")
    m = _TENSOR.match(key)
    if m is None:
        raise LoraError(
            f"{source}: tensor {key!r} is not a LoRA weight sdmesh reads (expected <module>.lora_down/lora_up.weight "
            "and .alpha (kohya), <module>.lora_A/lora_B.weight (PEFT/diffusers), or diffusers' older .lora.down/.up)"
        )
    module = m["module"]
    role = "alpha" if m["alpha"] else _ROLES[m["peft"] or m["kohya"] or m["old"] or m["processor"]]
    if module.startswith("lora_unet_"):
        return "unet", module.removeprefix("lora_unet_"), True, role
    if module.startswith("lora_te_"):
        return "text_encoder", module.removeprefix("lora_te_").removeprefix("text_model_"), True, role
    component = "unet"
    for prefix in COMPONENTS:
        if module.startswith(prefix + "."):
            component, module = prefix, module.removeprefix(prefix + ".")
            break
    else:
        if module.startswith("text_model."):
            component = "text_encoder"
    if component == "text_encoder":
        module = module.removeprefix("text_model.")
    module = module.replace(".processor.", ".")
    if m["processor"]:
        parent, _, projection = module.rpartition(".")
        target = _PROCESSOR_TARGETS[component].get(projection, projection)
        module = f"{parent}.{target}" if parent else target
    return component, module, False, role


def _group(tensors: Mapping[str, np.ndarray], source: str) -> list[_Module]:
    modules: dict[tuple[str, str, bool], _Module] = {}
    for key, tensor in tensors.items():
        component, name, kohya, role = _parse(key, source)
        module = modules.setdefault((component, name, kohya), _Module(component, name, kohya))
        if role in module.tensors:
            raise LoraError(
                f"{source}: tensors {module.tensors[role][0]!r} and {key!r} are both the {role} of one layer"
            )
        module.tensors[role] = (key, np.asarray(tensor))
    if not modules:
        raise LoraError(f"{source} holds no tensors")
    return list(modules.values())


# --- Our models' layers --------------------------------------------------------------


def _kernels(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(module path, kernel shape) of every Dense/Conv in a params(-shape) tree."""
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _kernels(value, prefix + (name,))
        elif name == "kernel":
            yield prefix, tuple(value.shape)


# kohya's LDM/SGM (original CompVis UNet) names for the layers inside a ResnetBlock2D.
_LDM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
_LDM_RESNET["conv_shortcut"] = "skip_connection"
_LDM_TOP = {
    ("conv_in",): ("input_blocks", "0", "0"),
    ("time_embedding", "linear_1"): ("time_embed", "0"),
    ("time_embedding", "linear_2"): ("time_embed", "2"),
    ("conv_out",): ("out", "2"),
}


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _ldm_paths(paths: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Our UNet path → the LDM UNet's, from our block structure (the inverse of diffusers' checkpoint converter).

    LDM numbers the UNet's children flat: input_blocks 0 is conv_in; then per level one input block per resnet
    ([resnet, attention] as children 0, 1) and one more for the downsampler (child 0, "op"). middle_block is
    [resnet, attention, resnet]. output_blocks: one per up-block resnet ([resnet, attention, upsampler]; the
    upsampler is child 1 when the level has no attention).
    """
    paths = list(paths)
    resnets: dict[str, set[str]] = {}
    for p in paths:
        if len(p) > 1 and p[1].startswith("resnets_"):
            resnets.setdefault(p[0], set()).add(p[1])
    prefixes = {p[:2] for p in paths}
    blocks: dict[tuple[str, ...], tuple[str, ...]] = {
        ("mid_block", "resnets_0"): ("middle_block", "0"),
        ("mid_block", "attentions_0"): ("middle_block", "1"),
        ("mid_block", "resnets_1"): ("middle_block", "2"),
    }
    for kind, ldm, first in (("down_blocks", "input_blocks", 1), ("up_blocks", "output_blocks", 0)):
        index = first
        for block in sorted((b for b in resnets if b.startswith(kind + "_")), key=_index):
            has_attention = any(p[0] == block and p[1].startswith("attentions_") for p in prefixes)
            for layer in range(len(resnets[block])):
                blocks[(block, f"resnets_{layer}")] = (ldm, str(index), "0")
                blocks[(block, f"attentions_{layer}")] = (ldm, str(index), "1")
                index += 1
            if (block, "downsamplers_0") in prefixes:
                blocks[(block, "downsamplers_0", "conv")] = (ldm, str(index), "0", "op")
                index += 1
            if (block, "upsamplers_0") in prefixes:
                blocks[(block, "upsamplers_0", "conv")] = (ldm, str(index - 1), "2" if has_attention else "1", "conv")
    out: dict[tuple[str, ...], tuple[str, ...]] = {}
    for p in paths:
        if p in _LDM_TOP:
            out[p] = _LDM_TOP[p]
        elif p[:3] in blocks:
            out[p] = blocks[p[:3]] + p[3:]
        elif p[:2] in blocks:
            rest = p[2:]
            if p[1].startswith("resnets_") and len(rest) == 1:
                rest = (_LDM_RESNET.get(rest[0], rest[0]),)
            out[p] = blocks[p[:2]] + rest
    return out


@dataclasses.dataclass
class _Model:
    """One model's Dense/Conv kernels, and kohya's names for them."""

    kernels: dict[tuple[str, ...], tuple[int, ...]]
    kohya: dict[str, tuple[str, ...] | None]  # underscore name → path (None: two paths share the name)

    @classmethod
    def of(cls, shapes: Mapping[str, Any], *, ldm_names: bool) -> _Model:
        kernels = dict(_kernels(shapes))
        kohya: dict[str, tuple[str, ...] | None] = {}
        names = [(p, p) for p in kernels]
        if ldm_names:
            names += [(ldm, p) for p, ldm in _ldm_paths(kernels).items()]
        for spelled, path in names:
            name = "_".join(spelled)
            kohya[name] = path if kohya.get(name, path) == path else None
        return cls(kernels, kohya)

    def resolve(self, module: _Module) -> tuple[str, ...] | None:
        if module.kohya:
            return self.kohya.get(module.name)
        path = flax_path(module.name)
        return path if path in self.kernels else None

    def width(self, *ends: tuple[str, ...]) -> int | None:
        """The input width of the first kernel whose path ends with one of `ends`."""
        for path, shape in self.kernels.items():
            if any(path[-len(e) :] == e for e in ends):
                return shape[-2]
        return None


# The layers whose input width is the conditioning width (UNet) or the hidden size (text encoder).
_CONDITIONING_LAYERS = (("attn2", "to_k"), ("attn2", "to_v"))
_HIDDEN_LAYERS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "fc1"))


def _is_one_of(module: _Module, path: tuple[str, ...] | None, layers: tuple[tuple[str, ...], ...]) -> bool:
    if path is not None:
        return path[-2:] in layers
    name = module.name.replace(".", "_")  # a layer this model lacks: judge by its name
    return any(name.endswith("_".join(layer)) for layer in layers)


def _base(width: int, bases: Mapping[int, str], what: str) -> str:
    return f"{bases[width]} ({width}-d {what})" if width in bases else f"a model with {width}-d {what}"


# --- Building the canonical form ----------------------------------------------------------


def lora_from_tensors(
    tensors: Mapping[str, np.ndarray],
    unet_shapes: Mapping[str, Any] | None,
    text_encoder_shapes: Mapping[str, Any] | None,
    *,
    name: str,
    adapter_configs: Mapping[str, Mapping[str, Any]] | None = None,
    source: str = "LoRA",
) -> LoraFile:
    """Map a LoRA's tensors (torch names and layouts) onto our models; `adapter_configs` per component is
    PEFT's LoraConfig as a dict (lora_alpha, alpha_pattern, use_rslora, ...), where the file carries one."""
    models = {}
    if unet_shapes is not None:
        models["unet"] = _Model.of(unet_shapes, ldm_names=True)
    if text_encoder_shapes is not None:
        models["text_encoder"] = _Model.of(text_encoder_shapes, ldm_names=False)
    configs = adapter_configs or {}
    for component, config in configs.items():
        if config.get("use_dora"):
            raise LoraError(f"{source}: its {component} adapter config says use_dora; sdmesh does not apply DoRA")
    modules = [module for module in _group(tensors, source) if module.component in models]
    resolved = [(module, models[module.component].resolve(module)) for module in modules]

    # Another base first: its keys may also match no layer, and "wrong base" is the useful message.
    checks = (
        ("unet", _CONDITIONING_LAYERS, _CONDITIONING_BASES, "conditioning", "cross-attention reads"),
        ("text_encoder", _HIDDEN_LAYERS, _TEXT_ENCODER_BASES, "text encoder", "text-encoder layers are"),
    )
    for component, width_layers, bases, what, reads in checks:
        if component not in models:
            continue
        model_width = models[component].width(*width_layers)
        for module, path in resolved:
            if module.component != component or "down" not in module.tensors:
                continue
            key, down = module.tensors["down"]
            if not _is_one_of(module, path, width_layers) or down.ndim != 2 or model_width is None:
                continue
            if down.shape[1] != model_width:
                raise LoraError(
                    f"{source}: this LoRA is for {_base(down.shape[1], bases, what)}; the model is "
                    f"{_base(model_width, bases, what)}: its {reads} {down.shape[1]}-d (tensor {key!r}). "
                    "Use a LoRA trained for this model's base"
                )

    layers: dict[str, dict[str, LoraLayer]] = {c: {} for c in COMPONENTS}
    for module, path in resolved:
        if path is None:
            raise LoraError(f"{source}: tensor {module.first_key!r} {_no_layer(module, models[module.component])}")
        target = "/".join(path)
        if target in layers[module.component]:
            raise LoraError(f"{source}: tensor {module.first_key!r} targets {target}, which another key already did")
        config = configs.get(module.component, {})
        kernel = models[module.component].kernels[path]
        layers[module.component][target] = _layer(module, kernel, target, config, source)
    return LoraFile(name=name, unet=layers["unet"], text_encoder=layers["text_encoder"])


def _no_layer(module: _Module, model: _Model) -> str:
    kind = "kohya" if module.kohya else "diffusers"
    if module.kohya and module.name in model.kohya:  # in the table but unresolved: two layers share the name
        return f"names {module.name!r}, which is more than one layer of this model"
    hint = ""
    if any(part in module.name for part in ("input_blocks", "middle_block", "output_blocks")) and not module.kohya:
        hint = " (LDM/CompVis names in dotted form; sdmesh reads them in kohya's lora_unet_input_blocks_... form)"
    return (
        f"targets {module.component} layer {module.name!r} ({kind} names), which is not a Dense or Conv "
        f"of this model's {module.component}{hint}: is the LoRA for another model or architecture?"
    )


def _layer(module: _Module, kernel: tuple[int, ...], target: str, config: Mapping[str, Any], source: str) -> LoraLayer:
    for role in ("down", "up"):
        if role not in module.tensors:
            key = module.first_key
            raise LoraError(f"{source}: tensor {key!r} has no matching {role}-projection (lora_{role} / lora_A/B)")
    down_key, down = module.tensors["down"]
    up_key, up = module.tensors["up"]
    where = f"{source}: tensor {down_key!r} (for {target}, kernel {kernel})"

    # torch → ours: Linear (r, in) → (in, r); Conv (r, in, kh, kw) → (kh, kw, in, r); up (out, r[, 1, 1]) → (r, out).
    if down.ndim == 4:
        down = down.transpose(2, 3, 1, 0)
    elif down.ndim == 2:
        down = down.T
    else:
        raise LoraError(f"{where}: a down-projection is 2-D (Linear) or 4-D (Conv), not shape {down.shape}")
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if up.ndim != 2:
        raise LoraError(f"{source}: tensor {up_key!r}: an up-projection is a Linear or a 1×1 conv, not {up.shape}")
    up = up.T
    # A 1×1 conv and a Dense are one map: fit the layer as we hold it.
    if len(kernel) == 4 and kernel[:2] == (1, 1) and down.ndim == 2:
        down = down.reshape(1, 1, *down.shape)
    elif len(kernel) == 2 and down.ndim == 4 and down.shape[:2] == (1, 1):
        down = down.reshape(down.shape[2:])

    rank = down.shape[-1]
    if up.shape[0] != rank:
        raise LoraError(f"{where}: rank {rank}, but its up-projection {up_key!r} has rank {up.shape[0]}")
    if down.ndim != len(kernel):
        layer_kind, lora_kind = ("Conv", "Dense") if len(kernel) == 4 else ("Dense", "Conv")
        raise LoraError(f"{where}: a {lora_kind} LoRA for a {layer_kind} layer")
    if down.shape[:-1] != kernel[:-1]:
        raise LoraError(f"{where}: reads {down.shape[:-1]} but the layer takes {kernel[:-1]}")
    if up.shape[1] != kernel[-1]:
        raise LoraError(f"{source}: tensor {up_key!r} writes {up.shape[1]} features, the layer {target} {kernel[-1]}")

    if "alpha" in module.tensors:
        alpha_key, alpha_tensor = module.tensors["alpha"]
        if alpha_tensor.size != 1:
            raise LoraError(f"{source}: tensor {alpha_key!r}: an alpha is one number, not shape {alpha_tensor.shape}")
        alpha = float(alpha_tensor.reshape(()))
    elif config:
        names = (module.name, f"text_model.{module.name}") if module.component == "text_encoder" else (module.name,)
        alpha = float(_pattern(config.get("alpha_pattern") or {}, names, config.get("lora_alpha", rank)))
    else:
        alpha = float(rank)  # kohya and diffusers alike: no alpha means scale 1
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoraLayer(down=down.astype(np.float32), up=up.astype(np.float32), scale=scale)


def _pattern(patterns: Mapping[str, Any], names: Iterable[str], default: Any) -> Any:
    """PEFT's per-module override (`alpha_pattern`): the first pattern matching a module name's tail
    (peft's `get_pattern_key`); `names` spells the module with and without transformers 4's text_model."""
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default


LORA_SUFFIXES = (".safetensors",)


class LoraDirectory:
    """The LoRA files of a --lora-dir, named by their stem (subfolders searched too, as A1111 does), read on
    first use and mapped onto this stage's model (`load_lora`'s shapes: None for the model it does not hold)."""

    def __init__(
        self,
        directory: str | Path,
        unet_shapes: Mapping[str, Any] | None,
        text_encoder_shapes: Mapping[str, Any] | None,
        *,
        allow_pickle: bool = False,
    ):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise LoraError(f"--lora-dir {self.directory} is not a folder")
        self.unet_shapes, self.text_encoder_shapes, self.allow_pickle = unet_shapes, text_encoder_shapes, allow_pickle

    def files(self) -> dict[str, Path]:
        """Name → file, for every LoRA file there now (a file added while serving is found on its first use)."""
        suffixes = LORA_SUFFIXES + (PICKLE_SUFFIXES if self.allow_pickle else ())
        found: dict[str, Path] = {}
        for path in sorted(self.directory.rglob("*")):
            if path.suffix in suffixes and path.is_file():
                found.setdefault(path.stem, path)
        return found

    def load(self, name: str) -> LoraFile:
        """The named LoRA, read now; LoraError naming the problem when it is missing or does not fit."""
        files = self.files()
        if name not in files:
            raise LoraError(self.missing(name, files))
        return load_lora(files[name], self.unet_shapes, self.text_encoder_shapes, allow_pickle=self.allow_pickle)

    def missing(self, name: str, files: Mapping[str, Path]) -> str:
        known = ", ".join(sorted(files)[:20]) or "none"
        pickles = "" if self.allow_pickle else " (.pt/.ckpt files are read only with --allow-pickle)"
        return f"no LoRA named {name!r} in --lora-dir {self.directory}; it has: {known}{pickles}"
