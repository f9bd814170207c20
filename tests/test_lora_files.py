"""LoRA and textual-inversion files read into one canonical form (services/checkpoints/lora.py, embeddings.py).

The reference is PEFT itself: LoRAs on diffusers' UNet2DConditionModel and transformers' CLIPTextModel at the
tiny SD 1.x config (B random, so no delta is zero), saved by diffusers' `save_lora_weights`; every layer we read
must add to its kernel what peft's `merge` adds to the torch weight. The kohya and LDM layouts are written here
from the same torch modules by small converters whose rules are in their docstrings.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, PEFT_TO_DIFFUSERS, convert_state_dict  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdmesh.services.checkpoints.embeddings import EmbeddingError, load_embedding  # noqa: E402
from sdmesh.services.checkpoints.lora import (  # noqa: E402
    LoraError,
    LoraFile,
    adapter_configs,
    load_lora,
    lora_from_tensors,
    read_tensor_file,
)
from sdmesh.services.checkpoints.weights import flax_path, to_flax_layout  # noqa: E402
from sdmesh.services.dev.reference import TINY  # noqa: E402
from sdmesh.services.models import text_encoder as te  # noqa: E402
from sdmesh.services.models import unet as un  # noqa: E402

SPEC = TINY["sd1"]

# Every kind of layer SD LoRAs train: attention projections, the GEGLU feed-forward, the transformer's 1×1-conv
# projections (SD 1.x), and LoCon's convolutions (resnets, down/upsamplers, conv_in/out) and time projections.
# A pattern entry gives conv_out another rank and to_k another alpha, as trainers' rank/alpha patterns do.
UNET_LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
    + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1"],
    rank_pattern={"conv_out": 2},
    alpha_pattern={"to_k": 2},
    init_lora_weights=False,
)
TEXT_LORA = LoraConfig(
    r=2,
    lora_alpha=3,
    target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    init_lora_weights=False,
)


@pytest.fixture(scope="module")
def sd1():
    """The torch models with their LoRAs, and our models' param-shape trees at the same configs."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SPEC["unet"])
    unet.add_adapter(copy.deepcopy(UNET_LORA))
    # transformers 5 wants peft ≥ 0.22 for `add_adapter`; injecting is the same LoRA.
    text = inject_adapter_in_model(copy.deepcopy(TEXT_LORA), CLIPTextModel(CLIPTextConfig(**SPEC["text_encoder"])))
    return SimpleNamespace(
        unet=unet,
        text=text,
        unet_shapes=un.init_shapes(un.UNetConfig.from_json(SPEC["unet"])),
        text_shapes=te.init_shapes(te.TextEncoderConfig.from_json(SPEC["text_encoder"])),
    )


@pytest.fixture(scope="module")
def diffusers_file(sd1, tmp_path_factory):
    """What diffusers' training scripts save: PEFT names under unet./text_encoder., the adapter configs as metadata."""
    folder = tmp_path_factory.mktemp("lora")
    text_layers = {k.replace(".default", ""): v for k, v in sd1.text.state_dict().items() if ".lora_" in k}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(sd1.unet)),
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=UNET_LORA.to_dict(),
        text_encoder_lora_adapter_metadata=TEXT_LORA.to_dict(),
        weight_name="style.safetensors",
    )
    return folder / "style.safetensors"


def tuner_layers(model):
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name.removeprefix("text_model."), module


def merged_deltas(model) -> dict[str, np.ndarray]:
    """peft's merge on a copy: merged − original weight of every LoRA'd layer, in our layout, by our param path."""
    deltas = {}
    for name, module in tuner_layers(copy.deepcopy(model)):
        before = module.get_base_layer().weight.detach().clone()
        module.merge()
        delta = (module.get_base_layer().weight.detach() - before).double().numpy()
        deltas["/".join(flax_path(name))] = to_flax_layout("kernel", delta)
    return deltas


