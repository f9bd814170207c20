"""Single-file SD checkpoints (CompVis / A1111 layout): converted into the diffusers folder they came from, with
configs inferred from the shapes or taken from --config, agreeing with diffusers' own converter, cached once.

The tiny checkpoints are too small for SD's rules (GroupNorm of 32 groups, heads of 64 channels, SD 1.x's 8
heads), so their conversions take --config; inference itself is checked on full-size shapes (meta tensors in a
sparse file: real names and shapes, no memory)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdmesh.services.checkpoints import checkpoint, single_file
from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.dev import reference
from sdmesh.services.engine.stages import RuntimeOptions
from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.inputs.tokenizer import CLIP_VOCAB_SIZE
from sdmesh.services.pipeline import StableDiffusion

FLAVORS = ("sd1", "sd2", "sd2-inpaint")
FORMATS = ("safetensors", "fp16", "ckpt")
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PIPELINES = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sd2-inpaint": StableDiffusionInpaintPipeline,
}


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    inpaint = tmp_path_factory.mktemp("single-file") / "sd2-inpaint"
    return {**tiny_checkpoints, "sd2-inpaint": reference.build(inpaint, reference.TINY["sd2-inpaint"], seed=3)}


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
    """(flavor, format) → that tiny checkpoint written as one file, made on first use."""
    root, made = tmp_path_factory.mktemp("single-files"), {}

    def get(flavor: str, fmt: str = "safetensors"):
        if (flavor, fmt) not in made:
            name = f"{flavor}-{fmt}." + ("ckpt" if fmt == "ckpt" else "safetensors")
            kwargs = {"dtype": torch.float16} if fmt == "fp16" else {"nest": True, "global_step": 875000}
            made[flavor, fmt] = reference.to_single_file(
                folders[flavor], root / name, **(kwargs if fmt != "safetensors" else {})
            )
        return made[flavor, fmt]

    return get


@pytest.fixture(scope="module")
def converted(folders, files, tmp_path_factory):
    """(flavor, format) → our conversion of that file, with the tiny folder as --config."""
    root, made = tmp_path_factory.mktemp("converted"), {}

    def get(flavor: str, fmt: str = "safetensors"):
        if (flavor, fmt) not in made:
            made[flavor, fmt] = single_file.convert_single_file(
                files(flavor, fmt), root / f"{flavor}-{fmt}", config=str(folders[flavor]), allow_pickle=True
            )
        return made[flavor, fmt]

    return get


def tensors(folder, component):
    return load_file(folder / component / f"{WEIGHTS[component]}.safetensors")


def config(folder, component):
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return {k: v for k, v in json.loads((folder / component / name).read_text()).items() if not k.startswith("_")}


# --- (a) the tensors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_tensor_comes_back_with_its_name_and_value(folders, converted, flavor, fmt):
    for component in WEIGHTS:
        original, ours = tensors(folders[flavor], component), tensors(converted(flavor, fmt), component)
        assert sorted(ours) == sorted(original), component
        for name, value in original.items():
            # an fp16 file makes an fp16 folder: the values are the originals rounded once, not re-rounded
            expected = value.astype(np.float16) if fmt == "fp16" else value
            assert ours[name].dtype == expected.dtype, name
            np.testing.assert_array_equal(ours[name], expected, err_msg=f"{component} {name}")


# --- (b) the configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_configs_from_config_are_the_originals_and_diffusers_loads_the_folder(folders, converted, flavor):
    out = converted(flavor)
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        assert config(out, component) == config(folders[flavor], component), component
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(
        p.name for p in (folders[flavor] / "tokenizer").iterdir()
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[flavor].__name__
    pipe = PIPELINES[flavor].from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    for component in WEIGHTS:
        state = {k.removeprefix("text_model."): v for k, v in getattr(pipe, component).state_dict().items()}
        for name, value in tensors(folders[flavor], component).items():
            np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_shape_facts_of_tiny_files_match_and_the_rest_needs_config(folders, files, flavor):
    """What the shapes fix matches the original configs; heads and GroupNorm groups are SD's rules, which the
    tiny models break, so inferring their configs asks for --config."""
    source = single_file.open_single_file(files(flavor))
    fam = single_file.family(source)
    assert fam == flavor[:3]
    layout = single_file.unet_layout(single_file._section(source.shapes, single_file.UNET), "tiny")
    facts = single_file._facts(source, fam, layout)
    for component, values in facts.items():
        original = config(folders[flavor], component)
        for key, value in values.items():
            assert single_file._same(original[key], value), (component, key, original[key], value)
    with pytest.raises(CheckpointError, match="pass --config"):
        single_file.infer_configs(source)


def test_a_config_of_another_model_is_refused(folders, files, tmp_path):
    with pytest.raises(CheckpointError, match=r"--config .*belongs to a different model"):
        single_file.convert_single_file(files("sd1"), tmp_path / "out", config=str(folders["sd2"]))


def test_prediction_type_and_tokenizer_flags(folders, files, tmp_path):
    out = single_file.convert_single_file(
        files("sd2"), tmp_path / "eps", config=str(folders["sd2"]), prediction_type="epsilon",
        tokenizer=str(folders["sd1"] / "tokenizer"),
    )  # fmt: skip
    assert config(out, "scheduler")["prediction_type"] == "epsilon"
    assert (out / "tokenizer" / "vocab.json").read_bytes() == (folders["sd1"] / "tokenizer" / "vocab.json").read_bytes()
    with pytest.raises(CheckpointError, match="--prediction-type"):
        single_file.convert_single_file(files("sd2"), tmp_path / "x", config=str(folders["sd2"]), prediction_type="v")


def test_without_a_tokenizer_the_packages_clip_tokenizer_is_written(folders, files, tmp_path, monkeypatch):
    """A single file carries no tokenizer; sdmesh ships CLIP's (SD 1.x and 2.x share its vocabulary) and needs no
    network. It pads as each family's does. A text encoder of another vocabulary size needs --tokenizer."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fam, pad_id in (("sd1", 49407), ("sd2", 0)):
        out = tmp_path / fam
        single_file._write_tokenizer(None, None, fam, CLIP_VOCAB_SIZE, out)
        clip = CLIPTokenizer.from_pretrained(out)
        assert len(clip) == CLIP_VOCAB_SIZE and clip.pad_token_id == pad_id
        assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
        assert clip("The quick brown fox.").input_ids == [49406, 518, 3712, 2866, 3240, 269, 49407]
    configs = tmp_path / "configs"  # a --config folder without tokenizer/
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        (configs / component).mkdir(parents=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (configs / component / name).write_bytes((folders["sd1"] / component / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"vocabulary of 546 tokens.*pass --tokenizer"):
        single_file.convert_single_file(files("sd1"), tmp_path / "out", config=str(configs))


def test_the_nested_ckpt_keeps_its_global_step(files):
    """diffusers' one hint that an SD 2 text-to-image file is the ε base model, not a 768-v one."""
    assert single_file.open_single_file(files("sd2", "ckpt"), allow_pickle=True).global_step == 875000
    assert single_file.default_prediction_type("sd2", 4, 4, 875000) == "epsilon"
    assert single_file.default_prediction_type("sd2", 4, 4, None) == "v_prediction"
    assert single_file.default_prediction_type("sd2", 9, 4, None) == "epsilon"  # inpainting
    assert single_file.default_prediction_type("sd1", 4, 4, None) == "epsilon"


# --- Inference at full size: meta tensors in a sparse file ------------------------------------------------------

_SD_VAE = reference.FULL_SD2["vae"]
_SD1_UNET = dict(
    reference.FULL_SD2["unet"], cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
    upcast_attention=False, sample_size=64,
)  # fmt: skip
_SD1_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)  # fmt: skip
_SD2_INPAINT_UNET = dict(reference.FULL_SD2["unet"], in_channels=9, upcast_attention=False, sample_size=64)
_SD2_DEPTH_UNET = dict(_SD2_INPAINT_UNET, in_channels=5)
_SD2_TEXT = reference.FULL_SD2["text_encoder"]
_SD_VAE_512 = dict(_SD_VAE, sample_size=512)
FULL = {  # what the official diffusers repos' configs say, and the prediction type diffusers guesses
    "sd-1.5": ("sd1", _SD1_UNET, _SD_VAE_512, _SD1_TEXT, "epsilon"),
    "sd-2.1-768-v": ("sd2", reference.FULL_SD2["unet"], _SD_VAE, _SD2_TEXT, "v_prediction"),
    "sd-2-inpainting": ("sd2", _SD2_INPAINT_UNET, _SD_VAE_512, _SD2_TEXT, "epsilon"),
    "sd-2-depth": ("sd2", _SD2_DEPTH_UNET, _SD_VAE_512, _SD2_TEXT, "epsilon"),
}


def meta_models(unet, vae, text):
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(unet),
            "vae": AutoencoderKL.from_config(vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(text)),
        }


