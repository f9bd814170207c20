"""LoRA adapters resident on the device and applied per batch row, never merged: a bank of stacked factors.

    bank = LoraBank(kernel_shapes(params_shapes), capacity=8, targets=UNET_TARGETS)
    lease = bank.acquire([("style", 0.8)], load)       # rows for a request's adapters, loading what is missing
    rows = gather(bank.arrays(), index, weight)         # in the program: per batch row, its adapters' factors
    unet.apply({"params": params, "lora": rows}, ...)   # layers.Dense / layers.Conv2d add (x @ down) @ up

The bank holds, per targeted layer, down (S, *kernel_in, R) and up (S, R, out): row 0 is zeros, for batch
rows without adapters, the others one adapter each with its alpha/r folded into down, padded with zeros to
the rank bucket R. A batch row n with adapters (index[n, m], weight[n, m]) gets, at each targeted layer,
Σ_m weight[n, m] · (x_n @ down[index[n, m]]) @ up[index[n, m]]: every mix of adapters and weights in a
batch runs one program. Only a larger rank bucket, or a file for layers outside the targets (SD LoRAs
train attention, feed-forward and proj_in/out; LoCon adds convolutions), changes the shapes and compiles
once more.

A row stays resident while a `Lease` holds it: the slots of a running request keep theirs, and a row is
free again once no lease refers to it (however the request ended). Past `capacity`, loading reuses the
least recently used free row; when every row is held, the request is refused.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdmesh.services.checkpoints.lora import LoraDirectory, LoraError, LoraLayer
from sdmesh.services.engine.errors import AdaptersBusy
from sdmesh.services.inputs.errors import InvalidRequest

RANK_BUCKETS = (4, 8, 16, 32, 64, 128, 256)
ADAPTER_BUCKETS = (1, 2, 4, 8)  # adapters per batch row the program is compiled for (MAX_LORAS is 8)

# The layers SD LoRAs train (kohya's Transformer2DModel modules, PEFT's to_q/k/v/out defaults plus ff),
# named by the last part of our param path, and the text encoder's attention and MLP.
UNET_TARGETS = frozenset({"to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "proj", "net_2"})
TEXT_ENCODER_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"})


def kernel_shapes(param_shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every Dense/Conv kernel of a params tree (arrays or ShapeDtypeStructs): "/"-joined layer path → shape."""
    found: dict[str, tuple[int, ...]] = {}

    def visit(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for name, value in tree.items():
            if isinstance(value, Mapping):
                visit(value, (*prefix, name))
            elif name == "kernel":
                found["/".join(prefix)] = tuple(value.shape)

    visit(param_shapes, ())
    return found


def bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), n)


class Lease:
    """A request's adapters as bank rows: (row, weight) per adapter that touches this model."""

    def __init__(self, rows: tuple[tuple[int, float], ...]):
        self.rows = rows


