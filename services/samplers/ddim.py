"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12), in JAX.

Driven by a checkpoint's `scheduler/scheduler_config.json`, with diffusers'
DDIMScheduler semantics: any scheduler config (SD 1.x ships PNDM's) is read for
the fields DDIM shares with it, as `DDIMScheduler.from_config` does.

The schedule is host-side numpy (a few hundred floats); the step is pure array
math that works per sample (alphas broadcast over (B, 1, 1, 1)), so a compiled
loop can carry samples at different steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdmesh.services.samplers import table

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    # Defaults are DDIMScheduler's own, so a config that omits a field means what it means to diffusers.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"scheduler beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"scheduler timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DDIMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    # Glide's cosine schedule (Nichol & Dhariwal 2021), as diffusers discretizes it.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = sqrt_ac[0].copy(), sqrt_ac[-1].copy()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(config: DDIMConfig) -> np.ndarray:
    """ᾱ_t for t = 0..T−1, float32 as diffusers computes it."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float32) ** 2
    else:
        betas = _betas_for_alpha_bar(n)
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas, dtype=np.float32)


def _spaced(config: DDIMConfig, num_steps: int) -> np.ndarray:
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        return (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + config.steps_offset
    return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1  # trailing


def max_steps(config: DDIMConfig) -> int:
    """The most steps whose timesteps all lie in training's range (steps_offset can push the first one past it)."""
    n = config.num_train_timesteps
    return next((k for k in range(n, 0, -1) if _spaced(config, k).max() < n), 1)


def timesteps(config: DDIMConfig, num_steps: int) -> np.ndarray:
    """The descending training timesteps a `num_steps` DDIM run visits (diffusers' `set_timesteps`)."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"steps must be between 1 and the scheduler's num_train_timesteps ({n}), got {num_steps}")
    ts = _spaced(config, num_steps)
    if ts.max() >= n:
        raise ValueError(
            f"{num_steps} steps with steps_offset {config.steps_offset} reach timestep {ts.max()}, "
            f"past the scheduler's last ({n - 1}); use at most {max_steps(config)} steps"
        )
    return ts


class Schedule(NamedTuple):
    """Per-step values of one DDIM run, indexed by step i (a pytree of arrays; traced, not static)."""

    timesteps: np.ndarray  # (N,) int32: the UNet's timestep input
    alpha_prod: np.ndarray  # (N,) float32: ᾱ at t_i
    alpha_prod_prev: np.ndarray  # (N,) float32: ᾱ at t_i − T/N (or the final ᾱ)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def make_schedule(config: DDIMConfig, num_steps: int) -> Schedule:
    ac = alphas_cumprod(config)
    ts = timesteps(config, num_steps)
    final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
    # DDIM always steps back by T // N, whatever the spacing (diffusers' step()).
    prev = ts - config.num_train_timesteps // num_steps
    prev_ac = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
    return Schedule(ts.astype(np.int32), ac[ts].astype(np.float32), prev_ac)


def _threshold(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    # Dynamic thresholding (Saharia et al. 2022, Imagen): clip each sample at its ratio-quantile of |x0|.
    flat = jnp.abs(x0.reshape(x0.shape[0], -1).astype(jnp.float32))
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def to_x0_eps(
    config: DDIMConfig, model_output: jax.Array, x: jax.Array, alpha_prod: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The network's output in its parameterisation → (predicted x₀, predicted ε)."""
    a, b = jnp.sqrt(alpha_prod), jnp.sqrt(1 - alpha_prod)
    if config.prediction_type == "epsilon":
        return (x - b * model_output) / a, model_output
    if config.prediction_type == "sample":
        return model_output, (x - a * model_output) / b
    return a * x - b * model_output, a * model_output + b * x  # v_prediction (Salimans & Ho 2022)


def ddim_step(
    config: DDIMConfig,
    model_output: jax.Array,
    x: jax.Array,
    alpha_prod: jax.Array,
    alpha_prod_prev: jax.Array,
    *,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
) -> jax.Array:
    """x_t → x_{t−1} by DDIM eq. 12. alphas are scalars or per-sample arrays broadcastable to x."""
    x0, eps = to_x0_eps(config, model_output, x, alpha_prod)
    if config.thresholding:
        x0 = _threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    elif config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    # σ_t(η) of eq. 16: η = 0 is deterministic DDIM, η = 1 is DDPM-like.
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prod_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(alpha_prod_prev) * x0 + jnp.sqrt(1 - alpha_prod_prev - std**2) * eps
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def make_plan(config: DDIMConfig, num_steps: int, *, eta: float = 0.0, first: int = 0) -> table.Plan:
    """DDIM as a coefficient table (see samplers.table): rows first..num_steps−1 of a num_steps run.

    `first` > 0 starts part-way, as img2img does (diffusers slices the same timesteps).
    """
    s = make_schedule(config, num_steps)
    if not 0 <= first < num_steps:
        raise ValueError(f"first must be in [0, {num_steps}), got {first}")
    a = s.alpha_prod.astype(np.float64)[first:]
    ap = s.alpha_prod_prev.astype(np.float64)[first:]
    rows = table.empty_rows(len(a))
    col = table.COL
    rows[:, col["t"]] = s.timesteps[first:]
    sa, sb = np.sqrt(a), np.sqrt(1 - a)
    if config.prediction_type == "epsilon":
        rows[:, col["x0_x"]], rows[:, col["x0_out"]] = 1 / sa, -sb / sa
        rows[:, col["eps_out"]] = 1.0
    elif config.prediction_type == "sample":
        rows[:, col["x0_out"]] = 1.0
        rows[:, col["eps_x"]], rows[:, col["eps_x0"]] = 1 / sb, -sa / sb
    else:  # v_prediction
        rows[:, col["x0_x"]], rows[:, col["x0_out"]] = sa, -sb
        rows[:, col["eps_x"]], rows[:, col["eps_out"]] = sb, sa
    # σ_t(η) of eq. 16: η = 0 is deterministic DDIM, η = 1 is DDPM-like.
    std = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    rows[:, col["next_x"]] = 0.0
    rows[:, col["next_x0"]] = np.sqrt(ap)
    rows[:, col["next_eps"]] = np.sqrt(np.maximum(1 - ap - std**2, 0.0))
    rows[:, col["next_noise"]] = std
    table.set_blend(rows, sa, sb)
    clip = config.clip_sample_range if config.clip_sample and not config.thresholding else math.inf
    return table.Plan(
        rows=rows,
        init_noise_sigma=1.0,
        start_lat=float(sa[0]),
        start_noise=float(sb[0]),
        clip=clip,
        threshold_ratio=config.dynamic_thresholding_ratio if config.thresholding else 0.0,
        threshold_max=config.sample_max_value,
    )
