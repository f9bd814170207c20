"""Meshes and parameter shardings: the rules on one device here, the stages on 8 host devices in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdmesh.services.dev import reference
from sdmesh.services.engine import sharding
from sdmesh.services.engine.sharding import MeshConfig
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.models import text_encoder as te
from sdmesh.services.models import unet as un
from sdmesh.services.models import vae as va

MESHES = ("8,1,1", "2,2,2", "1,4,2", "1,1,8")


# --- the rules, on the one device this process has ---------------------------------


@pytest.mark.parametrize(
    "path, shape, names",
    [
        (("conv_in", "kernel"), (3, 3, 4, 320), (None, None, "embed", "conv_out")),
        (("attn1", "to_q", "kernel"), (320, 320), ("embed", "mlp")),
        (("token_embedding", "embedding"), (49408, 1024), ("vocab", "embed")),
        (("conv_in", "bias"), (320,), ("norm",)),
        (("norm1", "scale"), (320,), ("norm",)),
    ],
)
def test_each_parameter_kind_gets_its_logical_axes(path, shape, names):
    assert sharding.logical_axes(path, shape) == names


def test_minus_one_fills_with_the_devices_left():
    assert MeshConfig(2, -1, 2).sizes(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert MeshConfig(-1, 1, 1).sizes(8) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "config, devices",
    [
        (MeshConfig(3, 1, 1), 8),  # product ≠ device count
        (MeshConfig(2, 2, 1), 8),
        (MeshConfig(3, -1, 1), 8),  # fixed sizes do not divide the devices
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_names_the_flags(config, devices):
    with pytest.raises(InvalidRequest, match="--ici-data-parallelism/--ici-fsdp-parallelism/--ici-tensor-parallelism"):
        config.sizes(devices)


@pytest.mark.parametrize("sizes", [(0, 1, 1), (-1, -1, 1), (1, -2, 1)])
def test_bad_axis_sizes_are_refused(sizes):
    with pytest.raises(InvalidRequest, match="positive integer or -1"):
        MeshConfig(*sizes)


def test_an_undivisible_dimension_is_replicated():
    mesh = sharding.make_mesh(MeshConfig())
    # a 1-device mesh divides everything; the rule itself is checked with a fake 8-wide tensor axis
    fake = SimpleNamespace(shape={"data": 8, "fsdp": 2, "tensor": 8})  # spec reads only the axis sizes
    assert sharding.spec(fake, (None, None, "embed", "conv_out"), (3, 3, 320, 4)) == P(None, None, "fsdp", None)
    assert sharding.spec(fake, ("batch", None), (6, 77)) == P(None, None)
    assert sharding.batch_sharding(mesh, (3, 8, 8, 4)).spec == P("data", None, None, None)


@pytest.mark.parametrize(
    "module, config",
    [
        (un, un.UNetConfig.from_json(reference.FULL_SD2["unet"])),
        (va, va.VAEConfig.from_json(reference.FULL_SD2["vae"])),
        (te, te.TextEncoderConfig.from_json(reference.FULL_SD2["text_encoder"])),
    ],
)
def test_every_full_size_parameter_has_a_sharding(module, config):
    shapes = module.init_shapes(config)
    shardings = sharding.param_shardings(shapes, sharding.make_mesh(MeshConfig()))
    assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(shapes)
    for s, a in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(shapes)):
        assert len(s.spec) == len(a.shape)


def test_shard_params_places_every_leaf_on_the_mesh():
    mesh = sharding.make_mesh(MeshConfig())
    params = {"conv": {"kernel": np.ones((3, 3, 4, 8), np.float32), "bias": np.zeros(8, np.float32)}}
    placed = sharding.shard_params(params, mesh)
    assert placed["conv"]["kernel"].sharding == sharding.NamedSharding(mesh, P(None, None, "fsdp", "tensor"))
    np.testing.assert_array_equal(placed["conv"]["bias"], params["conv"]["bias"])


# --- the stages on 8 host devices -------------------------------------------------


@pytest.fixture(scope="module")
def on_meshes(tiny_checkpoints, tmp_path_factory) -> dict:
    """The denoise loop and VAE decode on 1 device and on each mesh of 8 host devices (one subprocess)."""
    controlnet = reference.make_tiny_controlnet(tmp_path_factory.mktemp("controlnet"), tiny_checkpoints["sd2"])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).with_name("sharded_stages.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_checkpoints["sd2"]), str(controlnet), *MESHES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["devices"] == 8
    return out


@pytest.mark.processes
@pytest.mark.parametrize("mesh", MESHES)
def test_the_result_does_not_depend_on_the_mesh(on_meshes, mesh):
    single, sharded = on_meshes["single"], on_meshes[mesh]
    # fp32 sums in another order: latents agree to ~1e-5; images to one step of 8-bit rounding
    np.testing.assert_allclose(sharded["latents"], single["latents"], atol=1e-4)
    # the decode alone; text → image through all three stages; and with a ControlNet
    for images in ("images", "generated", "controlled"):
        diff = np.abs(np.asarray(sharded[images], np.int32) - np.asarray(single[images], np.int32))
        assert diff.max() <= 1, f"{images} differ by up to {diff.max()}/255"
    assert sharded["latents_spec"] == str(P("data", None, None, None))  # the batch stays split between chunks


@pytest.mark.processes
def test_parameters_are_really_split(on_meshes):
    # conv (3, 3, 32, 32): input channels on fsdp, output channels on tensor; Dense (64, 64) likewise
    assert on_meshes["8,1,1"]["conv_shard"] == [3, 3, 32, 32]
    assert on_meshes["2,2,2"]["conv_shard"] == [3, 3, 16, 16]
    assert on_meshes["1,4,2"]["conv_shard"] == [3, 3, 8, 16]
    assert on_meshes["1,1,8"]["conv_shard"] == [3, 3, 32, 4]
    assert on_meshes["1,4,2"]["dense_shard"] == [16, 32]
    assert on_meshes["1,1,8"]["dense_shard"] == [64, 8]


@pytest.mark.processes
@pytest.mark.parametrize("stage", ["unet_bytes", "vae_bytes", "controlnet_bytes"])
def test_per_device_parameter_bytes_fall_with_fsdp_times_tensor(on_meshes, stage):
    full = on_meshes["single"][stage]
    assert on_meshes["8,1,1"][stage] == full  # data parallelism replicates the parameters
    for mesh, split in (("2,2,2", 4), ("1,4,2", 8), ("1,1,8", 8)):
        # a few small tensors (biases, norms, 4-channel convs) stay whole, hence the 25% allowance
        assert on_meshes[mesh][stage] < 1.25 * full / split, mesh


@pytest.mark.parametrize(
    "per_device,config,devices,expected",
    [
        (2, None, 8, 2),  # no mesh: one data device
        (0.5, sharding.MeshConfig(4, 1, 1), 4, 2),
        (1.5, sharding.MeshConfig(2, 2, 1), 4, 3),
        (0.25, sharding.MeshConfig(2, 1, 1), 2, 1),  # below one image: replicated along data
        (1, sharding.MeshConfig(-1, 2, 1), 8, 4),
    ],
)
def test_per_device_batch_size_scales_with_the_data_axis(per_device, config, devices, expected):
    assert sharding.global_batch(per_device, config, devices) == expected


def test_per_device_batch_size_must_be_positive():
    with pytest.raises(InvalidRequest, match="per-device-batch-size"):
        sharding.global_batch(0, None, 1)