class LoraBank:
    """Adapters on the device, one row each (see the module docstring). Thread-safe."""

    def __init__(
        self,
        kernels: Mapping[str, tuple[int, ...]],
        *,
        capacity: int,
        targets: Iterable[str],
        dtype: Any = jnp.float32,
    ):
        if capacity < 1:
            raise ValueError(f"--max-adapters must be at least 1, got {capacity}")
        self.kernels, self.capacity, self.dtype = dict(kernels), capacity, dtype
        names = frozenset(targets)
        self.targets = [p for p in self.kernels if p.rsplit("/", 1)[-1] in names]
        self.rank = 0  # the rank bucket; 0 until an adapter is loaded
        self._arrays: dict[str, tuple[jax.Array, jax.Array]] = {}
        self._resident: collections.OrderedDict[str, int | None] = collections.OrderedDict()  # name → row (LRU)
        self._ranks: dict[str, int] = {}
        self._holders: dict[int, weakref.WeakSet[Lease]] = {r: weakref.WeakSet() for r in range(1, capacity + 1)}
        self._lock = threading.Lock()

    # -- what programs read --

    def arrays(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Per targeted layer (down, up): the program's argument (its shapes change only with R or the targets)."""
        with self._lock:
            return dict(self._arrays)

    @property
    def resident(self) -> dict[str, int]:
        """Adapter name → its rank, for every adapter on the device now."""
        with self._lock:
            return {name: self._ranks[name] for name in self._resident}

    # -- loading --

    def acquire(self, choices: Sequence[tuple[str, float]], load: Callable[[str], Mapping[str, LoraLayer]]) -> Lease:
        """Rows for these (name, weight) adapters, loading (via `load(name)`: its layers for this model) what is
        not resident. An adapter with no layers in this model (a text-encoder-only LoRA on the UNet) gets none."""
        with self._lock:
            rows: list[tuple[int, float]] = []
            lease = Lease(())
            for name, weight in choices:
                if name not in self._resident:
                    self._load(name, load(name), exclude={r for r, _ in rows})
                self._resident.move_to_end(name)
                row = self._resident[name]
                if row is not None and weight != 0:
                    rows.append((row, float(weight)))
                    self._holders[row].add(lease)
            lease.rows = tuple(rows)
            return lease

    def _load(self, name: str, layers: Mapping[str, LoraLayer], exclude: set[int]) -> None:
        if not layers:
            self._resident[name] = None
            self._ranks[name] = 0
            return
        row = self._free_row(exclude)
        rank = max(layer.up.shape[0] for layer in layers.values())
        self._grow(bucket(rank, RANK_BUCKETS), [p for p in layers if p not in self._arrays])
        for path in self._arrays:
            down, up = self._arrays[path]
            layer = layers.get(path)
            d = np.zeros(down.shape[1:], np.float32)
            u = np.zeros(up.shape[1:], np.float32)
            if layer is not None:
                r = layer.up.shape[0]
                d[..., :r] = layer.down * layer.scale
                u[:r] = layer.up
            self._arrays[path] = (down.at[row].set(d.astype(down.dtype)), up.at[row].set(u.astype(up.dtype)))
        self._resident[name] = row
        self._ranks[name] = rank

    def _free_row(self, exclude: set[int]) -> int:
        used = {row for row in self._resident.values() if row is not None}
        for row in range(1, self.capacity + 1):
            if row not in used:
                return row
        for name, row in self._resident.items():  # least recently used first
            if row is not None and row not in exclude and not len(self._holders[row]):
                del self._resident[name]
                del self._ranks[name]
                return row
        raise AdaptersBusy(
            f"all {self.capacity} adapter slots of this stage are in use by running requests; "
            "retry later, or start the stage with a larger --max-adapters"
        )

    def _grow(self, rank: int, new_targets: list[str]) -> None:
        """Pad every layer to rank bucket `rank` and add zero rows for layers not targeted yet."""
        for path in self.targets + new_targets:
            if path not in self.kernels:
                raise KeyError(f"no kernel {path}")  # load_lora maps only onto this model's kernels
        if rank > self.rank:
            for path, (down, up) in self._arrays.items():
                pad = rank - down.shape[-1]
                down = jnp.pad(down, [(0, 0)] * (down.ndim - 1) + [(0, pad)])
                up = jnp.pad(up, ((0, 0), (0, pad), (0, 0)))
                self._arrays[path] = (down, up)
            self.rank = rank
        for path in [p for p in self.targets + new_targets if p not in self._arrays]:
            kernel = self.kernels[path]
            rows = self.capacity + 1
            self._arrays[path] = (
                jnp.zeros((rows, *kernel[:-1], self.rank), self.dtype),
                jnp.zeros((rows, self.rank, kernel[-1]), self.dtype),
            )
        self.targets = list(dict.fromkeys(self.targets + new_targets))


def gather(arrays: Mapping[str, tuple[jax.Array, jax.Array]], index: jax.Array, weight: jax.Array) -> dict[str, Any]:
    """Per batch row its adapters' factors, as the "lora" variable collection: index, weight (B, M) → per layer
    {"down": (B, *kernel_in, M·R) with the weights folded in, "up": (B, M·R, out)}, nested by module path."""
    tree: dict[str, Any] = {}
    for path, (down, up) in arrays.items():
        d = down[index]  # (B, M, *kernel_in, R)
        d = d * weight.reshape(weight.shape + (1,) * (d.ndim - 2)).astype(d.dtype)
        d = jnp.moveaxis(d, 1, -2)  # (B, *kernel_in, M, R)
        d = d.reshape(*d.shape[:-2], -1)
        u = up[index]  # (B, M, R, out)
        u = u.reshape(u.shape[0], -1, u.shape[-1])
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node["down"], node["up"] = d, u
    return tree


def repeat_rows(tree: Any, times: int) -> Any:
    """The gathered factors for a batch stacked `times` over (classifier-free guidance's two halves)."""
    return jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * times), tree)