def meta_state(model):
    state = {k.removeprefix("text_model."): tuple(v.shape) for k, v in model.state_dict().items()}
    state.pop("embeddings.position_ids", None)
    return state


def write_sparse_safetensors(path, state):
    """A .safetensors file with the real header and no data written: the reader checks sizes, not values."""
    header, offset = {}, 0
    for name, t in state.items():
        dtype, size = ("F16", 2) if t.is_floating_point() else ("I64", 8)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * size]}
        offset += t.numel() * size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("model", FULL)
def test_full_size_configs_are_inferred_from_the_shapes(model, tmp_path):
    fam, unet, vae, text, prediction = FULL[model]
    models = meta_models(unet, vae, text)
    configs = {"unet": dict(unet), "vae": dict(vae), "text_encoder": dict(text)}
    state = reference.ldm_tensors({c: m.state_dict() for c, m in models.items()}, configs, family=fam)
    source = single_file.open_single_file(write_sparse_safetensors(tmp_path / f"{model}.safetensors", state))
    inferred = single_file.infer_configs(source)
    for component, expected in configs.items():
        for key, value in expected.items():
            assert single_file._same(inferred[component].get(key), value), (component, key)
    assert inferred["scheduler"]["prediction_type"] == prediction
    # the inferred configs build models whose tensors are exactly what the conversion writes
    ours = meta_models(inferred["unet"], inferred["vae"], inferred["text_encoder"])
    layout = single_file.unet_layout(single_file._section(source.shapes, single_file.UNET), model)
    plan = single_file.plan(source, fam, layout, 4, inferred["text_encoder"]["num_hidden_layers"])
    for component, entries in plan.items():
        assert {e.name: e.shape(source.shapes[e.source]) for e in entries} == meta_state(ours[component]), component


