"""Loading checkpoints as users have them: variants, pickles, UNet overrides, the Hub cache, and broken files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.dev import reference
from sdmesh.services.engine.stages import RuntimeOptions
from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.pipeline import StableDiffusion

REQUEST = GenerationRequest(prompt="a cat", steps=2, height=16, width=16, seed=0)


def images(folder, **kwargs) -> np.ndarray:
    return StableDiffusion.load(str(folder), **kwargs).generate(REQUEST).images


def resave(src, dst, **save_kwargs):
    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    if save_kwargs.pop("fp16", False):
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(dst, **save_kwargs)
    return dst


def test_fp16_variant_is_loaded_when_asked_and_named_when_not(tiny_checkpoints, tmp_path):
    folder = resave(tiny_checkpoints["sd2"], tmp_path / "fp16", variant="fp16", fp16=True)
    assert list((folder / "unet").glob("*.fp16.safetensors"))
    with pytest.raises(CheckpointError, match="--variant fp16"):
        StableDiffusion.load(str(folder))
    ours = images(folder, variant="fp16")
    # fp16 storage rounds the weights: close to the fp32 original, not equal
    assert np.abs(ours.astype(int) - images(tiny_checkpoints["sd2"]).astype(int)).max() <= 8


def test_pickle_weights_need_opt_in_and_then_load_the_same(tiny_checkpoints, tmp_path):
    folder = resave(tiny_checkpoints["sd2"], tmp_path / "bin", safe_serialization=False)
    assert list((folder / "unet").glob("*.bin"))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        StableDiffusion.load(str(folder))
    np.testing.assert_array_equal(images(folder, allow_pickle=True), images(tiny_checkpoints["sd2"]))


def test_unet_checkpoint_override_takes_a_folder_or_a_file(tiny_checkpoints, tmp_path):
    other = reference.build(tmp_path / "other", reference.TINY["sd2"], seed=5, perturb=0.02)
    base = images(tiny_checkpoints["sd2"])
    from_folder = images(tiny_checkpoints["sd2"], unet_checkpoint=str(other / "unet"))
    from_file = images(
        tiny_checkpoints["sd2"], unet_checkpoint=str(other / "unet" / "diffusion_pytorch_model.safetensors")
    )
    assert not np.array_equal(base, from_folder)
    np.testing.assert_array_equal(from_folder, from_file)


def test_tensors_that_disagree_with_the_config_name_the_first_mismatch(tiny_checkpoints, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["sd2"], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 48
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"attn2.to_k.weight' has shape \(\d+, 32\) but the config asks for"):
        StableDiffusion.load(str(folder))


def test_a_truncated_weights_file_is_named(tiny_checkpoints, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoints["sd2"], folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="re-download"):
        StableDiffusion.load(str(folder))


def test_a_missing_component_is_named(tiny_checkpoints, tmp_path):
    folder = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoints["sd2"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model\.safetensors in .*vae"):
        StableDiffusion.load(str(folder))


def test_a_hub_id_not_in_the_cache_names_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(checkpoint.ModelNotFound, match="hf download someorg/some-model --revision v2"):
        checkpoint.resolve("someorg/some-model", revision="v2")


def test_a_path_that_does_not_exist_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(checkpoint.ModelNotFound, match="no model folder"):
        checkpoint.resolve(str(tmp_path / "nope"))
    with pytest.raises(checkpoint.ModelNotFound, match="not a diffusers checkpoint"):
        checkpoint.resolve(str(tmp_path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_and_activations_run_and_stay_close(tiny_checkpoints, dtype):
    options = RuntimeOptions(weights_dtype=dtype, activations_dtype=dtype)
    half = images(tiny_checkpoints["sd2"], options=options)
    # random tiny weights amplify rounding; the check is "the same picture", not parity
    assert np.abs(half.astype(int) - images(tiny_checkpoints["sd2"]).astype(int)).mean() < 4


def test_matmul_precision_is_an_option(tiny_checkpoints):
    highest = images(tiny_checkpoints["sd2"], options=RuntimeOptions(precision="highest"))
    np.testing.assert_array_equal(highest, images(tiny_checkpoints["sd2"]))  # fp32 on CPU is exact either way