def kernel_delta(layer) -> np.ndarray:
    down, up = layer.down.astype(np.float64), layer.up.astype(np.float64)
    if down.ndim == 4:  # (kh, kw, in, r) · (r, out) → (kh, kw, in, out)
        return layer.scale * np.einsum("hwir,ro->hwio", down, up)
    return layer.scale * down @ up


def kohya_tensors(sd1) -> dict[str, np.ndarray]:
    """kohya's layout, from the torch modules: lora_unet_<diffusers module path with "." → "_">.lora_down.weight
    (PEFT's lora_A), .lora_up.weight (lora_B), .alpha (the module's own lora_alpha); the text encoder as
    lora_te_text_model_<...> (kohya names transformers 4's CLIPTextModel, whose modules sit under text_model)."""
    out = {}
    for prefix, model in (("lora_unet_", sd1.unet), ("lora_te_text_model_", sd1.text)):
        for name, module in tuner_layers(model):
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().numpy()
            out[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().numpy()
            out[f"{key}.alpha"] = np.array(module.lora_alpha["default"], np.float32)
    return out


def assert_same_lora(actual: LoraFile, expected: LoraFile) -> None:
    for part in ("unet", "text_encoder"):
        a, e = getattr(actual, part), getattr(expected, part)
        assert sorted(a) == sorted(e), part
        for path, layer in e.items():
            np.testing.assert_array_equal(a[path].down, layer.down, err_msg=path)
            np.testing.assert_array_equal(a[path].up, layer.up, err_msg=path)
            assert a[path].scale == pytest.approx(layer.scale, rel=1e-7), path


# --- Reading -------------------------------------------------------------------------


def test_a_peft_lora_adds_to_each_kernel_what_peft_merges(sd1, diffusers_file):
    lora = load_lora(diffusers_file, sd1.unet_shapes, sd1.text_shapes)
    assert lora.name == "style"
    for part, model in (("unet", sd1.unet), ("text_encoder", sd1.text)):
        expected, layers = merged_deltas(model), getattr(lora, part)
        assert sorted(layers) == sorted(expected), part
        for path, delta in expected.items():
            # float32 merge: W + ΔW − W carries the rounding of |W| + |ΔW| ≈ 1 (2⁻²⁴ ≈ 6e-8)
            np.testing.assert_allclose(kernel_delta(layers[path]), delta, rtol=0, atol=1e-6, err_msg=path)
    assert lora.unet["conv_out"].scale == 8 / 2  # rank_pattern
    assert lora.unet["down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"].scale == 2 / 4  # alpha_pattern


def test_the_kohya_layout_reads_to_the_same_lora(sd1, diffusers_file, tmp_path):
    save_file(kohya_tensors(sd1), tmp_path / "style.safetensors")
    expected = load_lora(diffusers_file, sd1.unet_shapes, sd1.text_shapes)
    assert_same_lora(load_lora(tmp_path / "style.safetensors", sd1.unet_shapes, sd1.text_shapes), expected)


def test_kohya_conv_loras_map_to_conv_kernels(sd1):
    lora = lora_from_tensors(kohya_tensors(sd1), sd1.unet_shapes, sd1.text_shapes, name="locon")
    conv = lora.unet["down_blocks_0/resnets_0/conv1"]
    assert (conv.down.shape, conv.up.shape) == ((3, 3, 32, 4), (4, 32))  # (kh, kw, in, r), (r, out)
    assert lora.unet["down_blocks_0/attentions_0/proj_in"].down.shape == (1, 1, 32, 4)  # SD 1.x: a 1×1 conv
    assert lora.unet["up_blocks_0/upsamplers_0/conv"].down.shape == (3, 3, 64, 4)
    assert lora.unet["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"].down.shape == (32, 4)  # Dense


def test_a_dense_lora_on_a_1x1_conv_layer_is_reshaped_to_fit(sd1):
    # Some trainers hold SD 1.x's proj_in (a 1×1 conv) as a Linear; it is the same map.
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32)
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    layer = lora_from_tensors(tensors, sd1.unet_shapes, sd1.text_shapes, name="x").unet[
        "down_blocks_0/attentions_0/proj_in"
    ]
    np.testing.assert_array_equal(layer.down, down.T.reshape(1, 1, 32, 4))
    assert layer.scale == 1.0  # no alpha: alpha = rank


