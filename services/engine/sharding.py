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

from sdmesh.services.inputs.errors import InvalidRequest

AXES = ("data", "fsdp", "tensor")
FLAGS = {"data": "--ici-data-parallelism", "fsdp": "--ici-fsdp-parallelism", "tensor": "--ici-tensor-parallelism"}
DCN_FLAG = "--dcn-data-parallelism"

# Logical axis → mesh axis (None: replicated). The one place that decides what is split where.
RULES: dict[str, str | None] = {
    "batch": "data",  # activations: each data-parallel group runs its own images
    "embed": "fsdp",  # a kernel's input features: split for memory, gathered before use
    "mlp": "tensor",  # a Dense kernel's output features
    "conv_out": "tensor",  # a convolution's output channels
    "vocab": None,  # token and position tables: looked up by index, kept whole
    "norm": None,  # biases and norm scales: tiny, kept whole on every device
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices along each mesh axis; -1 (on at most one axis) fills with the devices left.

    dcn_data > 1 spans `data` across groups of processes (hosts): the mesh's data axis is
    dcn_data × data, groups outermost, so only the batch split crosses the slow network and
    data/fsdp/tensor describe the devices of one group.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1

    def __post_init__(self) -> None:
        sizes = self._ici()
        if not all(isinstance(s, int) and (s >= 1 or s == -1) for s in sizes) or sizes.count(-1) > 1:
            raise InvalidRequest(
                f"{self._flags()}: each must be a positive integer or -1 (at most one -1), got {self._given()}"
            )
        if not isinstance(self.dcn_data, int) or self.dcn_data < 1:
            raise InvalidRequest(f"{DCN_FLAG} must be a positive integer, got {self.dcn_data!r}")

    def sizes(self, device_count: int) -> dict[str, int]:
        """{axis: size} for `device_count` devices, -1 filled; data includes dcn_data.

        The data/fsdp/tensor product must be the devices of one dcn group (all of them when dcn_data is 1).
        """
        if device_count % self.dcn_data:
            raise InvalidRequest(f"{DCN_FLAG} {self.dcn_data} does not divide the {device_count} devices")
        group = device_count // self.dcn_data
        where = (
            f"this stage uses {group}"
            if self.dcn_data == 1
            else f"each of the {self.dcn_data} {DCN_FLAG} groups has {group}"
        )
        fixed = math.prod(s for s in self._ici() if s != -1)
        sizes = {axis: getattr(self, axis) for axis in AXES}
        for axis, size in sizes.items():
            if size == -1:
                if group % fixed:
                    raise InvalidRequest(
                        f"{self._flags()} = {self._given()}: the fixed sizes ({fixed}) do not divide "
                        f"the {group} devices, so -1 cannot fill the rest"
                    )
                sizes[axis] = group // fixed
        if math.prod(sizes.values()) != group:
            raise InvalidRequest(
                f"{self._flags()} = {self._given()} make a mesh of {math.prod(sizes.values())} devices, "
                f"but {where}; make their product {group} or set one to -1"
            )
        sizes["data"] *= self.dcn_data
        return sizes

    def _ici(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def _given(self) -> str:
        return ", ".join(str(getattr(self, a)) for a in AXES)

    @staticmethod
    def _flags() -> str:
        return "/".join(FLAGS[a] for a in AXES)


def mesh_config(args: Any) -> MeshConfig | None:
    """The --ici-{data,fsdp,tensor}-parallelism and --dcn-data-parallelism flags; None when all are 1
    (one device, nothing sharded)."""
    sizes = (args.ici_data_parallelism, args.ici_fsdp_parallelism, args.ici_tensor_parallelism)
    dcn = getattr(args, "dcn_data_parallelism", 1)  # absent from callers that build args by hand
    return None if sizes == (1, 1, 1) and dcn == 1 else MeshConfig(*sizes, dcn_data=dcn)


def global_batch(per_device: float, config: MeshConfig | None, device_count: int) -> int:
    """--per-device-batch-size × the data-parallel devices, at least 1. Below one per device the batch is
    smaller than the data axis and is replicated along it (`batch_sharding`), as maxdiffusion does."""
    if not per_device > 0:
        raise InvalidRequest(f"--per-device-batch-size must be positive, got {per_device}")
    data = 1 if config is None else config.sizes(device_count)["data"]
    return max(1, math.ceil(per_device * data - 1e-9))


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device JAX sees, in every process)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.sizes(len(devices))
    if config.dcn_data > 1:
        devices = dcn_order(devices, config.dcn_data)
    return Mesh(np.array(devices).reshape([sizes[a] for a in AXES]), AXES)


def dcn_order(devices: Sequence[Any], groups: int) -> list[Any]:
    """Devices process by process, so that reshaping to (groups × data, fsdp, tensor) puts whole processes
    in each group along data. Raises InvalidRequest unless `groups` divides the processes evenly."""
    by_process: dict[int, list[Any]] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    counts = {len(ds) for ds in by_process.values()}
    if len(by_process) % groups or len(counts) != 1:
        raise InvalidRequest(
            f"{DCN_FLAG} {groups} must divide the processes into equal groups, but the stage has "
            f"{len(by_process)} process(es) with {sorted(counts)} devices each; start it on a multiple of "
            f"{groups} processes (--num-processes) or lower {DCN_FLAG}"
        )
    return [d for ds in by_process.values() for d in ds]


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
        lambda path, a: NamedSharding(mesh, spec(mesh, logical_axes(_path_names(path), a.shape), a.shape)), params
    )


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
