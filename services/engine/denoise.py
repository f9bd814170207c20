"""The denoise loop as a running batch of slots: each slot an image at its own step of its own plan.

    denoise_chunk(unet, with_uncond, params, inputs, state, cursor, iterations)   one compiled program
    Slot                                                                     one image's work (host side)
    RunningBatch(run, class_labels_shape, buckets)                           slots stepping together;
                                                                             `run` runs one chunk
    batch.join(slots) / batch.run_chunk(n) / batch.leave(keep)               joining and leaving between chunks

Every per-request choice (prompt, guidance, rescale, sampler, step count, η, start step,
conditioning channels) is a per-slot input of the compiled program, never a compile-time
constant, so requests that differ in all of them share one batch (step-level continuous
batching), and a slot's result does not depend on its neighbours: its noise
comes from its own key, and nothing mixes samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdmesh.services.engine import lora_bank
from sdmesh.services.inputs.contract import MAX_STEPS
from sdmesh.services.models import controlnet as cn
from sdmesh.services.models import unet as un
from sdmesh.services.samplers import table

MAX_ROWS = (
    MAX_STEPS + 1
)  # plans are padded to this many rows (PLMS evaluates steps + 1 times), so steps never recompile


class SlotInputs(NamedTuple):
    """Per-slot inputs that stay fixed while a slot's request runs (leading axis: slot)."""

    rows: jax.Array  # (B, MAX_ROWS, len(table.COLUMNS)) float32: the slot's plan
    cond: jax.Array  # (B, L, D)
    uncond: jax.Array  # (B, L, D): zeros for slots without guidance
    guided: jax.Array  # (B,) float32: 1 where the slot uses classifier-free guidance
    guided_rows: jax.Array  # (B,) int32: the rows guided (guidance cutoff); later rows take the conditional output
    guidance: jax.Array  # (B,)
    rescale: jax.Array  # (B,)
    clip: jax.Array  # (B,) float32, inf: no clipping
    threshold_ratio: jax.Array  # (B,), 0: no dynamic thresholding
    threshold_max: jax.Array  # (B,)
    keys: jax.Array  # (B, 2) uint32: key data of the slot's noise stream (η, ancestral samplers)
    extra: jax.Array  # (B, h, w, E): channels concatenated to the UNet input (mask, depth, low-res image); E may be 0
    class_labels: jax.Array  # (B, *class_labels_shape) float32, or (B, 0) when the UNet takes none
    blend_mask: jax.Array  # (B, h, w, 1): 1 keeps the sample; < 1 blends towards the noised blend_latents (inpainting)
    blend_latents: jax.Array  # (B, h, w, C)
    blend_noise: jax.Array  # (B, h, w, C)
    lora_index: jax.Array  # (B, M) int32: the slot's LoRA bank rows (0: none); M is 0 when no slot has LoRAs
    lora_weight: jax.Array  # (B, M) float32
    controls: tuple[ControlInputs, ...] = ()  # one per ControlNet entry of the batch (`RunningBatch.control_layout`)


class ControlInputs(NamedTuple):
    """One ControlNet entry's per-slot inputs; slots without it have scale 0 (their residuals are zeros)."""

    image: jax.Array  # (B, H, W, channels) float32 in [0, 1]: the control map at the output size
    scale: jax.Array  # (B, MAX_ROWS) float32: the conditioning scale at each of the slot's rows (0 outside start/end)
    guess: jax.Array  # (B,) float32: 1 in guess mode (ramped residuals, none for the unconditional half)


class Cursor(NamedTuple):
    step: jax.Array  # (B,) int32: the slot's next row
    stop: jax.Array  # (B,) int32: its row count; a slot with step ≥ stop is idle and left unchanged


