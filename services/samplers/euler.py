"""Euler and Euler-ancestral sampling (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 1 with no churn; ancestral steps as in k-diffusion's
`sample_euler_ancestral`), as coefficient tables (see samplers.table).

Driven by a checkpoint's scheduler_config.json with diffusers' EulerDiscreteScheduler /
EulerAncestralDiscreteScheduler semantics. These samplers work in σ-space: the sample is
x = x₀ + σ·ε (σ² = (1 − ᾱ)/ᾱ), the UNet sees x / √(σ² + 1) (`c_in`, diffusers'
`scale_model_input`), and text-to-image starts from init_noise_sigma · z.

Also home to the σ-schedule helpers DPM-Solver shares (Karras and exponential spacing, σ → t).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sdmesh.services.samplers import ddim, table

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclasses.dataclass(frozen=True)
class EulerConfig:
    # Defaults are EulerDiscreteScheduler's own (EulerAncestralDiscreteScheduler shares the ones it has).
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None  # Karras/exponential range; None: the schedule's own ends
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in ddim.TIMESTEP_SPACINGS:
            raise ValueError(
                f"scheduler timestep_spacing {self.timestep_spacing!r} is not one of {ddim.TIMESTEP_SPACINGS}"
            )
        if self.interpolation_type != "linear":
            # diffusers' log_linear returns N + 2 ascending σs for N timesteps: not a schedule we can reproduce.
            raise ValueError(f"scheduler interpolation_type {self.interpolation_type!r} is not supported; use 'linear'")
        if self.use_beta_sigmas:
            raise ValueError(
                "scheduler use_beta_sigmas is not supported; use use_karras_sigmas or use_exponential_sigmas"
            )
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("only one of the scheduler's use_karras_sigmas and use_exponential_sigmas can be set")
        if self.timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"scheduler timestep_type {self.timestep_type!r} is not one of ('discrete', 'continuous')")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(
                f"scheduler final_sigmas_type {self.final_sigmas_type!r} is not one of {FINAL_SIGMAS_TYPES}"
            )
        ddim.DDIMConfig(beta_schedule=self.beta_schedule, trained_betas=self.trained_betas)  # validates beta_schedule

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EulerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)


def alphas_cumprod(config: Any) -> np.ndarray:
    """ᾱ_t (float32) for any config with the beta fields; zero-SNR's last ᾱ is 2⁻²⁴, not 0, as diffusers'
    σ-space schedulers set it ("close to 0 without being 0 so first sigma is not inf")."""
    ac = ddim.alphas_cumprod(
        ddim.DDIMConfig(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            trained_betas=config.trained_betas,
            rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        )
    )
    if config.rescale_betas_zero_snr:
        ac = ac.copy()
        ac[-1] = np.float32(2.0**-24)
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0..T−1, float32 as diffusers computes it."""
    return np.sqrt((1 - ac) / ac).astype(np.float32)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n σs evenly spaced in σ^(1/ρ) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """n σs evenly spaced in log σ."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each σ: linear interpolation in log σ (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _spaced(config: EulerConfig, num_steps: int) -> np.ndarray:
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        ts = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.float32)
        return ts + np.float32(config.steps_offset)
    return np.arange(n, 0, -n / num_steps).round().astype(np.float32) - 1  # trailing


def max_steps(config: EulerConfig) -> int:
    """The most steps whose timesteps all lie in training's range (steps_offset can push the first one past it)."""
    n = config.num_train_timesteps
    return next((k for k in range(n, 0, -1) if _spaced(config, k).max() <= n - 1), 1)


