"""Every sampler as a table of per-step coefficients, run by one generic step on the device.

DDIM, Euler (ancestral or not), DPM-Solver++(2M) and PLMS each update the sample
*linearly* in quantities the loop already holds: the sample x, the network's raw output,
the x̂₀ and ε̂ predicted from it, a few past outputs and x̂₀s, a saved sample and fresh
noise. Only the coefficients differ, and they depend on the schedule, not on the data.
So a sampler is host-side numpy that fills a table (`Plan`), and the compiled loop runs
`step` for every slot of a batch whatever sampler, step count or position each slot has:
samplers, step counts and requests share one program.

One row per UNet evaluation (PLMS evaluates steps + 1 times). With `out` the network's
output for input concat(c_in · x, extra) at timestep t:

    x̂₀  = x0_x · x + x0_out · out                then clipped or thresholded (per sample)
    ε̂   = eps_x · x + eps_out · out + eps_x0 · x̂₀  (DDIM recomputes ε̂ from the clipped x̂₀)
    x'  = next_x · x + next_saved · saved + next_out · out + Σ next_out_k · out_k
          + next_x0 · x̂₀ + Σ next_x0_k · x̂₀_k + next_eps · ε̂ + next_noise · z

then out joins the output history if push_out, x̂₀ always joins its history, and saved ← x
if save_x. For latent blending (inpainting with an ordinary checkpoint) a row also holds
the coefficients that noise clean latents to the level of the *next* row (blend_lat,
blend_noise; (1, 0) after the last row).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

COLUMNS = (
    "t",
    "c_in",
    "x0_x",
    "x0_out",
    "eps_x",
    "eps_out",
    "eps_x0",
    "next_x",
    "next_saved",
    "next_out",
    "next_out_1",
    "next_out_2",
    "next_out_3",
    "next_x0",
    "next_x0_1",
    "next_x0_2",
    "next_eps",
    "next_noise",
    "push_out",
    "save_x",
    "blend_lat",
    "blend_noise",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
OUT_HISTORY = 3  # PLMS's fourth-order Adams–Bashforth uses three past outputs
X0_HISTORY = 2  # DPM-Solver++(2M) uses one past x̂₀; 3M would use two


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampler's whole run for one request: the rows its slot steps through."""

    rows: np.ndarray  # (n, len(COLUMNS)) float64, one row per UNet evaluation
    init_noise_sigma: float = 1.0  # text-to-image starts from init_noise_sigma · z
    start_lat: float = 0.0  # img2img starts from start_lat · latents + start_noise · z (the first row's noise level)
    start_noise: float = 1.0
    clip: float = math.inf  # clip x̂₀ to [−clip, clip] (DDIM's clip_sample)
    threshold_ratio: float = 0.0  # > 0: dynamic thresholding of x̂₀ at this quantile (Imagen)
    threshold_max: float = 1.0

    @property
    def evaluations(self) -> int:
        return int(self.rows.shape[0])


def empty_rows(n: int) -> np.ndarray:
    """n rows that leave the sample unchanged: a base for builders to fill."""
    rows = np.zeros((n, len(COLUMNS)), np.float64)
    rows[:, COL["next_x"]] = 1.0
    rows[:, COL["c_in"]] = 1.0
    rows[:, COL["blend_lat"]] = 1.0
    return rows


def set_blend(rows: np.ndarray, add_lat: np.ndarray, add_noise: np.ndarray) -> None:
    """Fill blend_* from the per-row add-noise coefficients: row i blends towards row i+1's noise level."""
    rows[:-1, COL["blend_lat"]] = add_lat[1:]
    rows[:-1, COL["blend_noise"]] = add_noise[1:]
    rows[-1, COL["blend_lat"]], rows[-1, COL["blend_noise"]] = 1.0, 0.0


class SlotState(NamedTuple):
    """What a slot carries between steps (all (B, …) float32, NHWC)."""

    x: jax.Array  # (B, h, w, C)
    saved: jax.Array  # (B, h, w, C)
    out_history: jax.Array  # (B, OUT_HISTORY, h, w, C), most recent first
    x0_history: jax.Array  # (B, X0_HISTORY, h, w, C), most recent first


def initial_state(x: jax.Array) -> SlotState:
    zeros = jnp.zeros_like(x)
    return SlotState(
        x,
        zeros,
        jnp.zeros((x.shape[0], OUT_HISTORY) + x.shape[1:], x.dtype),
        jnp.zeros((x.shape[0], X0_HISTORY) + x.shape[1:], x.dtype),
    )


def _per_sample(v: jax.Array) -> jax.Array:
    return v[:, None, None, None]


def threshold(x0: jax.Array, ratio: jax.Array, max_value: jax.Array) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022): clip each sample at its ratio-quantile of |x̂₀|, rescaled."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.clip(jax.vmap(jnp.quantile)(flat, ratio), 1.0, max_value)
    s = _per_sample(s)
    return jnp.clip(x0, -s, s) / s


def predict(
    row: jax.Array, x: jax.Array, out: jax.Array, clip: jax.Array, threshold_ratio: jax.Array, threshold_max: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x̂₀, ε̂) from the network's output; `row` is (B, len(COLUMNS)), the rest per sample."""
    c = lambda name: _per_sample(row[:, COL[name]])
    x0 = c("x0_x") * x + c("x0_out") * out
    x0 = jnp.clip(x0, -_per_sample(clip), _per_sample(clip))
    thresholded = jax.lax.cond(
        jnp.any(threshold_ratio > 0),
        lambda: threshold(x0, jnp.where(threshold_ratio > 0, threshold_ratio, 0.5), threshold_max),
        lambda: x0,
    )
    x0 = jnp.where(_per_sample(threshold_ratio) > 0, thresholded, x0)
    eps = c("eps_x") * x + c("eps_out") * out + c("eps_x0") * x0
    return x0, eps


def step(
    row: jax.Array,
    state: SlotState,
    out: jax.Array,
    noise: jax.Array | None,
    clip: jax.Array,
    threshold_ratio: jax.Array,
    threshold_max: jax.Array,
) -> SlotState:
    """One row of every slot's plan: the sample after this UNet evaluation, and the updated history."""
    c = lambda name: _per_sample(row[:, COL[name]])
    x = state.x
    x0, eps = predict(row, x, out, clip, threshold_ratio, threshold_max)
    h_out, h_x0 = state.out_history, state.x0_history
    nxt = (
        c("next_x") * x
        + c("next_saved") * state.saved
        + c("next_out") * out
        + c("next_out_1") * h_out[:, 0]
        + c("next_out_2") * h_out[:, 1]
        + c("next_out_3") * h_out[:, 2]
        + c("next_x0") * x0
        + c("next_x0_1") * h_x0[:, 0]
        + c("next_x0_2") * h_x0[:, 1]
        + c("next_eps") * eps
    )
    if noise is not None:
        nxt = nxt + c("next_noise") * noise
    pushed = jnp.concatenate([out[:, None], h_out[:, :-1]], axis=1)
    h_out = jnp.where(c("push_out")[..., None] > 0, pushed, h_out)
    h_x0 = jnp.concatenate([x0[:, None], h_x0[:, :-1]], axis=1)
    saved = jnp.where(c("save_x") > 0, x, state.saved)
    return SlotState(nxt, saved, h_out, h_x0)