# --- Original configs: latent-diffusion inference YAMLs, as Stability's repo ships them ---------------------------


def ldm_yaml(parameterization="eps", context_dim=1024, heads="num_head_channels: 64", linear=True, layer=""):
    """v1-inference.yaml / v2-inference(-v).yaml's shape, the fields sdmesh reads and some it ignores."""
    cond = "FrozenOpenCLIPEmbedder" if context_dim == 1024 else "FrozenCLIPEmbedder"
    return f"""
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "{parameterization}"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 64
    channels: 4
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        {heads}
        use_spatial_transformer: True
        use_linear_in_transformer: {linear}
        transformer_depth: 1
        context_dim: {context_dim}
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.{cond}
      params:
        freeze: True
        {layer}
"""


def full_size_source(model, tmp_path):
    fam, unet, vae, text, _ = FULL[model]
    models = meta_models(unet, vae, text)
    configs = {"unet": dict(unet), "vae": dict(vae), "text_encoder": dict(text)}
    state = reference.ldm_tensors({c: m.state_dict() for c, m in models.items()}, configs, family=fam)
    return single_file.open_single_file(write_sparse_safetensors(tmp_path / f"{model}.safetensors", state))


def agrees_with_diffusers(configs, yaml_path):
    """diffusers' converter reads the same YAML into the same UNet and VAE configs (sample sizes aside: those
    follow the model's training size)."""
    import yaml
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    original = yaml.safe_load(yaml_path.read_text())
    defaults = {"transformer_layers_per_block": 1}
    for component, theirs in (
        ("unet", create_unet_diffusers_config_from_ldm(original, {})),
        ("vae", create_vae_diffusers_config_from_ldm(original, {})),
    ):
        for key, value in theirs.items():
            if value is not None and key != "sample_size":
                ours = configs[component].get(key, defaults.get(key))
                assert single_file._same(ours, value), (component, key, ours, value)