def _processor_names(key: str) -> str:
    """diffusers' attention-processor LoRAs: unet.<attn>.processor.to_q_lora.down.weight (to_out.0 → to_out_lora),
    the text encoder's <attn>.to_q_lora.down.weight (diffusers' DIFFUSERS_OLD_TO_PEFT, read backwards)."""
    if key.startswith("unet."):
        return re.sub(
            r"\.(to_[qkv]|to_out)(?:\.0)?\.lora_([AB])\.weight$",
            lambda m: f".processor.{m[1]}_lora.{'down' if m[2] == 'A' else 'up'}.weight",
            key,
        )
    for old, new in DIFFUSERS_OLD_TO_PEFT.items():
        if new + ".weight" in key:
            return key.replace(new, old)
    return key


@pytest.mark.parametrize("layout", ["lora.down", "processor"])
def test_older_diffusers_layouts_read_to_the_same_lora(sd1, diffusers_file, layout):
    tensors, metadata = read_tensor_file(diffusers_file, allow_pickle=False, what="LoRA")
    if layout == "lora.down":  # diffusers' own renaming: to_q.lora.down, q_proj.lora_linear_layer.down
        old = convert_state_dict(tensors, PEFT_TO_DIFFUSERS)
    else:
        old = {_processor_names(k): v for k, v in tensors.items()}
    assert old.keys() != tensors.keys()
    lora = lora_from_tensors(
        old, sd1.unet_shapes, sd1.text_shapes, name="style", adapter_configs=adapter_configs(metadata)
    )
    assert_same_lora(lora, load_lora(diffusers_file, sd1.unet_shapes, sd1.text_shapes))


