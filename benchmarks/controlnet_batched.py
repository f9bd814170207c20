"""What per-slot ControlNets cost: a denoise batch of 4 where some or all slots carry a ControlNet, vs none.

    python benchmarks/controlnet_batched.py --model models/full-sd2 --resolution 128 --steps 4 \\
        --json benchmarks/results/controlnet_batched_cpu.json

The full-size SD 2 architecture (random weights: time does not depend on them) and full-size ControlNets made
from its UNet (diffusers' `ControlNetModel.from_unet`, the control_v11 conditioning embedding: 16, 32, 96, 256),
a batch of 4 images with guidance (8 UNet rows), DDIM. sdmesh: `DenoiserStage` running the batch with each
slot's controls (its own map and scale), vs the same batch without any (the program without ControlNets).
Reference, in the same run: diffusers' UNet alone vs ControlNet + UNet (the residuals passed in, as
StableDiffusionControlNetPipeline calls them), per UNet evaluation on the same 8 rows; diffusers cannot give
each image of a batch its own ControlNet or map. Medians of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EMBEDDING = (16, 32, 96, 256)  # lllyasviel's control_v11 ControlNets': the map at 8× the latents


def time_ours(stage, facts, jobs, repeat: int) -> list[float]:
    def run() -> float:
        slots = [s for j in jobs for s in stage.job_slots(j, facts)]
        t0 = time.perf_counter()
        for _ in stage.run_slots(slots):
            pass
        return time.perf_counter() - t0

    run()  # compiles
    return [run() for _ in range(repeat)]


def time_diffusers(unet, controlnets, sample, t, context, image, repeat: int) -> list[float]:
    import torch

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            residuals = {}
            for net in controlnets:
                down, mid = net(sample, t, context, controlnet_cond=image, conditioning_scale=0.8, return_dict=False)
                if residuals:
                    down = [a + b for a, b in zip(residuals["down_block_additional_residuals"], down, strict=True)]
                    mid = residuals["mid_block_additional_residual"] + mid
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            unet(sample, t, encoder_hidden_states=context, **residuals)
        return time.perf_counter() - t0

    run()
    return [run() for _ in range(repeat)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/full-sd2")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not Path(args.model).exists():
        subprocess.run(
            [sys.executable, "-m", "sdmesh.client.cli", "make-checkpoint", "full-sd2", args.model], check=True
        )
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdmesh.services.dev import reference
    from sdmesh.services.engine.stages import DenoiserStage
    from sdmesh.services.inputs.contract import ControlInput, DenoiseJob

    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="controlnets-"))
    nets = {
        name: reference.make_tiny_controlnet(
            folder / name, Path(args.model), seed=k, conditioning_embedding_out_channels=EMBEDDING
        )
        for k, name in enumerate(("edges", "depth"))
    }
    stage = DenoiserStage.load(Path(args.model))
    for name, path in nets.items():
        stage.use_controlnet(name, path)
    facts = stage.facts(vae_scale_factor=8, max_length=77)
    width = stage.unet.config.context_dim
    rng = np.random.default_rng(0)
    size = args.resolution

    def control(name: str, scale: float) -> ControlInput:
        return ControlInput(name, rng.random((1, size, size, 3), dtype=np.float32), scale)

    def job(seed: int, controls=()) -> DenoiseJob:
        cond = rng.standard_normal((1, 77, width), dtype=np.float32)
        return DenoiseJob(cond, cond * 0, None, seed, args.steps, 7.5, 0.0, 0.0, size, size, sampler="ddim",
                          controls=tuple(controls))  # fmt: skip

    cases = {
        "none": [job(k) for k in range(4)],
        "one ControlNet on one slot, three plain": [job(0, [control("edges", 0.8)])] + [job(k) for k in range(1, 4)],
        "one ControlNet, four maps and scales": [job(k, [control("edges", 0.5 + 0.2 * k)]) for k in range(4)],
        "two ControlNets across the batch": [job(k, [control(("edges", "depth")[k % 2], 0.8)]) for k in range(4)],
    }
    ours = {}
    for name, jobs in cases.items():
        runs = time_ours(stage, facts, jobs, args.repeat)
        ours[name] = {"runs_s": runs, "per_step_s": statistics.median(runs) / args.steps}
        print(f"sdmesh {name:>40}: {ours[name]['per_step_s']:.3f} s/step", file=sys.stderr)
    del stage

    unet = UNet2DConditionModel.from_pretrained(Path(args.model) / "unet").eval()
    controlnet = ControlNetModel.from_pretrained(nets["edges"]).eval()
    f = size // 8
    sample = torch.randn(8, unet.config.in_channels, f, f)
    context = torch.randn(8, 77, width)
    image = torch.rand(8, 3, size, size)
    t = torch.tensor(500)
    reference_s = {
        "none": statistics.median(time_diffusers(unet, [], sample, t, context, image, args.repeat)),
        "one ControlNet": statistics.median(time_diffusers(unet, [controlnet], sample, t, context, image, args.repeat)),
    }
    for name, seconds in reference_s.items():
        print(f"diffusers {name:>37}: {seconds:.3f} s/step", file=sys.stderr)

    base = ours["none"]["per_step_s"]
    report = {
        "model": args.model,
        "resolution": args.resolution,
        "steps": args.steps,
        "images": 4,
        "repeat": args.repeat,
        "conditioning_embedding_out_channels": list(EMBEDDING),
        "machine": platform.platform(),
        "cpu": platform.processor() or _cpu_name(),
        "cpus": os.cpu_count(),
        "sdmesh_per_step_s": {k: v["per_step_s"] for k, v in ours.items()},
        "sdmesh_ratio_vs_none": {k: v["per_step_s"] / base for k, v in ours.items()},
        "diffusers_per_step_s": reference_s,
        "diffusers_ratio_vs_none": {k: v / reference_s["none"] for k, v in reference_s.items()},
        "sdmesh_runs_s": {k: v["runs_s"] for k, v in ours.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