def test_an_original_config_says_what_the_tensors_cannot(tmp_path):
    """The SD 2 base (ε) and 768-v files have the same tensors: the YAML tells them apart, as diffusers'
    `from_single_file(original_config=)` does; SD 1's num_heads gives its 8 heads."""
    sd2 = full_size_source("sd-2.1-768-v", tmp_path)
    for parameterization, expected in (("eps", "epsilon"), ("v", "v_prediction")):
        yaml = tmp_path / f"v2-{parameterization}.yaml"
        yaml.write_text(ldm_yaml(parameterization))
        configs = single_file.infer_configs(sd2, original_config=yaml)
        assert configs["scheduler"]["prediction_type"] == expected
        assert configs["unet"]["attention_head_dim"] == [5, 10, 20, 20]  # num_head_channels 64 of 320·mult
        assert configs["text_encoder"]["num_hidden_layers"] == 23  # OpenCLIP's penultimate layer
        assert configs["scheduler"]["beta_end"] == 0.012 and configs["vae"]["scaling_factor"] == 0.18215
        agrees_with_diffusers(configs, yaml)
    yaml.write_text(ldm_yaml("v", layer='layer: "last"'))
    assert single_file.infer_configs(sd2, original_config=yaml)["text_encoder"]["num_hidden_layers"] == 24
    assert single_file.infer_configs(sd2, original_config=yaml, prediction_type="epsilon")["scheduler"][
        "prediction_type"
    ] == "epsilon"  # the flag wins  # fmt: skip

    sd1 = full_size_source("sd-1.5", tmp_path)
    v1 = tmp_path / "v1-inference.yaml"
    v1.write_text(ldm_yaml(context_dim=768, heads="num_heads: 8", linear=False))
    configs = single_file.infer_configs(sd1, original_config=v1)
    assert configs["unet"]["attention_head_dim"] == 8 and configs["scheduler"]["prediction_type"] == "epsilon"
    assert configs["text_encoder"]["num_hidden_layers"] == 12
    agrees_with_diffusers(configs, v1)
    for component, expected in zip(("unet", "vae", "text_encoder"), FULL["sd-1.5"][1:4], strict=True):
        for key, value in expected.items():
            assert single_file._same(configs[component].get(key), value), (component, key)


def test_an_original_config_of_another_model_or_not_one_is_refused(tmp_path):
    sd2 = full_size_source("sd-2.1-768-v", tmp_path)
    v1 = tmp_path / "v1-inference.yaml"
    v1.write_text(ldm_yaml(context_dim=768, heads="num_heads: 8", linear=False))
    with pytest.raises(CheckpointError, match=r"--original-config .*cross_attention_dim is 768 but .* say 1024"):
        single_file.infer_configs(sd2, original_config=v1)
    for text, error in (
        ("model: [1, 2", "not a YAML file"),
        ("name: not-a-model\n", "no model.params"),
        (ldm_yaml("x0"), "parameterization 'x0'"),
        (ldm_yaml(layer='layer: "pooled"'), "layer 'pooled'"),
    ):
        v1.write_text(text)
        with pytest.raises(CheckpointError, match=error):
            single_file.infer_configs(sd2, original_config=v1)
    with pytest.raises(CheckpointError, match="no such file"):
        single_file.infer_configs(sd2, original_config=tmp_path / "missing.yaml")


def test_an_original_config_with_a_folder_is_refused(folders):
    with pytest.raises(checkpoint.ModelNotFound, match="--original-config is for single-file checkpoints"):
        checkpoint.resolve(str(folders["sd2"]), original_config="v2-inference-v.yaml")


# --- (c) diffusers' converter agrees ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "fp16"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_diffusers_from_single_file_gives_the_same_weights(folders, files, converted, flavor, fmt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = PIPELINES[flavor].from_single_file(
        str(files(flavor, fmt)), config=str(folders[flavor]), safety_checker=None, local_files_only=True
    )
    for component in WEIGHTS:
        theirs = {k.removeprefix("text_model."): v.numpy() for k, v in getattr(pipe, component).state_dict().items()}
        theirs.pop("embeddings.position_ids", None)
        ours = tensors(converted(flavor, fmt), component)
        assert sorted(theirs) == sorted(ours), component
        for name, value in theirs.items():  # diffusers loads fp16 files as fp32; the values are the same
            np.testing.assert_array_equal(ours[name].astype(value.dtype), value, err_msg=f"{component} {name}")


# --- (d) refusals ---------------------------------------------------------------------------------------------


def test_a_pickle_needs_allow_pickle(files, folders, tmp_path):
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        single_file.convert_single_file(files("sd1", "ckpt"), tmp_path / "out", config=str(folders["sd1"]))
    assert not (tmp_path / "out").exists()