_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_LDM_RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_LDM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0"}
_LDM_TOP |= {"time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_name(module: str, layers: int, up_attention: set[int]) -> str:
    """A diffusers UNet module path → the LDM (CompVis) UNet's, for `layers` resnets per down block:
    input_blocks.0.0 is conv_in; down block b's resnet l is input_blocks.{1 + b(L+1) + l}.0 (its attention .1), its
    downsampler input_blocks.{1 + b(L+1) + L}.0.op; mid_block's resnets are middle_block.0/.2, its attention .1;
    up block b's resnet l is output_blocks.{b(L+1) + l}.0 (attention .1), its upsampler the last one's .2.conv
    (.1.conv without attentions); resnet layers are renamed as `_LDM_RESNET`."""
    if module in _LDM_TOP:
        return _LDM_TOP[module]
    parts = module.split(".")
    kind = parts[0]
    if kind == "mid_block":
        sub, i, rest = parts[1], int(parts[2]), parts[3:]
        head = f"middle_block.{2 * i if sub == 'resnets' else 1}"
    else:
        b, sub, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "down_blocks":
            index = 1 + b * (layers + 1) + (layers if sub == "downsamplers" else i)
            head = f"input_blocks.{index}." + {"resnets": "0", "attentions": "1", "downsamplers": "0"}[sub]
            rest = ["op"] if sub == "downsamplers" else rest
        else:
            index = b * (layers + 1) + (layers if sub == "upsamplers" else i)
            upsampler = "2" if b in up_attention else "1"
            head = f"output_blocks.{index}." + {"resnets": "0", "attentions": "1", "upsamplers": upsampler}[sub]
    if sub == "resnets":
        rest = [_LDM_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([head, *rest])


def test_kohyas_ldm_names_read_to_the_same_lora(sd1, diffusers_file):
    layers = SPEC["unet"]["layers_per_block"]
    up_attention = {i for i, t in enumerate(SPEC["unet"]["up_block_types"]) if t.startswith("CrossAttn")}
    # The converter above is diffusers' LDM checkpoint converter run backwards: check it maps every weight home.
    state = {k: v for k, v in sd1.unet.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer", ""): v for k, v in state.items()}
    ldm = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        ldm[f"model.diffusion_model.{ldm_name(module, layers, up_attention)}.{leaf}"] = value
    assert {k: id(v) for k, v in convert_ldm_unet_checkpoint(ldm, dict(SPEC["unet"])).items()} == {
        k: id(v) for k, v in state.items()
    }

    kohya = {}
    for key, value in kohya_tensors(sd1).items():
        module, _, role = key.partition(".")
        if module.startswith("lora_unet_"):
            name = next(n for n, _ in tuner_layers(sd1.unet) if "lora_unet_" + n.replace(".", "_") == module)
            module = "lora_unet_" + ldm_name(name, layers, up_attention).replace(".", "_")
        kohya[f"{module}.{role}"] = value
    assert any(k.startswith("lora_unet_input_blocks_2_1_") for k in kohya)
    lora = lora_from_tensors(kohya, sd1.unet_shapes, sd1.text_shapes, name="style")
    assert_same_lora(lora, load_lora(diffusers_file, sd1.unet_shapes, sd1.text_shapes))


def test_a_pickle_is_read_only_when_allowed(sd1, tmp_path):
    tensors = kohya_tensors(sd1)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, tmp_path / "style.pt")
    with pytest.raises(LoraError, match=r"style\.pt is a PyTorch pickle.*--allow-pickle"):
        load_lora(tmp_path / "style.pt", sd1.unet_shapes, sd1.text_shapes)
    lora = load_lora(tmp_path / "style.pt", sd1.unet_shapes, sd1.text_shapes, allow_pickle=True)
    assert_same_lora(lora, lora_from_tensors(tensors, sd1.unet_shapes, sd1.text_shapes, name="style"))


# --- Refusals ---------------------------------------------------------------------------

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def refusal(sd1, tensors, unet_shapes=None, text_shapes=None) -> str:
    with pytest.raises(LoraError) as e:
        lora_from_tensors(tensors, unet_shapes or sd1.unet_shapes, text_shapes or sd1.text_shapes, name="bad")
    return str(e.value)


def test_a_key_that_matches_no_layer_is_refused_naming_it(sd1):
    tensors = kohya_tensors(sd1)
    bad = Q.replace("attn1", "attn3")
    tensors |= {
        f"{bad}.lora_down.weight": tensors[f"{Q}.lora_down.weight"],
        f"{bad}.lora_up.weight": tensors[f"{Q}.lora_up.weight"],
    }
    assert f"'{bad}.lora_down.weight'" in refusal(sd1, tensors)
    assert "not a LoRA weight" in refusal(sd1, {"model.diffusion_model.conv_in.weight": np.zeros((4, 4, 3, 3))})


def test_ranks_that_disagree_are_refused(sd1):
    tensors = kohya_tensors(sd1) | {f"{Q}.lora_up.weight": np.zeros((32, 3), np.float32)}
    message = refusal(sd1, tensors)
    assert f"'{Q}.lora_down.weight'" in message and "rank 4" in message and "rank 3" in message


def test_sizes_that_disagree_with_the_layer_are_refused(sd1):
    tensors = kohya_tensors(sd1) | {f"{Q}.lora_down.weight": np.zeros((4, 48), np.float32)}
    assert "takes (32,)" in refusal(sd1, tensors)
    up = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"
    assert "writes 36 features" in refusal(sd1, kohya_tensors(sd1) | {up: np.zeros((36, 2), np.float32)})


def test_a_lora_missing_its_up_projection_is_refused(sd1):
    tensors = {k: v for k, v in kohya_tensors(sd1).items() if k != f"{Q}.lora_up.weight"}
    assert f"'{Q}.lora_down.weight' has no matching up-projection" in refusal(sd1, tensors)


def test_an_sd1_lora_on_the_tiny_sd2_model_is_refused_at_its_first_foreign_layer(sd1, diffusers_file):
    sd2 = TINY["sd2"]
    unet_shapes = un.init_shapes(un.UNetConfig.from_json(sd2["unet"]))
    text_shapes = te.init_shapes(te.TextEncoderConfig.from_json(sd2["text_encoder"]))
    with pytest.raises(
        LoraError, match=r"'unet\.down_blocks\.0\.attentions\.1\.proj_in\.lora_A\.weight'.*not a Dense or Conv"
    ) as e:
        load_lora(diffusers_file, unet_shapes, text_shapes)
    assert "another model" in str(e.value)


def test_a_lora_for_another_base_is_refused_saying_which(sd1):
    # The tiny UNet at SD 2.x's conditioning width; the LoRA's cross-attention reads SD 1.x's.
    unet_shapes = un.init_shapes(un.UNetConfig.from_json(dict(SPEC["unet"], cross_attention_dim=1024)))
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{k}.lora_down.weight": np.zeros((4, 768), np.float32), f"{k}.lora_up.weight": np.zeros((32, 4))}
    assert "this LoRA is for SD 1.x (768-d conditioning); the model is SD 2.x (1024-d conditioning)" in refusal(
        sd1, tensors, unet_shapes=unet_shapes
    )
    text_shapes = te.init_shapes(te.TextEncoderConfig(hidden_size=1024, intermediate_size=37, num_hidden_layers=1))
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {f"{q}.lora_A.weight": np.zeros((2, 768), np.float32), f"{q}.lora_B.weight": np.zeros((1024, 2))}
    assert "for SD 1.x (768-d text encoder); the model is SD 2.x (1024-d text encoder)" in refusal(
        sd1, tensors, text_shapes=text_shapes
    )


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "SDXL"),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "SDXL"),
        (f"{Q}.hada_w1_a", "LoHa"),
        (f"{Q}.lokr_w1", "LoKr"),
        (f"{Q}.dora_scale", "DoRA"),
        ("bundle_emb.style.emb_params", "embeddings"),
    ],
)
def test_layouts_sdmesh_does_not_apply_are_refused_by_name(sd1, key, why):
    assert why in refusal(sd1, kohya_tensors(sd1) | {key: np.zeros((4, 4), np.float32)})


