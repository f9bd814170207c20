"""PNDM / PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"),
as a coefficient table (see samplers.table).

Driven by a checkpoint's scheduler_config.json with diffusers' PNDMScheduler semantics (what SD 1.x/2
ship). Every step is the pseudo-numerical transfer φ(x, ε, t → t'), eq. 11, applied to a combination of
network outputs:

* PLMS (skip_prk_steps=True, what SD ships): N + 1 evaluations. The first step is Euler-like; the second
  evaluates at the same timestep again, averages the two outputs and restarts from the saved first sample
  (that output never joins the history); then Adams–Bashforth of order 2, 3 and 4 on the stored outputs.
* PRK warm-up (skip_prk_steps=False): three Runge–Kutta steps of four evaluations each, then PLMS; the
  three intermediate outputs of a Runge–Kutta step ride in the table's x̂₀ history.

The step keeps a counter that restarts with every run, so an img2img run that starts part-way restarts
the warm-up too; `make_plan` reproduces that by simulating the counter on the sliced timesteps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from sdmesh.services.samplers import ddim, table

PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' PNDM raises on "sample"
PNDM_ORDER = 4


@dataclasses.dataclass(frozen=True)
class PNDMConfig:
    # Defaults are PNDMScheduler's own (it has no zero-SNR rescaling).
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"PNDM does not support prediction_type {self.prediction_type!r}; it supports "
                f"{PREDICTION_TYPES} (use 'ddim' or 'euler' for 'sample')"
            )
        if self.timestep_spacing not in ddim.TIMESTEP_SPACINGS:
            raise ValueError(
                f"scheduler timestep_spacing {self.timestep_spacing!r} is not one of {ddim.TIMESTEP_SPACINGS}"
            )
        ddim.DDIMConfig(beta_schedule=self.beta_schedule, trained_betas=self.trained_betas)  # validates beta_schedule

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PNDMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)


def _alphas_cumprod(config: PNDMConfig) -> np.ndarray:
    return ddim.alphas_cumprod(
        ddim.DDIMConfig(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            trained_betas=config.trained_betas,
        )
    )


def _spaced(config: PNDMConfig, num_steps: int) -> np.ndarray:
    """Ascending inference timesteps (diffusers' `_timesteps`)."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round().astype(np.int64)
    if config.timestep_spacing == "leading":
        return (np.arange(0, num_steps) * (n // num_steps)).round().astype(np.int64) + config.steps_offset
    return np.round(np.arange(n, 0, -n / num_steps))[::-1].astype(np.int64) - 1  # trailing


def timesteps(config: PNDMConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(PRK timesteps, PLMS timesteps): the UNet's timesteps are the two concatenated (diffusers' `set_timesteps`)."""
    ts = _spaced(config, num_steps)
    if config.skip_prk_steps:
        return np.zeros(0, np.int64), np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
    if num_steps < PNDM_ORDER:
        raise ValueError(
            f"PNDM's Runge–Kutta warm-up needs at least {PNDM_ORDER} steps, got {num_steps}; "
            "use more steps or set skip_prk_steps (PLMS)"
        )
    half = config.num_train_timesteps // num_steps // 2
    prk = ts[-PNDM_ORDER:].repeat(2) + np.tile(np.array([0, half]), PNDM_ORDER)
    return prk[:-1].repeat(2)[1:-1][::-1].copy(), ts[:-3][::-1].copy()


class _Transfer(NamedTuple):
    """One row's update: φ(source, M, t_alpha → t_prev), M = Σ weight · (output of row)."""

    t: int  # the UNet's timestep
    from_saved: bool  # the step starts again from the saved sample
    t_alpha: int
    t_prev: int
    weights: dict[int, float]  # row index → weight in the combined output M
    push_out: bool
    save_x: bool
    x0_is_out: bool  # PRK stores this row's output in the x̂₀ history


def _transfers(config: PNDMConfig, num_steps: int, first: int) -> list[_Transfer]:
    """Simulate diffusers' step() counter on timesteps[first:], as a pipeline runs it (counter from 0)."""
    prk, plms = timesteps(config, num_steps)
    passed = np.concatenate([prk, plms])[first:]
    delta = config.num_train_timesteps // num_steps
    out, ets, group = [], [], []
    for c, t in enumerate(int(v) for v in passed):
        if c < len(prk) and not config.skip_prk_steps:  # step_prk
            prev = t - (0 if c % 2 else delta // 2)
            t_alpha = int(prk[c // 4 * 4])
            weights, push, save = {c: 1.0}, c % 4 == 0, c % 4 == 0
            if c % 4 == 0:
                ets.append(c)
                group = [c]
            elif c % 4 in (1, 2):
                group.append(c)
            else:  # Runge–Kutta's (1, 2, 2, 1)/6 of the four slopes
                weights = {group[0]: 1 / 6, group[1]: 1 / 3, group[2]: 1 / 3, c: 1 / 6}
            out.append(_Transfer(t, c % 4 != 0, t_alpha, prev, weights, push, save, c % 4 in (1, 2)))
            continue
        # step_plms
        prev, t_alpha, push = t - delta, t, c != 1
        if c != 1:
            ets = ets[-3:] + [c]
        else:  # the repeated timestep: step from t + Δ to t again, from the saved sample
            prev, t_alpha = t, t + delta
        n = len(ets)
        if n == 1 and c == 0:
            weights = {c: 1.0}
        elif n == 1 and c == 1:
            weights = {c: 0.5, ets[-1]: 0.5}
        elif n == 2:
            weights = {ets[-1]: 3 / 2, ets[-2]: -1 / 2}
        elif n == 3:
            weights = {ets[-1]: 23 / 12, ets[-2]: -16 / 12, ets[-3]: 5 / 12}
        else:
            weights = {ets[-1]: 55 / 24, ets[-2]: -59 / 24, ets[-3]: 37 / 24, ets[-4]: -9 / 24}
        out.append(_Transfer(t, n == 1 and c == 1, t_alpha, prev, weights, push, n == 1 and c == 0, False))
    return out


def max_steps(config: PNDMConfig) -> int:
    """The most steps whose timesteps (and PLMS's t + Δ) all lie in training's range."""
    n = config.num_train_timesteps
    lo = 1 if config.skip_prk_steps else PNDM_ORDER
    return next((k for k in range(n, lo - 1, -1) if max(max(r.t, r.t_alpha) for r in _transfers(config, k, 0)) < n), lo)


def make_plan(config: PNDMConfig, num_steps: int, *, first: int = 0) -> table.Plan:
    """PNDM/PLMS as a coefficient table: rows for timesteps[first:] of a num_steps run (N + 1 of them for PLMS).

    `first` counts the scheduler's timesteps, as diffusers' img2img slices them (PNDM's order is 1).
    """
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"steps must be between 1 and the scheduler's num_train_timesteps ({n}), got {num_steps}")
    count = sum(len(t) for t in timesteps(config, num_steps))
    if not 0 <= first < count:
        raise ValueError(f"first must be in [0, {count}), got {first}")
    transfers = _transfers(config, num_steps, first)
    if max(max(r.t, r.t_alpha) for r in transfers) >= n:
        raise ValueError(
            f"{num_steps} steps with steps_offset {config.steps_offset} reach past the scheduler's last "
            f"timestep ({n - 1}); use at most {max_steps(config)} steps"
        )
    ac = _alphas_cumprod(config).astype(np.float64)
    final = 1.0 if config.set_alpha_to_one else ac[0]
    rows = table.empty_rows(len(transfers))
    col = table.COL
    out_history: list[int] = []  # row indices, most recent first (as table.step keeps them)
    x0_history: list[int] = []
    for i, r in enumerate(transfers):
        a_unet = ac[r.t]
        rows[i, col["t"]] = r.t
        if r.x0_is_out:
            rows[i, col["x0_out"]] = 1.0
        elif config.prediction_type == "epsilon":  # x̂₀ and ε̂ for previews only; the step does not read them
            rows[i, col["x0_x"]], rows[i, col["x0_out"]] = 1 / np.sqrt(a_unet), -np.sqrt((1 - a_unet) / a_unet)
            rows[i, col["eps_out"]] = 1.0
        else:
            rows[i, col["x0_x"]], rows[i, col["x0_out"]] = np.sqrt(a_unet), -np.sqrt(1 - a_unet)
            rows[i, col["eps_x"]], rows[i, col["eps_out"]] = np.sqrt(1 - a_unet), np.sqrt(a_unet)
        # φ, eq. 11: x' = √(ᾱ'/ᾱ)·x − (ᾱ' − ᾱ) / (ᾱ√(1 − ᾱ') + √(ᾱ(1 − ᾱ)ᾱ'))·ε
        a = ac[r.t_alpha]
        ap = ac[r.t_prev] if r.t_prev >= 0 else final
        k = (ap - a) / (a * np.sqrt(1 - ap) + np.sqrt(a * (1 - a) * ap))
        x_coef, out_coef = np.sqrt(ap / a), -k
        if config.prediction_type == "v_prediction":  # ε = √ᾱ·v + √(1 − ᾱ)·x, converted once for the combined M
            x_coef, out_coef = x_coef - k * np.sqrt(1 - a), -k * np.sqrt(a)
        rows[i, col["next_x"]] = 0.0
        rows[i, col["next_saved" if r.from_saved else "next_x"]] = x_coef
        for j, w in r.weights.items():
            if j == i:
                name = "next_out"
            elif j in out_history[: table.OUT_HISTORY]:
                name = f"next_out_{out_history.index(j) + 1}"
            elif j in x0_history[: table.X0_HISTORY] and transfers[j].x0_is_out:
                name = f"next_x0_{x0_history.index(j) + 1}"
            else:
                raise AssertionError(f"PNDM row {i} needs the output of row {j}, which the table no longer holds")
            rows[i, col[name]] += out_coef * w
        rows[i, col["push_out"]], rows[i, col["save_x"]] = float(r.push_out), float(r.save_x)
        if r.push_out:
            out_history.insert(0, i)
        x0_history.insert(0, i)
    a_rows = ac[[r.t for r in transfers]]
    sa, sb = np.sqrt(a_rows), np.sqrt(1 - a_rows)
    table.set_blend(rows, sa, sb)  # add_noise (DDPM's) at the next row's timestep
    return table.Plan(rows=rows, init_noise_sigma=1.0, start_lat=float(sa[0]), start_noise=float(sb[0]))