def schedule(config: EulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,) float32, σs (N + 1,) float32) of a num_steps run, as diffusers' `set_timesteps` makes them."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"steps must be between 1 and the scheduler's num_train_timesteps ({n}), got {num_steps}")
    ts = _spaced(config, num_steps)
    if ts.max() > n - 1:
        raise ValueError(
            f"{num_steps} steps with steps_offset {config.steps_offset} reach timestep {ts.max():g}, "
            f"past the scheduler's last ({n - 1}); use at most {max_steps(config)} steps"
        )
    ac = alphas_cumprod(config)
    base = train_sigmas(ac)
    sigmas = np.interp(ts, np.arange(n), base)
    if config.use_karras_sigmas or config.use_exponential_sigmas:
        # Euler spans the *interpolated* σs' range (DPM-Solver spans the training σs').
        hi = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        lo = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
        make = karras_sigmas if config.use_karras_sigmas else exponential_sigmas
        sigmas = make(hi, lo, num_steps)
        ts = sigma_to_t(sigmas, np.log(base))
    last = float(base[0]) if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    if config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
        ts = 0.25 * np.log(sigmas[:-1])  # EDM's c_noise
    return ts.astype(np.float32), sigmas


def make_plan(config: EulerConfig, num_steps: int, *, first: int = 0, ancestral: bool = False) -> table.Plan:
    """Euler (ancestral=True: Euler-ancestral) as a coefficient table: rows first..num_steps−1 of a num_steps run.

    `first` > 0 starts part-way, as img2img does (diffusers slices the timesteps and calls set_begin_index;
    the step keeps no state, so the rows are the full run's tail).
    """
    if ancestral:
        if config.prediction_type == "sample":  # diffusers raises NotImplementedError in step()
            raise ValueError("Euler-ancestral does not support prediction_type 'sample'; use 'euler' or 'ddim'")
        # EulerAncestralDiscreteScheduler has none of these options: reading the config it ignores them.
        config = dataclasses.replace(
            config,
            use_karras_sigmas=False,
            use_exponential_sigmas=False,
            sigma_min=None,
            sigma_max=None,
            timestep_type="discrete",
            final_sigmas_type="zero",
        )
    ts, sigmas = schedule(config, num_steps)
    if not 0 <= first < num_steps:
        raise ValueError(f"first must be in [0, {num_steps}), got {first}")
    s = sigmas.astype(np.float64)
    sig, sig_next = s[:-1], s[1:]
    rows = table.empty_rows(num_steps)
    col = table.COL
    rows[:, col["t"]] = ts
    rows[:, col["c_in"]] = 1 / np.sqrt(sig**2 + 1)
    if config.prediction_type == "epsilon":
        rows[:, col["x0_x"]], rows[:, col["x0_out"]] = 1.0, -sig
    elif config.prediction_type == "sample":
        rows[:, col["x0_out"]] = 1.0
    else:  # v_prediction: x̂₀ = c_skip·x + c_out·v (Karras et al. 2022, Table 1, with σ_data = 1)
        rows[:, col["x0_x"]], rows[:, col["x0_out"]] = 1 / (sig**2 + 1), -sig / np.sqrt(sig**2 + 1)
    rows[:, col["eps_x"]], rows[:, col["eps_x0"]] = 1 / sig, -1 / sig  # x = x̂₀ + σ·ε̂
    if ancestral:
        # Split the step to σ_next into a deterministic step to σ_down and fresh noise of σ_up.
        sigma_up = np.sqrt(sig_next**2 * (sig**2 - sig_next**2) / sig**2)
        target = np.sqrt(sig_next**2 - sigma_up**2)
        rows[:, col["next_noise"]] = sigma_up
    else:
        target = sig_next
    # x' = x + (x − x̂₀)/σ · (σ' − σ): the ODE dx/dσ = (x − x̂₀)/σ stepped to σ'.
    rows[:, col["next_x"]] = target / sig
    rows[:, col["next_x0"]] = 1 - target / sig
    table.set_blend(rows, np.ones_like(sig), sig)  # add_noise in σ-space: x₀ + σ·z
    # diffusers' init_noise_sigma: max σ, or √(max σ² + 1) for leading spacing.
    top = float(np.max(sigmas))
    init = top if config.timestep_spacing in ("linspace", "trailing") else float(np.sqrt(np.float32(top) ** 2 + 1))
    rows = rows[first:]
    return table.Plan(rows=rows, init_noise_sigma=init, start_lat=1.0, start_noise=float(s[first]))