def test_a_cached_pickle_still_needs_allow_pickle(files, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    options = dict(config=str(folders["sd1"]))
    assert checkpoint.resolve(str(files("sd1", "ckpt")), allow_pickle=True, **options).is_dir()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        checkpoint.resolve(str(files("sd1", "ckpt")), **options)


def test_a_file_that_is_not_sd_is_refused_naming_what_it_holds(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layers.0.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, path)
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion 1.x/2.x checkpoint.*encoder.layers"):
        single_file.convert_single_file(path, tmp_path / "out")
    save_file({"conditioner.embedders.0.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="SDXL"):
        single_file.convert_single_file(path, tmp_path / "out")


def test_an_unknown_key_is_named(folders, tmp_path):
    state = reference.ldm_state_dict(folders["sd1"])
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.label_emb\.0\.0\.weight has no place"):
        single_file.convert_single_file(path, tmp_path / "out", config=str(folders["sd1"]))


def test_a_truncated_file_is_refused(files, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(files("sd1").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        single_file.open_single_file(path)


def test_single_file_flags_with_a_folder_are_refused(folders):
    with pytest.raises(checkpoint.ModelNotFound, match="--config is for single-file checkpoints"):
        checkpoint.resolve(str(folders["sd1"]), config=str(folders["sd1"]))
    with pytest.raises(checkpoint.ModelNotFound, match="--prediction-type"):
        checkpoint.resolve(str(folders["sd1"]), prediction_type="epsilon")


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(checkpoint.ModelNotFound, match="not a checkpoint sdmesh reads"):
        checkpoint.resolve(str(path))


# --- (e) the cache --------------------------------------------------------------------------------------------


def test_resolve_converts_once_per_file_version_and_options(folders, files, tmp_path, monkeypatch):
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    calls = []
    convert = single_file.convert_single_file
    monkeypatch.setattr(single_file, "convert_single_file", lambda *a, **k: calls.append(a) or convert(*a, **k))
    path = tmp_path / "model.safetensors"
    path.write_bytes(files("sd1").read_bytes())
    first = checkpoint.resolve(str(path), config=str(folders["sd1"]))
    assert first.parent.parent == tmp_path / "cache" and (first / "model_index.json").is_file()
    assert checkpoint.resolve(str(path), config=str(folders["sd1"])) == first
    assert len(calls) == 1
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".partial")]
    other = checkpoint.resolve(str(path), config=str(folders["sd1"]), prediction_type="v_prediction")
    assert other != first and len(calls) == 2
    os.utime(path, ns=(0, 0))  # a new version of the file converts again
    assert checkpoint.resolve(str(path), config=str(folders["sd1"])) not in (first, other)
    assert len(calls) == 3


def test_a_failed_conversion_leaves_nothing_in_the_cache(files, tmp_path, monkeypatch):
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="pass --config"):
        checkpoint.resolve(str(files("sd1")))
    assert [p.name for p in (tmp_path / "cache" / "single-file").iterdir() if not p.name.endswith(".lock")] == []


# --- (f) end to end -------------------------------------------------------------------------------------------


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent JAX cache for one test (the second, identical model compiles from it), then none again."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    yield str(tmp_path / "jax-cache")
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


def test_a_single_file_generates_the_folders_image(folders, files, tmp_path, monkeypatch, compilation_cache):
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    options = RuntimeOptions(jax_cache_dir=compilation_cache)
    request = GenerationRequest(prompt="a cat", steps=2, height=16, width=16, seed=0)
    expected = StableDiffusion.load(str(folders["sd1"]), options=options).generate(request).images
    pipe = StableDiffusion.load(str(files("sd1")), config=str(folders["sd1"]), options=options)
    np.testing.assert_array_equal(pipe.generate(request).images, expected)


@pytest.mark.parametrize(
    "dropped", ["model.diffusion_model.out.2.bias", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
)
def test_a_file_missing_a_tensor_is_refused_naming_the_file_and_the_parameter(folders, tmp_path, monkeypatch, dropped):
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    state = reference.ldm_state_dict(folders["sd1"])
    del state[dropped]
    path = tmp_path / "incomplete.safetensors"
    save_file(state, path)
    parameter = "conv_out/bias" if "diffusion_model" in dropped else "final_layer_norm/scale"
    with pytest.raises(CheckpointError, match=rf"{path} \(.*missing from the weights, first {parameter}"):
        StableDiffusion.load(str(path), config=str(folders["sd1"]))


def test_a_missing_or_damaged_file_is_named(tmp_path):
    with pytest.raises(checkpoint.ModelNotFound, match="no checkpoint file at"):
        checkpoint.resolve(str(tmp_path / "v1-5.safetensors"))
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match=r"could not be read with torch\.load"):
        single_file.open_single_file(damaged, allow_pickle=True)
