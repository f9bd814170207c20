"""Run the stages on several meshes and print what test_sharding checks, as JSON.

JAX fixes its device count at first use, so this runs in its own process:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_stages.py CHECKPOINT CONTROLNET 8,1,1 ...
The 1-device result comes from the same process (no mesh: the default device).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from sdmesh.services.engine.sharding import MeshConfig
from sdmesh.services.engine.stages import RuntimeOptions
from sdmesh.services.inputs.contract import ControlChoice, GenerationRequest
from sdmesh.services.pipeline import StableDiffusion

BATCH, STEPS = 8, 3  # 8 images so every data-axis size here divides the batch
CONV = ("down_blocks_0", "resnets_0", "conv1", "kernel")  # (3, 3, 32, 32)
DENSE = ("down_blocks_1", "attentions_0", "proj_in", "kernel")  # (64, 64)


def leaf(params, path):
    for name in path:
        params = params[name]
    return params


def per_device_bytes(params) -> int:
    """The most parameter bytes any one device holds."""
    totals: dict[str, int] = {}
    for a in jax.tree_util.tree_leaves(params):
        for shard in a.addressable_shards:
            totals[str(shard.device)] = totals.get(str(shard.device), 0) + shard.data.nbytes
    return max(totals.values())


def run(folder: Path, controlnet: Path, mesh: MeshConfig | None) -> dict:
    pipe = StableDiffusion.load(str(folder), controlnets=[("edges", controlnet)], options=RuntimeOptions(mesh=mesh))
    denoiser, decoder = pipe.denoiser, pipe.decoder
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((BATCH, 77, denoiser.unet.config.context_dim), np.float32)
    uncond = rng.standard_normal(cond.shape, np.float32)
    noise = denoiser.noise(0, (BATCH, 8, 8, denoiser.latent_channels))
    *_, (_, latents, _) = denoiser.run(noise, cond, uncond, steps=STEPS, guidance_scale=7.5, eta=0.5, seed=1)
    # between chunks the running batch's state stays on the mesh, split by batch
    batch = denoiser.new_batch([BATCH])
    batch.join(denoiser.slots(noise, cond, uncond, steps=STEPS, guidance_scale=7.5, eta=0.5, seed=1))
    batch.run_chunk(1)
    images, _ = decoder.decode(latents)
    # the three stages chained, each handing its sharded output to the next (same shapes: no new denoise/decode compile)
    request = GenerationRequest(
        prompt=["a cat", "a dog"], num_images=BATCH // 2, steps=STEPS, eta=0.5, seed=2, height=16, width=16
    )
    generated = pipe.generate(request).images
    # and with a ControlNet, its parameters sharded by the UNet's rules
    edges = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    controlled = pipe.generate(dataclasses.replace(request, controls=[ControlChoice("edges", edges, 0.7)])).images
    return {
        "latents": np.asarray(latents).tolist(),
        "images": images.tolist(),
        "generated": generated.tolist(),
        "controlled": controlled.tolist(),
        "controlnet_bytes": per_device_bytes(denoiser.controlnets["edges"][1]),
        "latents_spec": str(batch.device_state.x.sharding.spec) if mesh else None,
        "conv_shard": list(leaf(denoiser.params, CONV).addressable_shards[0].data.shape),
        "dense_shard": list(leaf(denoiser.params, DENSE).addressable_shards[0].data.shape),
        "unet_bytes": per_device_bytes(denoiser.params),
        "vae_bytes": per_device_bytes(decoder.params),
    }


def main(folder: str, controlnet: str, *meshes: str) -> None:
    out = {"devices": len(jax.devices()), "single": run(Path(folder), Path(controlnet), None)}
    for shape in meshes:
        data, fsdp, tensor = (int(s) for s in shape.split(","))
        out[shape] = run(Path(folder), Path(controlnet), MeshConfig(data, fsdp, tensor))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