def slot_columns(loras: Sequence[tuple[tuple[int, float], ...]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight) (B, width) for each slot's (row, weight) list; unused places point at row 0 with weight 0."""
    index = np.zeros((len(loras), width), np.int32)
    weight = np.zeros((len(loras), width), np.float32)
    for n, rows in enumerate(loras):
        for m, (row, w) in enumerate(rows):
            index[n, m], weight[n, m] = row, w
    return index, weight


class Adapters:
    """A stage's LoRAs: the files of its --lora-dir (`lora.LoraDirectory`) and the bank of those on the device;
    `component` ("unet" or "text_encoder") is the part of each file this stage applies."""

    def __init__(self, directory: LoraDirectory, bank: LoraBank, component: str):
        self.directory, self.bank, self.component = directory, bank, component
        self._errors: dict[str, str] = {}

    def lease(self, choices: Sequence[tuple[str, float]]) -> Lease:
        """Bank rows for a request's (name, weight) LoRAs; InvalidRequest naming a file that is missing or does not
        fit, AdaptersBusy when every row is in use."""

        def load(name: str) -> Mapping[str, LoraLayer]:
            try:
                found = self.directory.load(name)
            except LoraError as e:
                self._errors[name] = str(e)
                raise InvalidRequest(str(e)) from None
            self._errors.pop(name, None)
            return getattr(found, self.component)

        return self.bank.acquire(choices, load)

    def check(self, names: Sequence[str]) -> None:
        """Refuse a request naming a LoRA that is neither on the device nor a file of the folder (reads no file)."""
        resident = self.bank.resident
        files = None
        for name in names:
            if name not in resident:
                files = self.directory.files() if files is None else files
                if name not in files:
                    raise InvalidRequest(self.directory.missing(name, files))

    def info(self) -> list[tuple[str, bool, int, str]]:
        """(name, resident, rank, error) for every file in the folder and every adapter on the device."""
        resident = self.bank.resident
        names = sorted(set(self.directory.files()) | set(resident))
        return [(n, n in resident, resident.get(n, 0), self._errors.get(n, "")) for n in names]


def adapters_for(
    component: str, shapes: Mapping[str, Any], directory: Any, max_adapters: int, *, dtype: Any, allow_pickle: bool
) -> Adapters:
    """The LoRAs of `directory` for the stage holding `component` ("unet" or "text_encoder"), whose params tree
    (or its shapes) is `shapes`, at most `max_adapters` on the device at once."""
    unet = component == "unet"
    return Adapters(
        LoraDirectory(directory, shapes if unet else None, None if unet else shapes, allow_pickle=allow_pickle),
        LoraBank(
            kernel_shapes(shapes), capacity=max_adapters, targets=UNET_TARGETS if unet else TEXT_ENCODER_TARGETS,
            dtype=dtype,
        ),
        component,
    )  # fmt: skip


def required(adapters: Adapters | None, loras: Sequence[tuple[str, float]], stage: str) -> Adapters:
    """The stage's adapters, or InvalidRequest when a request names LoRAs and the stage has no --lora-dir."""
    if adapters is None:
        raise InvalidRequest(
            f"the request names LoRA {loras[0][0]!r}, but this {stage} has no LoRAs: start it with --lora-dir DIR"
        )
    return adapters
