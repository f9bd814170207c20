"""A device mesh per stage and where each parameter lives on it: one table of logical axes.

Parameters get logical axis names from their path and shape (`logical_axes`); `RULES`
maps those names to the mesh axes `data`, `fsdp` and `tensor` (flax lm1b's and
maxdiffusion's shape). Model code never names a mesh axis. A dimension that its mesh
axis does not divide is replicated instead, so every SD config runs on every mesh.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = shard_params(params, mesh)          # each leaf onto its shards
    x = jax.device_put(latents, batch_sharding(mesh, latents.shape))
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdmesh.services.errors import InvalidRequest

AXES = ("data", "fsdp", "tensor")
FLAGS = {"data": "--ici-data-parallelism", "fsdp": "--ici-fsdp-parallelism", "tensor": "--ici-tensor-parallelism"}

# Logical axis → mesh axis (None: replicated). The one place that decides what is split where.
RULES: dict[str, str | None] = {
    "batch": "data",        # activations: each data-parallel group runs its own images
    "embed": "fsdp",        # a kernel's input features: split for memory, gathered before use
    "mlp": "tensor",        # a Dense kernel's output features
    "conv_out": "tensor",   # a convolution's output channels
    "vocab": None,          # token and position tables: looked up by index, kept whole
    "norm": None,           # biases and norm scales: tiny, kept whole on every device
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices along each mesh axis; -1 (on at most one axis) fills with the devices left."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = dataclasses.astuple(self)
        if not all(isinstance(s, int) and (s >= 1 or s == -1) for s in sizes) or sizes.count(-1) > 1:
            raise InvalidRequest(f"{self._flags()}: each must be a positive integer or -1 (at most one -1), got {self._given()}")

    def sizes(self, device_count: int) -> dict[str, int]:
        """{axis: size} for `device_count` devices, -1 filled; their product must be the device count."""
        fixed = math.prod(s for s in dataclasses.astuple(self) if s != -1)
        sizes = {axis: getattr(self, axis) for axis in AXES}
        for axis, size in sizes.items():
            if size == -1:
                if device_count % fixed:
                    raise InvalidRequest(f"{self._flags()} = {self._given()}: the fixed sizes ({fixed}) do not divide "
                                         f"the {device_count} devices, so -1 cannot fill the rest")
                sizes[axis] = device_count // fixed
        if math.prod(sizes.values()) != device_count:
            raise InvalidRequest(f"{self._flags()} = {self._given()} make a mesh of {math.prod(sizes.values())} devices, "
                                 f"but this stage uses {device_count}; make their product {device_count} or set one to -1")
        return sizes

    def _given(self) -> str:
        return ", ".join(str(getattr(self, a)) for a in AXES)

    @staticmethod
    def _flags() -> str:
        return "/".join(FLAGS[a] for a in AXES)


def mesh_config(args: Any) -> MeshConfig | None:
    """The --ici-{data,fsdp,tensor}-parallelism flags; None when all are 1 (one device, nothing sharded)."""
    sizes = (args.ici_data_parallelism, args.ici_fsdp_parallelism, args.ici_tensor_parallelism)
    return None if sizes == (1, 1, 1) else MeshConfig(*sizes)


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device JAX sees)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.sizes(len(devices))
    return Mesh(np.array(devices).reshape([sizes[a] for a in AXES]), AXES)


def logical_axes(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """A parameter's logical axis names, from its Flax path (leaf name last) and shape."""
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:  # conv HWIO
        return (None, None, "embed", "conv_out")
    if leaf == "kernel" and len(shape) == 2:  # Dense (in, out)
        return ("embed", "mlp")
    if leaf == "embedding" and len(shape) == 2:  # (vocab or positions, dim)
        return ("vocab", "embed")
    return ("norm",) * len(shape)


def spec(mesh: Mesh, names: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    """Logical names → a PartitionSpec; a dimension its mesh axis does not divide stays whole."""
    axes = []
    for name, dim in zip(names, shape):
        axis = RULES[name] if name is not None else None
        axes.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*axes)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """The NamedSharding of each leaf of a params tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: NamedSharding(mesh, spec(mesh, logical_axes(_path_names(path), a.shape), a.shape)), params)


def place(mesh: Mesh) -> Any:
    """`place(path, array)` for `weights.convert`: each tensor straight onto its shards as it is read."""
    return lambda path, a: jax.device_put(a, NamedSharding(mesh, spec(mesh, logical_axes(path, a.shape), a.shape)))


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Every leaf put onto its shards."""
    return jax.tree_util.tree_map(jax.device_put, params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Split the leading (batch) dimension on `data`; replicated when `data` does not divide it."""
    return NamedSharding(mesh, spec(mesh, ("batch",) + (None,) * (len(shape) - 1), shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