def guided_output(
    unet: un.UNet2DConditionModel,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array,
    uncond: jax.Array | None,
    guidance_scale: jax.Array,
    guidance_rescale: jax.Array,
    class_labels: jax.Array | None = None,
    guided: jax.Array | None = None,
    lora: Any = None,
    residuals: tuple[list[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """The UNet's output under classifier-free guidance (Ho & Salimans 2022), in one batched call.

    guidance_scale/guidance_rescale are (B,) so each sample may carry its own; `guided` (B,)
    marks the samples that use guidance (the others get the conditional output as is). `lora`: each
    sample's LoRA factors (`lora_bank.gather`), applied to both halves as diffusers does. `residuals`:
    ControlNet residuals (down list, mid) for the batch as the UNet runs it (both halves, unconditional first).
    """
    dtype = unet.dtype
    kw: dict[str, Any] = {} if class_labels is None else {"class_labels": class_labels}
    if residuals is not None:
        kw.update(down_residuals=residuals[0], mid_residual=residuals[1])
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    if uncond is None:
        return unet.apply(variables, x.astype(dtype), t, cond, **kw).astype(jnp.float32)
    if class_labels is not None:
        kw["class_labels"] = jnp.concatenate([class_labels, class_labels])
    if lora is not None:
        variables = {"params": params, "lora": lora_bank.repeat_rows(lora, 2)}
    both = unet.apply(
        variables,
        jnp.concatenate([x, x]).astype(dtype),
        jnp.concatenate([t, t]),
        jnp.concatenate([uncond, cond]),
        **kw,
    )
    out_uncond, out_cond = jnp.split(both.astype(jnp.float32), 2)
    g = guidance_scale[:, None, None, None]
    out = out_uncond + g * (out_cond - out_uncond)
    # Guidance rescale (Lin et al. 2023, §3.4), as diffusers computes it: unbiased std over all but batch.
    axes = tuple(range(1, out.ndim))
    ratio = jnp.std(out_cond, axis=axes, keepdims=True, ddof=1) / jnp.std(out, axis=axes, keepdims=True, ddof=1)
    r = guidance_rescale[:, None, None, None]
    out = jnp.where(r > 0, r * (out * ratio) + (1 - r) * out, out)
    return out if guided is None else jnp.where(guided[:, None, None, None] > 0, out, out_cond)


def _where(active: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def denoise_chunk(
    unet: un.UNet2DConditionModel,
    with_uncond: bool,
    params: Any,
    inputs: SlotInputs,
    state: table.SlotState,
    cursor: Cursor,
    iterations: jax.Array,
    lora_arrays: Any = None,
    controlnets: Sequence[cn.ControlNetModel] = (),
) -> tuple[table.SlotState, Cursor]:
    """`iterations` UNet evaluations for every active slot, each at its own row: one lax.fori_loop.

    `iterations` is traced, so one compiled program runs any chunk; `with_uncond` (static) says
    whether any slot needs the unconditional pass. `lora_arrays`: the LoRA bank (`LoraBank.arrays`),
    when some slot has adapters; each slot's factors are gathered once per chunk. `controlnets` (static):
    the model of each of `inputs.controls`; then `params` is (UNet params, one params tree per entry).
    """
    control_params: Sequence[Any] = ()
    if controlnets:
        params, control_params = params
    labels = inputs.class_labels if unet.config.class_labels_shape is not None else None
    lora = None if lora_arrays is None else lora_bank.gather(lora_arrays, inputs.lora_index, inputs.lora_weight)
    rows_per_slot = inputs.rows.shape[1]

    def body(_: jax.Array, carry: tuple[table.SlotState, Cursor]) -> tuple[table.SlotState, Cursor]:
        state, cursor = carry
        active = cursor.step < cursor.stop
        i = jnp.minimum(cursor.step, rows_per_slot - 1)
        row = jnp.take_along_axis(inputs.rows, i[:, None, None], axis=1)[:, 0]  # (B, K)
        c = lambda name: row[:, table.COL[name]][:, None, None, None]
        x_in = jnp.concatenate([c("c_in") * state.x, inputs.extra], axis=-1)
        t = row[:, table.COL["t"]]
        guided = inputs.guided * (i < inputs.guided_rows).astype(jnp.float32)
        residuals = None
        if controlnets:
            residuals = control_residuals(
                controlnets, control_params, inputs.controls, i, c("c_in") * state.x, t, inputs.cond,
                inputs.uncond if with_uncond else None,
            )  # fmt: skip
        out = guided_output(
            unet,
            params,
            x_in,
            t,
            inputs.cond,
            inputs.uncond if with_uncond else None,
            inputs.guidance,
            inputs.rescale,
            labels,
            guided,
            lora,
            residuals,
        )
        keys = jax.random.wrap_key_data(inputs.keys)
        wants_noise = active & ((row[:, table.COL["next_noise"]] != 0) | (inputs.blend_mask.min(axis=(1, 2, 3)) < 1))
        noise = jax.lax.cond(
            jnp.any(row[:, table.COL["next_noise"]] != 0) & jnp.any(wants_noise),
            lambda: jax.vmap(lambda k, j: jax.random.normal(jax.random.fold_in(k, j), state.x.shape[1:]))(keys, i),
            lambda: jnp.zeros_like(state.x),
        )
        new = table.step(row, state, out, noise, inputs.clip, inputs.threshold_ratio, inputs.threshold_max)
        # Latent blending (inpainting with an ordinary checkpoint): outside the mask, the clean
        # latents noised to the next row's level.
        known = c("blend_lat") * inputs.blend_latents + c("blend_noise") * inputs.blend_noise
        new = new._replace(x=inputs.blend_mask * new.x + (1 - inputs.blend_mask) * known)
        state = _where(active, new, state)
        return state, Cursor(cursor.step + active.astype(jnp.int32), cursor.stop)

    return jax.lax.fori_loop(0, iterations, body, (state, cursor))


def control_residuals(
    controlnets: Sequence[cn.ControlNetModel],
    params: Sequence[Any],
    controls: Sequence[ControlInputs],
    i: jax.Array,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array,
    uncond: jax.Array | None,
) -> tuple[list[jax.Array], jax.Array]:
    """The summed residuals of every ControlNet entry for the UNet's batch (both halves when `uncond` is given,
    unconditional first), each slot at its row `i`'s scale: diffusers' MultiControlNet, per slot."""
    total: tuple[list[jax.Array], jax.Array] | None = None
    for model, p, control in zip(controlnets, params, controls, strict=True):
        scale = jnp.take_along_axis(control.scale, i[:, None], axis=1)[:, 0]  # (B,)
        image, guess = control.image, control.guess
        if model.config.global_pool_conditions:  # diffusers' pipelines run these in guess mode always
            guess = jnp.ones_like(guess)
        if uncond is None:
            args = (x, t, cond, image, scale, guess)
        else:  # guess mode: the conditional half alone (diffusers gives the unconditional half zeros)
            both = lambda a: jnp.concatenate([a, a])
            args = (both(x), both(t), jnp.concatenate([uncond, cond]), both(image),
                    jnp.concatenate([scale * (1 - guess), scale]), both(guess))  # fmt: skip
        down, mid = model.apply({"params": p}, *args)
        total = (down, mid) if total is None else ([a + b for a, b in zip(total[0], down, strict=True)], total[1] + mid)
    assert total is not None
    return total


# --- host side: slots and the running batch ------------------------------------------


class SlotControl(NamedTuple):
    """One ControlNet applied to a slot."""

    name: str  # the stage's name for the ControlNet
    image: np.ndarray  # (H, W, channels) float32 in [0, 1]
    scale: float
    start: float  # fractions of the slot's rows, as diffusers' control_guidance_start/end
    end: float
    guess_mode: bool

    def scales(self, evaluations: int) -> np.ndarray:
        """(MAX_ROWS,) the scale at each row: diffusers' controlnet_keep (row i of E applies when i/E ≥ start and
        (i+1)/E ≤ end) times the scale; 0 past the last row."""
        i = np.arange(MAX_ROWS)
        keep = (i < evaluations) & (i / evaluations >= self.start) & ((i + 1) / evaluations <= self.end)
        return np.where(keep, np.float32(self.scale), np.float32(0)).astype(np.float32)


@dataclasses.dataclass(eq=False)  # a slot is itself: compared by identity
class Slot:
    """One image's work: everything its slot needs, host-side numpy."""

    plan: table.Plan
    x: np.ndarray  # (h, w, C) float32: the starting sample (already at the plan's noise level)
    cond: np.ndarray  # (L, D)
    uncond: np.ndarray | None  # (L, D), or None: no guidance
    guidance: float
    rescale: float
    key: np.ndarray  # (2,) uint32 key data
    guided_rows: int = MAX_ROWS  # rows run with guidance (the guidance cutoff); the rest take the conditional output
    extra: np.ndarray | None = None  # (h, w, E)
    class_label: np.ndarray | None = None  # per-sample class label (the upscaler's noise level)
    blend: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (mask (h,w,1), latents, noise (h,w,C))
    owner: Any = None  # who the result goes to; the batch never looks inside
    loras: tuple[tuple[int, float], ...] = ()  # (LoRA bank row, weight) per adapter
    lease: Any = None  # holds those bank rows while the slot exists (`lora_bank.Lease`)
    controls: tuple[SlotControl, ...] = ()  # ControlNets steering this image
    step: int = 0  # rows done
    steps: int = 0  # sampler steps this image runs, as progress counts them (PLMS evaluates once more)

    @property
    def done(self) -> bool:
        return self.step >= self.plan.evaluations

    @property
    def steps_done(self) -> int:
        """Sampler steps done so far, for progress: rows done scaled to `steps`."""
        return self.step * self.steps // self.plan.evaluations

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @property
    def needs_uncond(self) -> bool:
        """Whether its next row is guided (past its guidance cutoff, or done, it needs no unconditional pass)."""
        return self.guided and self.step < min(self.guided_rows, self.plan.evaluations)


def guided_rows(evaluations: int, cutoff: float) -> int:
    """The first ⌈cutoff · evaluations⌉ rows are guided (cutoff in (0, 1]); at least one."""
    return max(1, min(evaluations, math.ceil(round(cutoff * evaluations, 6))))


def group_key(slot: Slot) -> tuple:
    """Slots that can share a compiled program: same latent and conditioning shapes."""
    extra = 0 if slot.extra is None else slot.extra.shape[-1]
    return (slot.x.shape, slot.cond.shape, extra)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest compiled batch size that holds n slots."""
    return next((b for b in sorted(buckets) if b >= n), max(n, max(buckets)))


class RunningBatch:
    """Slots of one shape group, stepping together in compiled chunks.

    Joining and leaving happen between chunks and repack the batch on the host (a few
    latent-sized arrays per slot, small next to one UNet evaluation); between membership
    changes the state stays on the device.
    """

    def __init__(
        self,
        run: Callable[..., tuple[table.SlotState, Cursor]],
        class_labels_shape: tuple[int, ...] | None,
        buckets: Sequence[int],
    ):
        self._run, self.class_labels_shape, self.buckets = run, class_labels_shape, tuple(buckets)
        self.slots: list[Slot] = []
        self._device: tuple[SlotInputs, table.SlotState] | None = None  # None: rebuild before the next chunk
        self._host_state: list[table.SlotState] = []  # per slot, when the device copy is stale

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def capacity(self) -> int:
        return bucket(len(self.slots), self.buckets) if self.slots else 0

    @property
    def device_state(self) -> table.SlotState | None:
        """The slots' state as the last chunk left it on the device (None before a chunk, or after a repack)."""
        return None if self._device is None else self._device[1]

    @property
    def lora_width(self) -> int:
        """Adapters per slot the program is compiled for: 0 when no slot has any (the program without LoRA)."""
        most = max((len(s.loras) for s in self.slots), default=0)
        return 0 if most == 0 else lora_bank.bucket(most, lora_bank.ADAPTER_BUCKETS)

    @property
    def control_layout(self) -> tuple[str, ...]:
        """The ControlNet entries the program runs, by name: each name as often as the slot that uses it most
        (sorted, so slots in any order give one program); () when no slot has a control."""
        most: dict[str, int] = {}
        for s in self.slots:
            for name in {c.name for c in s.controls}:
                most[name] = max(most.get(name, 0), sum(c.name == name for c in s.controls))
        return tuple(name for name in sorted(most) for _ in range(most[name]))

    @property
    def with_uncond(self) -> bool:
        """Whether any slot's next row needs the unconditional pass (else the cheaper program without it runs)."""
        return any(s.needs_uncond for s in self.slots)

    def join(self, slots: Sequence[Slot], states: Sequence[table.SlotState] | None = None) -> None:
        """Add slots: fresh ones start from their `x`; `states` (from `suspend`) resume where they stopped."""
        self._pull()
        for i, s in enumerate(slots):
            self.slots.append(s)
            self._host_state.append(_fresh_state(s.x) if states is None else states[i])
        self._device = None

    def suspend(self, which: Callable[[Slot], bool]) -> list[tuple[Slot, table.SlotState]]:
        """Take out the slots `which` selects with their whole state, to `join` this or another batch later and
        continue as if never interrupted (the state carries the sampler's history; the step is the slot's)."""
        taken = [i for i, s in enumerate(self.slots) if which(s)]
        if not taken:
            return []
        self._pull()
        out = [(self.slots[i], self._host_state[i]) for i in taken]
        self.slots = [s for i, s in enumerate(self.slots) if i not in taken]
        self._host_state = [h for i, h in enumerate(self._host_state) if i not in taken]
        self._device = None
        return out

    def leave(self, keep: Callable[[Slot], bool]) -> list[tuple[Slot, np.ndarray]]:
        """Remove the slots `keep` rejects; returns them with their current latents (h, w, C)."""
        return [(slot, np.asarray(state.x)) for slot, state in self.suspend(lambda s: not keep(s))]

    def run_chunk(self, iterations: int) -> float:
        """Run `iterations` evaluations of every slot; returns the program's compile seconds (0 when cached)."""
        if self._device is None:
            self._device = self._build()
        inputs, state = self._device
        cursor = Cursor(
            jnp.asarray(self._column(lambda s: s.step), jnp.int32),
            jnp.asarray(self._column(lambda s: s.plan.evaluations), jnp.int32),
        )
        state, cursor, compile_s = self._run(self.with_uncond, self.control_layout, inputs, state, cursor, iterations)
        self._device = (inputs, state)
        for s in self.slots:
            s.step = min(s.step + iterations, s.plan.evaluations)
        return compile_s

    # -- packing --

    def _column(self, f: Callable[[Slot], Any]) -> np.ndarray:
        values = [f(s) for s in self.slots]
        return np.asarray(values + [values[0] * 0] * (self.capacity - len(values)))

    def _pull(self) -> None:
        """Bring the device state back into per-slot host copies (before a repack)."""
        if self._device is None:
            return
        state = jax.tree_util.tree_map(np.asarray, self._device[1])
        self._host_state = [jax.tree_util.tree_map(lambda a, i=i: a[i], state) for i in range(len(self.slots))]
        self._device = None

    def _build(self) -> tuple[SlotInputs, table.SlotState]:
        slots, cap = self.slots, self.capacity
        pad = cap - len(slots)
        first = slots[0]

        def stack(values: list[np.ndarray]) -> np.ndarray:
            values = [np.asarray(v, np.float32) if v.dtype != np.uint32 else v for v in values]
            return np.stack(values + [np.zeros_like(values[0])] * pad)

        rows = []
        for s in slots:
            r = np.zeros((MAX_ROWS, len(table.COLUMNS)), np.float32)
            r[: s.plan.evaluations] = s.plan.rows
            r[s.plan.evaluations :] = s.plan.rows[-1]  # never read (the slot is idle), but finite
            rows.append(r)
        h, w, c = first.x.shape
        e = 0 if first.extra is None else first.extra.shape[-1]
        label_shape = self.class_labels_shape
        inputs = SlotInputs(
            rows=stack(rows),
            cond=stack([s.cond for s in slots]),
            uncond=stack([s.uncond if s.uncond is not None else np.zeros_like(s.cond) for s in slots]),
            guided=stack([np.float32(s.guided) for s in slots]),
            guided_rows=np.asarray([s.guided_rows for s in slots] + [0] * pad, np.int32),
            guidance=stack([np.float32(s.guidance) for s in slots]),
            rescale=stack([np.float32(s.rescale) for s in slots]),
            clip=stack([np.float32(s.plan.clip) for s in slots]),
            threshold_ratio=stack([np.float32(s.plan.threshold_ratio) for s in slots]),
            threshold_max=stack([np.float32(s.plan.threshold_max) for s in slots]),
            keys=stack([np.asarray(s.key, np.uint32) for s in slots]),
            extra=stack([s.extra if s.extra is not None else np.zeros((h, w, e), np.float32) for s in slots]),
            class_labels=stack(
                [
                    np.zeros((0,), np.float32)
                    if label_shape is None
                    else np.broadcast_to(np.asarray(s.class_label, np.float32), label_shape)
                    for s in slots
                ]
            ),
            blend_mask=np.stack(
                [s.blend[0] if s.blend else np.ones((h, w, 1), np.float32) for s in slots]
                + [np.ones((h, w, 1), np.float32)] * pad
            ).astype(np.float32),
            blend_latents=stack([s.blend[1] if s.blend else np.zeros((h, w, c), np.float32) for s in slots]),
            blend_noise=stack([s.blend[2] if s.blend else np.zeros((h, w, c), np.float32) for s in slots]),
            lora_index=np.zeros((cap, 0), np.int32),
            lora_weight=np.zeros((cap, 0), np.float32),
        )
        if label_shape is None:
            inputs = inputs._replace(class_labels=np.zeros((cap, 0), np.float32))
        index, weight = lora_bank.slot_columns([s.loras for s in slots] + [()] * pad, self.lora_width)
        inputs = inputs._replace(lora_index=index, lora_weight=weight, controls=self._controls(pad))
        state = jax.tree_util.tree_map(lambda *a: np.stack(list(a) + [np.zeros_like(a[0])] * pad), *self._host_state)
        return inputs, state

    def _controls(self, pad: int) -> tuple[ControlInputs, ...]:
        """Each entry of `control_layout`: slot k's j-th use of a name fills that name's j-th entry."""
        layout, slots = self.control_layout, self.slots
        entries = []
        for j, name in enumerate(layout):
            nth = j - layout.index(name)
            picked = [[c for c in s.controls if c.name == name][nth : nth + 1] for s in slots]
            shape = next(p[0].image.shape for p in picked if p)
            image = [p[0].image if p else np.zeros(shape, np.float32) for p in picked] + [
                np.zeros(shape, np.float32)
            ] * pad
            scale = [
                p[0].scales(s.plan.evaluations) if p else np.zeros(MAX_ROWS, np.float32)
                for p, s in zip(picked, slots, strict=True)
            ]
            guess = [np.float32(p[0].guess_mode) if p else np.float32(0) for p in picked]
            entries.append(
                ControlInputs(
                    image=np.stack(image).astype(np.float32),
                    scale=np.stack(scale + [np.zeros(MAX_ROWS, np.float32)] * pad),
                    guess=np.asarray(guess + [np.float32(0)] * pad, np.float32),
                )
            )
        return tuple(entries)


def _fresh_state(x: np.ndarray) -> table.SlotState:
    x = np.asarray(x, np.float32)
    z = np.zeros_like(x)
    return table.SlotState(
        x, z, np.zeros((table.OUT_HISTORY,) + x.shape, np.float32), np.zeros((table.X0_HISTORY,) + x.shape, np.float32)
    )
