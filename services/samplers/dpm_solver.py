"""DPM-Solver++ multistep sampling (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2 (2M) and its 3M and SDE variants), as a coefficient table
(see samplers.table).

Driven by a checkpoint's scheduler_config.json with diffusers' DPMSolverMultistepScheduler semantics.
The sample lives in VP space, x = α·x₀ + σ_t·ε with α = 1/√(σ² + 1), σ_t = σ·α; the solver integrates in
λ = log(α/σ_t) = −log σ and combines the current x̂₀ with the previous one or two (the table's x̂₀
history), restarting at first order whenever a run starts (img2img included), as diffusers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sdmesh.services.samplers import ddim, euler, table

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig:
    # Defaults are DPMSolverMultistepScheduler's own.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True  # first/second order at the last steps of runs under 15 steps
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False

    def __post_init__(self) -> None:
        # diffusers renames a few other solvers' settings on load (DEIS/UniPC configs read as DPM-Solver++).
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(
                f"scheduler algorithm_type {self.algorithm_type!r} is not supported; use one of {ALGORITHM_TYPES}"
            )
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"scheduler solver_type {self.solver_type!r} is not one of {SOLVER_TYPES}")
        if self.solver_order not in (1, 2, 3):
            raise ValueError(f"scheduler solver_order must be 1, 2 or 3, got {self.solver_order}")
        if self.timestep_spacing not in ddim.TIMESTEP_SPACINGS:
            raise ValueError(
                f"scheduler timestep_spacing {self.timestep_spacing!r} is not one of {ddim.TIMESTEP_SPACINGS}"
            )
        if self.final_sigmas_type not in euler.FINAL_SIGMAS_TYPES:
            raise ValueError(
                f"scheduler final_sigmas_type {self.final_sigmas_type!r} is not one of {euler.FINAL_SIGMAS_TYPES}"
            )
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("only one of the scheduler's use_karras_sigmas and use_exponential_sigmas can be set")
        for flag in ("use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            if getattr(self, flag):
                raise ValueError(f"scheduler {flag} is not supported; unset it (use_karras_sigmas is)")
        if self.variance_type is not None:
            raise ValueError(
                f"scheduler variance_type {self.variance_type!r} (a learned-variance UNet) is not supported"
            )
        ddim.DDIMConfig(beta_schedule=self.beta_schedule, trained_betas=self.trained_betas)  # validates beta_schedule

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DPMSolverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)


def _spaced(config: DPMSolverConfig, num_steps: int, last: int) -> np.ndarray:
    # DPM-Solver spaces N + 1 points and drops the last, unlike DDIM/Euler.
    if config.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = last // (num_steps + 1)
        return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    return np.arange(last, 0, -config.num_train_timesteps / num_steps).round().astype(np.int64) - 1  # trailing


def _schedule(config: DPMSolverConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    ac = euler.alphas_cumprod(config)
    base = euler.train_sigmas(ac)
    # lambda_min_clipped (for cosine schedules) drops the noisiest timesteps, whose λ is below it.
    lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))).astype(np.float32)
    last = config.num_train_timesteps - int(np.searchsorted(lam[::-1], config.lambda_min_clipped))
    ts = _spaced(config, num_steps, last)
    if config.use_karras_sigmas or config.use_exponential_sigmas:
        # Unlike Euler, the range is the training σs' (DPMSolverMultistepScheduler has no sigma_min/max).
        make = euler.karras_sigmas if config.use_karras_sigmas else euler.exponential_sigmas
        sigmas = make(float(base[-1]), float(base[0]), num_steps)
        t = euler.sigma_to_t(sigmas, np.log(base))
        if config.use_karras_sigmas and config.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
        ts = t.astype(np.int64)  # diffusers stores int64 timesteps: exponential ones are truncated
    else:
        sigmas = np.interp(ts, np.arange(len(base)), base)
    final = float(base[0]) if config.final_sigmas_type == "sigma_min" else 0.0
    return ts, np.concatenate([sigmas, [final]]).astype(np.float32)


def _valid(ts: np.ndarray, sigmas: np.ndarray, n: int) -> bool:
    # Repeated σs make a zero step h and divide by it in the multistep corrections.
    return ts.min() >= 0 and ts.max() <= n - 1 and bool(np.all(np.diff(sigmas) < 0))


def max_steps(config: DPMSolverConfig) -> int:
    """The most steps whose timesteps lie in training's range with no σ repeated."""
    n = config.num_train_timesteps
    return next((k for k in range(n, 0, -1) if _valid(*_schedule(config, k), n)), 1)


