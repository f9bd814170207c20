"""LoRAs applied per slot: a running batch mixing adapters and weights gives each image what it gets alone.

The bank (`engine.lora_bank`) holds each adapter's factors in one row of stacked arrays; a slot names its rows
and weights, so one compiled program serves any mix, loading another adapter of the same rank compiles nothing,
and a slot without adapters gets the base model's latents. The files are made with peft, as in
tests/test_lora_pipeline.py, which checks the same path against diffusers.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdmesh.services.engine import lora_bank  # noqa: E402
from sdmesh.services.engine.stages import DenoiserStage  # noqa: E402
from sdmesh.services.inputs.contract import DenoiseJob  # noqa: E402
from sdmesh.services.inputs.errors import InvalidRequest  # noqa: E402

SIZE, STEPS = 32, 3


def save_unet_lora(unet: UNet2DConditionModel, path, seed: int, rank: int, targets: list[str]) -> None:
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    model = copy.deepcopy(unet)
    model.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    save_file({f"unet.{k}": v.contiguous() for k, v in layers.items()}, path)


@pytest.fixture(scope="module")
def stage(tiny_checkpoints, tmp_path_factory):
    folder = tiny_checkpoints["sd2"]
    loras = tmp_path_factory.mktemp("loras")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    save_unet_lora(unet, loras / "a.safetensors", 1, 4, attention)
    save_unet_lora(unet, loras / "b.safetensors", 2, 8, attention + ["proj_in", "proj_out"])
    save_unet_lora(unet, loras / "c.safetensors", 3, 6, attention)  # rank 6: the same bucket as b's 8
    save_unet_lora(unet, loras / "conv.safetensors", 4, 4, ["conv1", "conv2"])  # LoCon: outside the targets
    stage = DenoiserStage.load(folder)
    stage.use_loras(loras, max_adapters=3)
    return stage


def job(stage, seed: int, loras=()) -> DenoiseJob:
    rng = np.random.default_rng(seed)
    cond = rng.standard_normal((1, 77, stage.unet.config.context_dim), dtype=np.float32)
    uncond = rng.standard_normal(cond.shape, dtype=np.float32)
    return DenoiseJob(cond, uncond, None, seed, STEPS, 7.5, 0.0, 0.0, SIZE, SIZE, sampler="ddim", loras=tuple(loras))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference as a fraction of the largest value."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def facts(stage):
    return stage.facts(vae_scale_factor=2, max_length=77)


def alone(stage, j: DenoiseJob) -> np.ndarray:
    *_, (_, latents, _) = stage.run_slots(stage.job_slots(j, facts(stage)))
    return latents


def together(stage, jobs: list[DenoiseJob]) -> list[np.ndarray]:
    slots = [stage.job_slots(j, facts(stage)) for j in jobs]
    batch = stage.new_batch([len(jobs)])
    batch.join([s for group in slots for s in group])
    while any(not s.done for group in slots for s in group):
        batch.run_chunk(1)
    left = dict((id(s), x) for s, x in batch.leave(lambda s: False))
    return [np.stack([left[id(s)] for s in group]) for group in slots]


MIXES = [[], [("a", 0.8)], [("b", 1.0)], [("a", -0.4), ("b", 1.0)], [("a", 1.3), ("b", 0.2)], [("c", 0.5)]]


def test_six_requests_with_six_adapter_mixes_in_one_batch_each_equal_their_solo_run(stage):
    jobs = [job(stage, 10 + k, mix) for k, mix in enumerate(MIXES)]
    expected = [alone(stage, j) for j in jobs]
    for got, want in zip(together(stage, jobs), expected):
        assert relative_error(got, want) <= 1e-5


def test_a_slot_without_adapters_gets_the_base_models_latents(stage):
    base = alone(stage, job(stage, 5))
    mixed = together(stage, [job(stage, 5), job(stage, 6, [("b", 1.0)])])[0]
    assert relative_error(mixed, base) <= 1e-5
    assert np.abs(alone(stage, job(stage, 5, [("b", 1.0)])) - base).max() > 1e-3  # the LoRA does something


def test_weight_zero_is_no_adapter_and_weights_scale_the_update(stage):
    base = alone(stage, job(stage, 7))
    np.testing.assert_array_equal(alone(stage, job(stage, 7, [("a", 0.0)])), base)


def test_loading_an_adapter_of_the_same_rank_bucket_compiles_nothing(stage):
    alone(stage, job(stage, 8, [("b", 1.0)]))
    programs = set(stage.programs.shapes)
    alone(stage, job(stage, 8, [("c", 1.0)]))
    assert set(stage.programs.shapes) == programs


def test_a_locon_file_extends_the_targets_to_convolutions(stage):
    base = alone(stage, job(stage, 9))
    assert np.abs(alone(stage, job(stage, 9, [("conv", 1.0)])) - base).max() > 1e-3


def test_unknown_names_and_a_denoiser_without_loras_are_refused_saying_so(stage, tiny_checkpoints):
    with pytest.raises(InvalidRequest, match=r"no LoRA named 'missing'.*it has: a, b, c, conv"):
        stage.job_slots(job(stage, 1, [("missing", 1.0)]), facts(stage))
    plain = DenoiserStage.load(tiny_checkpoints["sd2"])
    with pytest.raises(InvalidRequest, match="--lora-dir"):
        plain.job_slots(job(plain, 1, [("a", 1.0)]), facts(plain))


def test_rows_are_held_while_slots_live_and_reused_least_recently_used_after(stage):
    bank = stage.loras.bank
    held = [stage.job_slots(job(stage, 1, [(name, 1.0)]), facts(stage)) for name in ("a", "b", "c")]
    with pytest.raises(lora_bank.AdaptersBusy, match="--max-adapters"):
        stage.job_slots(job(stage, 1, [("conv", 1.0)]), facts(stage))
    del held
    gc.collect()
    stage.job_slots(job(stage, 1, [("conv", 1.0)]), facts(stage))
    assert "conv" in bank.resident and len(bank.resident) == 3
