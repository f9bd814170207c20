"""DDIM: our JAX sampler walks the same trajectory as diffusers' DDIMScheduler."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from diffusers import DDIMScheduler, PNDMScheduler

from sdmesh.services.samplers import ddim

CONFIGS = [
    # SD 1.x/2 base as shipped (their PNDM config read as DDIM)
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    ),
    # SD 2.1: v-prediction
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    ),
    # zero-terminal-SNR with trailing spacing (Lin et al. 2023's recipe)
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        clip_sample=False,
    ),
    dict(
        beta_schedule="linear",
        timestep_spacing="linspace",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=0.5,
    ),
    dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True, clip_sample=True),
    dict(
        beta_schedule="linear",
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=1.5,
        clip_sample=False,
    ),
    dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), steps_offset=1, clip_sample=False),
]


@pytest.mark.parametrize("num_steps", [1, 7, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_equal_diffusers(num_steps, spacing):
    cfg = dict(CONFIGS[0], timestep_spacing=spacing)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(ddim.timesteps(ddim.DDIMConfig.from_json(cfg), num_steps), ref.timesteps.numpy())


@pytest.mark.parametrize("cfg,eta", list(itertools.product(CONFIGS, [0.0, 0.7])))
def test_step_sequence_matches_diffusers(cfg, eta):
    num_steps = 10
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    ours = ddim.DDIMConfig.from_json(ref.config)
    schedule = ddim.make_schedule(ours, num_steps)
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())

    rng = np.random.default_rng(0)
    x_ref = torch.from_numpy(rng.standard_normal((2, 4, 8, 8), dtype=np.float32))
    x = jnp.asarray(x_ref.numpy())
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        noise = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        x_ref = ref.step(
            torch.from_numpy(out), t, x_ref, eta=eta, variance_noise=torch.from_numpy(noise) if eta else None
        ).prev_sample
        x = ddim.ddim_step(
            ours,
            jnp.asarray(out),
            x,
            schedule.alpha_prod[i],
            schedule.alpha_prod_prev[i],
            eta=eta,
            noise=jnp.asarray(noise) if eta else None,
        )
        assert_rel_close(np.asarray(x), x_ref.numpy())


def test_per_sample_alphas_step_each_sample_on_its_own_schedule():
    cfg = ddim.DDIMConfig.from_json(CONFIGS[1])
    schedule = ddim.make_schedule(cfg, 20)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), dtype=np.float32))
    out = jnp.asarray(rng.standard_normal((2, 8, 8, 4), dtype=np.float32))
    steps = np.array([3, 11])
    a = jnp.asarray(schedule.alpha_prod[steps]).reshape(2, 1, 1, 1)
    ap = jnp.asarray(schedule.alpha_prod_prev[steps]).reshape(2, 1, 1, 1)
    batched = ddim.ddim_step(cfg, out, x, a, ap)
    for b, i in enumerate(steps):
        alone = ddim.ddim_step(cfg, out[b : b + 1], x[b : b + 1], schedule.alpha_prod[i], schedule.alpha_prod_prev[i])
        np.testing.assert_allclose(batched[b : b + 1], alone, rtol=1e-6, atol=1e-6)


def test_pndm_config_reads_as_diffusers_reads_it():
    pndm = PNDMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
    )
    ref = DDIMScheduler.from_config(pndm.config)
    ours = ddim.DDIMConfig.from_json(dict(pndm.config))
    assert ours.clip_sample == ref.config.clip_sample
    # torch's float32 cumprod and numpy's differ in the last ulp here and there
    np.testing.assert_allclose(ddim.alphas_cumprod(ours), ref.alphas_cumprod.numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    "bad", [dict(prediction_type="x0"), dict(beta_schedule="cubic"), dict(timestep_spacing="even")]
)
def test_unknown_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ddim.DDIMConfig.from_json(bad)


@pytest.mark.parametrize("n", [0, 1001])
def test_step_count_outside_training_range_is_refused(n):
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        ddim.timesteps(ddim.DDIMConfig(), n)


def test_max_steps_keeps_every_timestep_in_range():
    sd = ddim.DDIMConfig.from_json(CONFIGS[0])  # leading spacing, steps_offset 1: 1000 steps would reach t=1000
    assert ddim.max_steps(sd) == 999
    assert ddim.timesteps(sd, 999).max() == 999
    with pytest.raises(ValueError, match="use at most 999 steps"):
        ddim.timesteps(sd, 1000)
    assert ddim.max_steps(ddim.DDIMConfig(timestep_spacing="trailing")) == 1000


def run_plan(plan, x, outputs, noises):
    """Drive samplers.table.step through a plan for one sample, with given network outputs and noise."""
    from sdmesh.services.samplers import table

    state = table.initial_state(jnp.asarray(x))
    one = lambda v: jnp.asarray([v], jnp.float32)
    for i, (out, noise) in enumerate(zip(outputs, noises)):
        row = jnp.asarray(plan.rows[i : i + 1], jnp.float32)
        state = table.step(
            row,
            state,
            jnp.asarray(out),
            jnp.asarray(noise),
            one(plan.clip),
            one(plan.threshold_ratio),
            one(plan.threshold_max),
        )
    return np.asarray(state.x)


@pytest.mark.parametrize("cfg,eta", list(itertools.product(CONFIGS, [0.0, 0.7])))
def test_coefficient_table_walks_diffusers_trajectory(cfg, eta):
    num_steps = 10
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    plan = ddim.make_plan(ddim.DDIMConfig.from_json(ref.config), num_steps, eta=eta)
    np.testing.assert_array_equal(plan.rows[:, 0], ref.timesteps.numpy())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    outputs = [rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(num_steps)]
    noises = [rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(num_steps)]
    x_ref = torch.from_numpy(x)
    for t, out, noise in zip(ref.timesteps, outputs, noises):
        x_ref = ref.step(
            torch.from_numpy(out), t, x_ref, eta=eta, variance_noise=torch.from_numpy(noise) if eta else None
        ).prev_sample
    assert_rel_close(run_plan(plan, x, outputs, noises), x_ref.numpy())


def test_img2img_plan_is_the_tail_of_the_full_plan():
    cfg = ddim.DDIMConfig.from_json(CONFIGS[1])
    full, tail = ddim.make_plan(cfg, 20), ddim.make_plan(cfg, 20, first=6)
    np.testing.assert_array_equal(tail.rows, full.rows[6:])
    a = ddim.make_schedule(cfg, 20).alpha_prod[6]
    assert tail.start_lat == pytest.approx(np.sqrt(a)) and tail.start_noise == pytest.approx(np.sqrt(1 - a))