def schedule(config: DPMSolverConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,) int64, σs (N + 1,) float32) of a num_steps run, as diffusers' `set_timesteps` makes them."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"steps must be between 1 and the scheduler's num_train_timesteps ({n}), got {num_steps}")
    ts, sigmas = _schedule(config, num_steps)
    if not _valid(ts, sigmas, n):
        raise ValueError(
            f"{num_steps} steps give timesteps outside [0, {n - 1}] or repeated noise levels "
            f"with this scheduler config; use at most {max_steps(config)} steps"
        )
    return ts, sigmas


def _orders(config: DPMSolverConfig, n: int, first: int) -> list[int]:
    """The order diffusers' step() uses at each of steps first..n−1; lower_order_nums restarts at `first`."""
    orders, warm = [], 0
    for i in range(first, n):
        final = i == n - 1 and (
            config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
        )
        second = i == n - 2 and config.lower_order_final and n < 15
        if config.solver_order == 1 or warm < 1 or final:
            orders.append(1)
        elif config.solver_order == 2 or warm < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
        warm = min(warm + 1, config.solver_order)
    return orders


def make_plan(config: DPMSolverConfig, num_steps: int, *, first: int = 0) -> table.Plan:
    """DPM-Solver++ as a coefficient table: rows first..num_steps−1 of a num_steps run.

    `first` > 0 starts part-way, as img2img does (diffusers slices the timesteps and calls
    set_begin_index; the solver's history is empty again, so the first row is first order).
    """
    ts, sigmas = schedule(config, num_steps)
    if not 0 <= first < num_steps:
        raise ValueError(f"first must be in [0, {num_steps}), got {first}")
    s = sigmas.astype(np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)  # (N + 1,) VP signal scale
    sig_t = s * alpha  # VP noise scale
    with np.errstate(divide="ignore"):
        lam = -np.log(s)  # λ = log(α/σ_t); +inf at a final σ of 0
    rows = table.empty_rows(num_steps)
    col = table.COL
    rows[:, col["t"]] = ts
    a, st = alpha[:-1], sig_t[:-1]
    if config.prediction_type == "epsilon":
        rows[:, col["x0_x"]], rows[:, col["x0_out"]] = 1 / a, -st / a
    elif config.prediction_type == "sample":
        rows[:, col["x0_out"]] = 1.0
    else:  # v_prediction
        rows[:, col["x0_x"]], rows[:, col["x0_out"]] = a, -st
    rows[:, col["eps_x"]], rows[:, col["eps_x0"]] = 1 / st, -a / st  # x = α·x̂₀ + σ_t·ε̂
    sde = config.algorithm_type == "sde-dpmsolver++"
    for i, order in zip(range(first, num_steps), _orders(config, num_steps, first)):
        at, stt = alpha[i + 1], sig_t[i + 1]
        h = float(lam[i + 1] - lam[i])  # Python float: at σ = 0 (inf) the unused higher-order terms go nan quietly
        e = math.exp(-h)  # 0 when stepping to σ = 0 (always first order then)
        # x' = A·x + B·D0 + C·D1 + E·D2 (+ noise), D_k as combinations of (x̂₀, x̂₀_1, x̂₀_2): diffusers' update rules.
        if sde:
            A, B = stt / sig_t[i] * e, at * (1 - e * e)
            C2 = 0.5 * B if config.solver_type == "midpoint" else at * ((1 - e * e) / (-2 * h) + 1)
            C3, E3 = at * ((1 - e * e) / (-2 * h) + 1), at * ((1 - e * e - 2 * h) / (2 * h) ** 2 - 0.5)
            rows[i, col["next_noise"]] = stt * math.sqrt(1 - e * e)
        else:
            A, B = stt / sig_t[i], -at * (e - 1)
            C2 = 0.5 * B if config.solver_type == "midpoint" else at * ((e - 1) / h + 1)
            C3, E3 = at * ((e - 1) / h + 1), -at * ((e - 1 + h) / h**2 - 0.5)
        m = np.eye(3)  # m[k]: the x̂₀ of k steps ago
        if order == 1:
            x0_coef = B * m[0]
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            x0_coef = B * m[0] + C2 * (m[0] - m[1]) / r0
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x0_coef = B * m[0] + C3 * d1 + E3 * d2
        rows[i, col["next_x"]] = A
        rows[i, col["next_x0"]], rows[i, col["next_x0_1"]], rows[i, col["next_x0_2"]] = x0_coef
    table.set_blend(rows, alpha[:-1], sig_t[:-1])  # add_noise: α·x₀ + σ_t·z at the next row's σ
    thresholding = config.thresholding
    return table.Plan(
        rows=rows[first:],
        init_noise_sigma=1.0,
        start_lat=float(alpha[first]),
        start_noise=float(sig_t[first]),
        threshold_ratio=config.dynamic_thresholding_ratio if thresholding else 0.0,
        threshold_max=config.sample_max_value,
    )
