"""Euler, Euler-ancestral, DPM-Solver++ and PNDM/PLMS as coefficient tables walk diffusers' trajectories.

Each test drives samplers.table.step through a plan with a fixed sequence of random "network outputs"
(and the same noise diffusers is handed) and compares with the diffusers scheduler's step() sequence,
as a pipeline runs it: scale_model_input against c_in, the UNet timestep against column t,
init_noise_sigma, add_noise against start_* (img2img) and blend_* (inpainting), and every sample.
Tolerance: conftest's fp32 parity bar (relative L2 ≤ 1e-4); diffusers computes its coefficients in
float32, we in float64, and numpy's and torch's float32 cumprods differ in the last ulp.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from sdmesh.services import samplers
from sdmesh.services.samplers import ddim, dpm_solver, euler, pndm, table

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD1 = dict(SD, steps_offset=1, timestep_spacing="leading")  # SD 1.x: ε-prediction, leading spacing
SD2V = dict(SD1, prediction_type="v_prediction")  # SD 2.x 768: v-prediction
ZSNR = dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")

# (diffusers class, config, our builder); ids name the case.
EULER, ANCESTRAL = EulerDiscreteScheduler, EulerAncestralDiscreteScheduler
DPM, PNDM = DPMSolverMultistepScheduler, PNDMScheduler
CASES = {
    "euler-sd1": (EULER, SD1),
    "euler-sd2v": (EULER, SD2V),
    "euler-zsnr": (EULER, ZSNR),
    "euler-karras": (EULER, dict(SD, use_karras_sigmas=True)),
    "euler-sample-linspace-sigma_min": (EULER, dict(prediction_type="sample", final_sigmas_type="sigma_min")),
    "euler-exponential-continuous-v": (
        EULER,
        dict(SD, use_exponential_sigmas=True, prediction_type="v_prediction", timestep_type="continuous"),
    ),
    "ancestral-sd1": (ANCESTRAL, SD1),
    "ancestral-sd2v": (ANCESTRAL, SD2V),
    "ancestral-zsnr": (ANCESTRAL, ZSNR),
    "dpm-sd1": (DPM, SD1),
    "dpm-sd2v": (DPM, SD2V),
    "dpm-zsnr": (DPM, ZSNR),
    "dpm-karras": (DPM, dict(SD, use_karras_sigmas=True)),
    "dpm-order1": (DPM, dict(SD, solver_order=1)),
    "dpm-exponential": (DPM, dict(SD1, use_exponential_sigmas=True)),  # float timesteps truncated to int64
    "dpm-heun-sigma_min": (DPM, dict(SD, solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False)),
    "dpm-3m-euler_at_final": (DPM, dict(SD, solver_order=3, euler_at_final=True)),
    "dpm-sde": (DPM, dict(SD2V, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    "dpm-threshold-sample-cosine": (
        DPM,
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="sample",
            thresholding=True,
            dynamic_thresholding_ratio=0.9,
            sample_max_value=1.5,
            lambda_min_clipped=-5.1,
        ),
    ),
    "plms-sd1": (PNDM, dict(SD1, skip_prk_steps=True)),
    "plms-sd2v": (PNDM, dict(SD2V, skip_prk_steps=True)),
    "plms-linspace": (PNDM, dict(skip_prk_steps=True, timestep_spacing="linspace", set_alpha_to_one=True)),
    "plms-trailing": (PNDM, dict(SD1, skip_prk_steps=True, timestep_spacing="trailing")),
    "pndm-prk": (PNDM, SD1),
    "pndm-prk-v": (PNDM, SD2V),
}


def our_plan(cls, config: dict, num_steps: int, first: int) -> table.Plan:
    if cls is EULER or cls is ANCESTRAL:
        return euler.make_plan(euler.EulerConfig.from_json(config), num_steps, first=first, ancestral=cls is ANCESTRAL)
    if cls is DPM:
        return dpm_solver.make_plan(dpm_solver.DPMSolverConfig.from_json(config), num_steps, first=first)
    return pndm.make_plan(pndm.PNDMConfig.from_json(config), num_steps, first=first)


_step = jax.jit(table.step)  # one compile per batch shape; eager dispatch would dominate the file's time


def step_plan(plan: table.Plan, state: table.SlotState, i: int, out: np.ndarray, noise: np.ndarray) -> table.SlotState:
    one = lambda v: jnp.asarray([v], jnp.float32)
    return _step(
        jnp.asarray(plan.rows[i : i + 1], jnp.float32),
        state,
        jnp.asarray(out),
        jnp.asarray(noise),
        one(plan.clip),
        one(plan.threshold_ratio),
        one(plan.threshold_max),
    )


def walk(ref, plan: table.Plan, first: int, monkeypatch, seed: int = 0) -> float:
    """Run diffusers' scheduler as StableDiffusion(Img2Img|Inpaint)Pipeline does, and our plan beside it.

    first == 0: text-to-image from init_noise_sigma · z; first > 0: img2img from add_noise at the first
    timestep. Returns the worst relative error of the samples (each asserted ≤ 1e-4).
    """
    timesteps = ref.timesteps[first * ref.order :]  # diffusers' get_timesteps (order is 1 for all four)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(first * ref.order)
    assert plan.evaluations == len(timesteps)
    np.testing.assert_allclose(plan.rows[:, table.COL["t"]], timesteps.numpy(), rtol=1e-5)

    rng = np.random.default_rng(seed)
    shape = (1, 4, 8, 8)
    latents, z = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    start_ref = ref.add_noise(torch.from_numpy(latents), torch.from_numpy(z), timesteps[:1])
    assert_rel_close(plan.start_lat * latents + plan.start_noise * z, start_ref.numpy())
    if first == 0:
        assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
        x_ref = torch.from_numpy(z) * ref.init_noise_sigma
    else:
        x_ref = start_ref
    state = table.initial_state(jnp.asarray(x_ref.numpy()))

    noises = iter([])
    module = diffusers.schedulers.scheduling_euler_ancestral_discrete
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(noises))  # ancestral noise, supplied
    worst = 0.0
    for i, t in enumerate(timesteps):
        out = rng.standard_normal(shape, dtype=np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32)
        noises = iter([torch.from_numpy(noise)])
        row = plan.rows[i]
        assert_rel_close(row[table.COL["c_in"]] * x_ref.numpy(), ref.scale_model_input(x_ref, t).numpy())
        kwargs = dict(variance_noise=torch.from_numpy(noise)) if isinstance(ref, DPM) else {}
        x_ref = ref.step(torch.from_numpy(out), t, x_ref, **kwargs).prev_sample
        state = step_plan(plan, state, i, out, noise)
        err = float(np.linalg.norm(np.asarray(state.x) - x_ref.numpy()) / np.linalg.norm(x_ref.numpy()))
        assert err <= 1e-4, f"step {i}: relative error {err:.3e}"
        worst = max(worst, err)
        if i + 1 < len(timesteps):  # inpainting's latent blend towards the next timestep
            blend_ref = ref.add_noise(torch.from_numpy(latents), torch.from_numpy(z), timesteps[i + 1 : i + 2])
            assert_rel_close(
                row[table.COL["blend_lat"]] * latents + row[table.COL["blend_noise"]] * z, blend_ref.numpy()
            )
    return worst


@pytest.mark.parametrize("first", [0, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_walks_diffusers_trajectory(case, first, monkeypatch):
    cls, cfg = CASES[case]
    num_steps = 10
    ref = cls(**cfg)
    ref.set_timesteps(num_steps)
    walk(ref, our_plan(cls, dict(ref.config), num_steps, first), first, monkeypatch)


@pytest.mark.parametrize("num_steps", [1, 2, 16])
@pytest.mark.parametrize("case", ["dpm-sd1", "dpm-heun-sigma_min", "dpm-3m-euler_at_final", "plms-sd1", "euler-karras"])
def test_step_counts_around_the_special_cases(case, num_steps, monkeypatch):
    # DPM-Solver's lower_order_final applies under 15 steps; PLMS's warm-up needs 2.
    cls, cfg = CASES[case]
    ref = cls(**cfg)
    ref.set_timesteps(num_steps)
    walk(ref, our_plan(cls, dict(ref.config), num_steps, 0), 0, monkeypatch, seed=num_steps)


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_named_sampler_reads_an_sd_config_as_diffusers_from_config_does(name, monkeypatch):
    # SD 2.x ships a PNDM config; each name's diffusers scheduler is built from it with from_config.
    shipped = dict(PNDMScheduler(**SD2V, skip_prk_steps=True, set_alpha_to_one=False).config)
    cls, extra = {
        "ddim": (DDIMScheduler, {}),
        "euler": (EULER, {}),
        "euler-ancestral": (ANCESTRAL, {}),
        "dpm++2m": (DPM, {}),
        "dpm++2m-karras": (DPM, dict(use_karras_sigmas=True)),
        "plms": (PNDM, dict(skip_prk_steps=True)),
    }[name]
    ref = cls.from_config(shipped, **extra)
    ref.set_timesteps(12)
    plan = samplers.make_plan(name, shipped, 12)
    if name == "ddim":
        np.testing.assert_array_equal(plan.rows, ddim.make_plan(ddim.DDIMConfig.from_json(shipped), 12).rows)
    else:
        walk(ref, plan, 0, monkeypatch)


def test_slots_with_different_samplers_step_together_as_alone():
    shipped = dict(SD2V, clip_sample=False, set_alpha_to_one=False)
    plans = [
        samplers.make_plan("ddim", dict(shipped, clip_sample=True, clip_sample_range=0.8), 12, eta=0.5),
        samplers.make_plan("euler-ancestral", shipped, 9, first=2),
        samplers.make_plan("dpm++2m-karras", shipped, 15),
        dpm_solver.make_plan(
            dpm_solver.DPMSolverConfig.from_json(
                dict(shipped, prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9)
            ),
            8,
        ),
        samplers.make_plan("plms", shipped, 20, first=5),
    ]
    n = min(p.evaluations for p in plans)
    b = len(plans)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((b, 8, 8, 4), dtype=np.float32)
    outs = rng.standard_normal((n, b, 8, 8, 4), dtype=np.float32)
    noises = rng.standard_normal((n, b, 8, 8, 4), dtype=np.float32)
    per_slot = lambda f: jnp.asarray([f(p) for p in plans], jnp.float32)
    batch = table.initial_state(jnp.asarray(x))
    alone = [table.initial_state(jnp.asarray(x[k : k + 1])) for k in range(b)]
    for i in range(n):
        rows = jnp.asarray(np.stack([p.rows[i] for p in plans]), jnp.float32)
        batch = _step(
            rows,
            batch,
            jnp.asarray(outs[i]),
            jnp.asarray(noises[i]),
            per_slot(lambda p: p.clip),
            per_slot(lambda p: p.threshold_ratio),
            per_slot(lambda p: p.threshold_max),
        )
        alone = [
            step_plan(p, s, i, outs[i, k : k + 1], noises[i, k : k + 1]) for k, (p, s) in enumerate(zip(plans, alone))
        ]
    for k in range(b):
        for got, want in zip(batch, alone[k]):
            np.testing.assert_allclose(np.asarray(got)[k : k + 1], np.asarray(want), rtol=1e-5, atol=1e-5)


def test_default_sampler_follows_the_shipped_scheduler():
    assert samplers.default_sampler({"_class_name": "DDIMScheduler"}) == "ddim"
    assert samplers.default_sampler({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == "plms"
    assert samplers.default_sampler({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert samplers.default_sampler({"_class_name": "EulerAncestralDiscreteScheduler"}) == "euler-ancestral"
    assert samplers.default_sampler({"_class_name": "DPMSolverMultistepScheduler"}) == "dpm++2m"
    assert (
        samplers.default_sampler({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
        == "dpm++2m-karras"
    )
    assert samplers.default_sampler({"_class_name": "LMSDiscreteScheduler"}) == "ddim"
    assert samplers.default_sampler({}) == "ddim"


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_evaluations_and_max_steps_agree_with_the_plans(name):
    cfg = dict(SD1, _class_name="PNDMScheduler", skip_prk_steps=True, clip_sample=False)
    for steps in (1, 2, 25):
        assert samplers.evaluations(name, steps) == samplers.make_plan(name, cfg, steps).evaluations
    most = samplers.max_steps(name, cfg)
    assert samplers.make_plan(name, cfg, most).rows[:, table.COL["t"]].max() <= 999
    if name == "dpm++2m-karras":  # Karras σs map back to timesteps inside training's range at any count
        assert most == 1000
        return
    assert 990 <= most < 1000  # leading spacing with steps_offset 1 reaches t = 1000 at 1000 steps
    with pytest.raises(ValueError, match=f"use at most {most} steps"):
        samplers.make_plan(name, cfg, most + 1)


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid names are ddim, euler, euler-ancestral, dpm\\+\\+2m"):
        samplers.make_plan("k_lms", {}, 10)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.evaluations("heun", 10)


@pytest.mark.parametrize(
    "cls,make",
    [
        (ANCESTRAL, lambda c: euler.make_plan(euler.EulerConfig.from_json(c), 5, ancestral=True)),
        (PNDM, lambda c: pndm.make_plan(pndm.PNDMConfig.from_json(c), 5)),
    ],
)
def test_prediction_types_diffusers_refuses_are_refused(cls, make):
    ref = cls(prediction_type="sample", skip_prk_steps=True) if cls is PNDM else cls(prediction_type="sample")
    ref.set_timesteps(5)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises((ValueError, NotImplementedError)):
        ref.step(x, ref.timesteps[0], ref.scale_model_input(x, ref.timesteps[0]))
    with pytest.raises(ValueError, match="sample"):
        make(dict(ref.config))


@pytest.mark.parametrize(
    "bad",
    [
        dict(prediction_type="flow_prediction"),
        dict(algorithm_type="dpmsolver"),
        dict(use_lu_lambdas=True),
        dict(timestep_spacing="even"),
        dict(beta_schedule="cubic"),
    ],
)
def test_dpm_options_we_do_not_reproduce_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        dpm_solver.DPMSolverConfig.from_json(bad)


def test_prk_warm_up_needs_four_steps():
    with pytest.raises(ValueError, match="skip_prk_steps"):
        pndm.make_plan(pndm.PNDMConfig(), 3)


@pytest.mark.parametrize("first", [0, 4])
def test_img2img_tail_of_stateless_samplers_is_the_full_plan_tail(first):
    cfg = dict(SD2V, use_karras_sigmas=True)
    full = euler.make_plan(euler.EulerConfig.from_json(cfg), 12)
    np.testing.assert_array_equal(
        euler.make_plan(euler.EulerConfig.from_json(cfg), 12, first=first).rows, full.rows[first:]
    )
    # DPM-Solver restarts at first order: only the first row differs from the full plan's tail.
    d = dpm_solver.DPMSolverConfig.from_json(cfg)
    tail, whole = dpm_solver.make_plan(d, 12, first=first).rows, dpm_solver.make_plan(d, 12).rows[first:]
    np.testing.assert_array_equal(tail[1:], whole[1:])
    assert tail[0, table.COL["next_x0_1"]] == 0.0
    if first:
        assert whole[0, table.COL["next_x0_1"]] != 0.0


def test_configs_read_only_their_own_fields():
    shipped = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.8.0",
        "skip_prk_steps": True,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "trained_betas": None,
        **SD1,
    }
    assert euler.EulerConfig.from_json(shipped) == euler.EulerConfig(**SD1)
    assert dpm_solver.DPMSolverConfig.from_json(shipped) == dpm_solver.DPMSolverConfig(**SD1)
    assert pndm.PNDMConfig.from_json(shipped) == pndm.PNDMConfig(**SD1, skip_prk_steps=True)


def test_defaults_are_diffusers_defaults():
    for ours, ref in [
        (euler.EulerConfig(), EULER()),
        (dpm_solver.DPMSolverConfig(), DPM()),
        (pndm.PNDMConfig(), PNDM()),
    ]:
        for field in ours.__dataclass_fields__:
            if field in ref.config:
                want = ref.config[field]
                assert getattr(ours, field) == (float(want) if isinstance(want, float) else want), field
