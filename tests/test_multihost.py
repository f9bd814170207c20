"""A stage over several processes: the flags, the dcn mesh, the side channel, and for real, a denoiser
served by 2 processes × 4 host devices on loopback (jax.distributed, gloo collectives)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from sdmesh.client import stages
from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.engine import distributed, sharding
from sdmesh.services.engine.sharding import MeshConfig
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.models.vae import VAEConfig

STEPS, BATCH = 3, 1
# fsdp crosses the processes (process 0's 4 devices, then process 1's): every UNet layer gathers its kernels
# over gloo. One image and --max-batch 1 keep it to one compiled program (~half the start-up of a batch of 2).
MESH_FLAGS = ["--ici-fsdp-parallelism", "2", "--ici-tensor-parallelism", "4"]


def flags(**given) -> SimpleNamespace:
    base = {
        "coordinator_address": None,
        "num_processes": None,
        "process_id": None,
        "ici_data_parallelism": 1,
        "ici_fsdp_parallelism": 1,
        "ici_tensor_parallelism": 1,
        "dcn_data_parallelism": 1,
    }
    return SimpleNamespace(**{**base, **given})


# --- which processes -----------------------------------------------------------------


def test_flags_name_the_process_group_before_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.process_group(flags(), env) == distributed.ProcessGroup("10.0.0.1:1234", 4, 3)
    given = flags(coordinator_address="127.0.0.1:99", num_processes=2, process_id=1)
    assert distributed.process_group(given, env) == distributed.ProcessGroup("127.0.0.1:99", 2, 1)


def test_no_coordinator_is_one_process():
    assert distributed.process_group(flags(), {}) is None


@pytest.mark.parametrize(
    "given, message",
    [
        (flags(num_processes=2, process_id=1), "need --coordinator-address"),
        (flags(coordinator_address="h:1", num_processes=2, process_id=2), "--process-id 2 must be from 0 to"),
    ],
)
def test_an_incomplete_group_names_the_flag_to_fix(given, message):
    with pytest.raises(InvalidRequest, match=message):
        distributed.process_group(given, {})


def test_several_processes_without_a_mesh_are_refused_before_starting():
    with pytest.raises(InvalidRequest, match="--dcn-data-parallelism"):
        distributed.initialize_from_args(flags(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0))


# --- the mesh across processes ------------------------------------------------------------


def test_dcn_multiplies_data_and_the_ici_sizes_describe_one_group():
    assert MeshConfig(1, 2, 2, dcn_data=2).sizes(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert MeshConfig(-1, 1, 1, dcn_data=2).sizes(8) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(InvalidRequest, match="each of the 2 --dcn-data-parallelism groups has 4"):
        MeshConfig(2, 2, 2, dcn_data=2).sizes(8)


def test_dcn_groups_are_whole_processes_along_data():
    # device ids interleaved on purpose: the order comes from the process, not the id
    devices = [SimpleNamespace(id=i, process_index=i % 2) for i in range(8)]
    ordered = sharding.dcn_order(devices, 2)
    assert [d.process_index for d in ordered] == [0, 0, 0, 0, 1, 1, 1, 1]
    rows = np.array(ordered).reshape(2, 2, 2)  # (data = dcn 2 × ici 1, fsdp 2, tensor 2)
    assert [{d.process_index for d in row.flat} for row in rows] == [{0}, {1}]
    with pytest.raises(InvalidRequest, match="must divide the processes into equal groups"):
        sharding.dcn_order([SimpleNamespace(id=i, process_index=i) for i in range(3)], 2)


def test_dcn_in_one_process_names_the_flag():
    with pytest.raises(InvalidRequest, match="--dcn-data-parallelism 2"):
        sharding.make_mesh(MeshConfig(dcn_data=2))


def test_mesh_config_reads_the_dcn_flag():
    assert sharding.mesh_config(flags(dcn_data_parallelism=2, ici_fsdp_parallelism=4)) == MeshConfig(
        1, 4, 1, dcn_data=2
    )
    assert sharding.mesh_config(flags()) is None


# --- the side channel --------------------------------------------------------------------


def test_frames_arrive_whole_and_a_closed_peer_is_an_error():
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 5000  # more than a socket buffer: the sender waits for the reader
    sender = threading.Thread(
        target=lambda: (
            distributed.send_frame(a, distributed.CALL, payload),
            distributed.send_frame(a, distributed.HEARTBEAT),
        )
    )
    sender.start()
    assert distributed.recv_frame(b) == (distributed.CALL, payload)
    assert distributed.recv_frame(b) == (distributed.HEARTBEAT, b"")
    sender.join()
    a.close()
    with pytest.raises(ConnectionError):
        distributed.recv_frame(b)
    b.close()


# --- for real: `sdmesh serve denoiser` over 2 processes × 4 host devices ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving_address(log: Path, processes: list[subprocess.Popen], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"SERVING on (\S+)", log.read_text(errors="replace"))
        if match:
            return match.group(1)
        for p in processes:
            assert p.poll() is None, f"a stage process exited with {p.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"process 0 never said SERVING:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def two_process_stage(tiny_checkpoints, tmp_path_factory):
    """(address, [process 0, process 1], inputs, the one-process latents for them, log of process 0)."""
    folder = tiny_checkpoints["sd2"]
    side = 8 * VAEConfig.from_json(checkpoint.read_config(folder, "vae")).scale_factor  # the UNet's 8×8 latents
    logs = tmp_path_factory.mktemp("multihost")
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    processes = []
    for index in range(2):
        command = [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "serve",
            "denoiser",
            "--model",
            str(folder),
            "--port",
            "0",
            "--shapes",
            f"{BATCH}x{side}",
            "--max-batch",
            str(BATCH),
            "--chunk-steps",
            "1",
            *MESH_FLAGS,
            "--coordinator-address",
            coordinator,
            "--num-processes",
            "2",
            "--process-id",
            str(index),
        ]
        with open(logs / f"process{index}.log", "w") as log:
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        # the one-process result, computed here while the two processes load and compile
        from sdmesh.services.engine.stages import DenoiserStage

        stage = DenoiserStage.load(folder)
        rng = np.random.default_rng(0)
        cond = rng.standard_normal((BATCH, 77, stage.unet.config.context_dim), np.float32)
        uncond = rng.standard_normal(cond.shape, np.float32)
        noise = np.asarray(stage.noise(0, (BATCH, 8, 8, stage.latent_channels)))
        final = None
        for _, latents, _ in stage.run(noise, cond, uncond, steps=STEPS, guidance_scale=7.5, chunk=1):
            final = latents if latents is not None else final
        inputs = {"cond": cond, "uncond": uncond, "latents": noise.transpose(0, 3, 1, 2)}  # NHWC → NCHW on the wire
        address = _serving_address(logs / "process0.log", processes, timeout=300)
        yield address, processes, inputs, np.asarray(final).transpose(0, 3, 1, 2), logs / "process0.log"
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.processes
def test_a_denoiser_over_two_processes_matches_one_process_then_outlives_its_follower_and_stops_on_sigterm(
    two_process_stage,
):
    """One test, in three steps that must come in this order: the stage serves, loses process 1, then is stopped.
    (Starting the two processes takes minutes here, so the steps share them instead of each starting its own.)"""
    a_denoiser_over_two_processes_matches_one_process(two_process_stage)
    a_dead_follower_makes_process_0_not_serving_instead_of_hanging(two_process_stage)
    process_0_stops_cleanly_on_sigterm_after_losing_its_follower(two_process_stage)


def a_denoiser_over_two_processes_matches_one_process(two_process_stage):
    address, _, inputs, expected, _ = two_process_stage
    client = stages.DenoiserClient(address)
    info = client.model_info(timeout=10)
    assert len(set(info.devices)) == 8 and dict(info.mesh) == {"data": 1, "fsdp": 2, "tensor": 4}
    latents = client.denoise(
        inputs["cond"], inputs["uncond"], latents=inputs["latents"], steps=STEPS, guidance_scale=7.5, timeout=60
    ).result()
    # fp32 sums in another order across 8 devices: ~1e-5 apart, as the one-process meshes in test_sharding
    np.testing.assert_allclose(latents, expected, atol=1e-4)


def a_dead_follower_makes_process_0_not_serving_instead_of_hanging(two_process_stage):
    address, (leader, follower), inputs, _, log = two_process_stage
    assert follower.poll() is None and leader.poll() is None
    client = stages.DenoiserClient(address)
    stream = iter(
        client.denoise(
            inputs["cond"], inputs["uncond"], latents=inputs["latents"], steps=200, guidance_scale=7.5, timeout=120
        )
    )
    next(stream)  # the first chunk is done: the call is in flight
    follower.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 30, "the call in flight should end once the follower's death is seen"
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # a gateway retries it on another replica
    assert "follower process 1 is gone" in failed.value.details()
    assert stages.health_status(address, timeout=5) == "NOT_SERVING"
    # a later call fails at once instead of waiting for a collective that cannot finish
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        client.denoise(
            inputs["cond"], inputs["uncond"], latents=inputs["latents"], steps=STEPS, guidance_scale=7.5, timeout=30
        ).result()
    assert time.monotonic() - t0 < 5 and "follower process 1 is gone" in refused.value.details()
    assert leader.poll() is None, f"process 0 should outlive its follower:\n{log.read_text()[-3000:]}"


def process_0_stops_cleanly_on_sigterm_after_losing_its_follower(two_process_stage):
    _, (leader, follower), _, _, log = two_process_stage
    assert follower.poll() is not None  # killed by the step before
    leader.send_signal(signal.SIGTERM)
    assert leader.wait(timeout=30) == 0, log.read_text()[-3000:]