# --- Textual inversion ------------------------------------------------------------------


@pytest.fixture
def vectors():
    return np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)


def test_diffusers_and_a1111_embeddings_read_to_the_same_vectors(vectors, tmp_path):
    save_file({"<my-style>": vectors}, tmp_path / "learned_embeds.safetensors")
    save_file({"emb_params": vectors}, tmp_path / "my-style.safetensors")
    diffusers = load_embedding(tmp_path / "learned_embeds.safetensors", 32)
    a1111 = load_embedding(tmp_path / "my-style.safetensors", 32)
    np.testing.assert_array_equal(diffusers.vectors, vectors)
    np.testing.assert_array_equal(a1111.vectors, vectors)
    assert (a1111.name, a1111.token, diffusers.token) == ("my-style", None, "<my-style>")
    save_file({"<one>": vectors[0]}, tmp_path / "one.safetensors")  # older diffusers: one (D,) vector
    assert load_embedding(tmp_path / "one.safetensors", 32).vectors.shape == (1, 32)


def test_an_a1111_pt_embedding_is_read_only_when_pickles_are_allowed(vectors, tmp_path):
    pt = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)}, "name": "s"}, pt)
    with pytest.raises(EmbeddingError, match="--allow-pickle"):
        load_embedding(pt, 32)
    embedding = load_embedding(pt, 32, allow_pickle=True)
    np.testing.assert_array_equal(embedding.vectors, vectors)
    assert (embedding.name, embedding.token) == ("my-style", "s")


def test_an_embedding_for_another_base_is_refused_saying_which(tmp_path):
    save_file({"emb_params": np.zeros((2, 1024), np.float32)}, tmp_path / "sd2-style.safetensors")
    with pytest.raises(EmbeddingError, match=r"for SD 2\.x .*1024-d; the model's text encoder is SD 1\.x .*768-d"):
        load_embedding(tmp_path / "sd2-style.safetensors", 768)
    save_file({"clip_l": np.zeros((2, 768)), "clip_g": np.zeros((2, 1280))}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="SDXL"):
        load_embedding(tmp_path / "xl.safetensors", 768)
