"""What per-slot LoRAs cost: a denoise batch with 4 different LoRAs (or 1 LoRA and 3 plain slots) vs none.

    python benchmarks/lora_batched.py --model models/full-sd2 --resolution 128 --steps 4 \\
        --json benchmarks/results/lora_batched_cpu.json

The full-size SD 2 architecture (random weights: time does not depend on them), a batch of 4 images with
guidance (the UNet runs 8 rows), DDIM. sdmesh: `DenoiserStage` running the batch with each slot's LoRAs
gathered from the bank (random rank-16 LoRAs on every attention projection, kohya layout), vs the same
batch without LoRAs (the program without the bank). Reference, in the same run: diffusers' UNet with one
peft LoRA of the same shape active (unmerged, as `load_lora_weights` + `set_adapters` leaves it) vs
without, per UNet evaluation on the same 8 rows. diffusers cannot give each image of a batch its own LoRA;
the ratio LoRA / none is what each side pays for adapters. Medians of --repeat runs after one warm-up.
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

TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
RANK = 16


def write_lora(path: Path, kernels: dict[str, tuple[int, ...]], seed: int) -> None:
    """A random kohya-layout LoRA on every attention projection of the UNet."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, (fan_in, fan_out) in kernels.items():
        if layer.rsplit("/", 1)[-1] not in TARGETS:
            continue
        name = "lora_unet_" + layer.replace("/", "_")
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((RANK, fan_in), dtype=np.float32) / fan_in**0.5
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal((fan_out, RANK), dtype=np.float32) * 0.01
        tensors[f"{name}.alpha"] = np.asarray(RANK, np.float32)
    save_file(tensors, str(path))


def time_ours(stage, facts, jobs, repeat: int) -> list[float]:
    def run() -> float:
        slots = [s for j in jobs for s in stage.job_slots(j, facts)]
        t0 = time.perf_counter()
        for _ in stage.run_slots(slots):
            pass
        return time.perf_counter() - t0

    run()  # compiles
    return [run() for _ in range(repeat)]


def time_diffusers(unet, sample, t, context, repeat: int) -> list[float]:
    import torch

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=context)
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
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sdmesh.services.engine import lora_bank
    from sdmesh.services.engine.stages import DenoiserStage
    from sdmesh.services.inputs.contract import DenoiseJob

    torch.set_num_threads(os.cpu_count() or 1)
    stage = DenoiserStage.load(Path(args.model))
    kernels = lora_bank.kernel_shapes(stage.params)
    folder = Path(tempfile.mkdtemp(prefix="loras-"))
    for k in range(4):
        write_lora(folder / f"style{k}.safetensors", {p: s for p, s in kernels.items() if len(s) == 2}, k)
    stage.use_loras(folder, max_adapters=4)
    facts = stage.facts(vae_scale_factor=8, max_length=77)
    width = stage.unet.config.context_dim
    rng = np.random.default_rng(0)

    def job(seed: int, loras=()) -> DenoiseJob:
        cond = rng.standard_normal((1, 77, width), dtype=np.float32)
        size = args.resolution
        return DenoiseJob(cond, cond * 0, None, seed, args.steps, 7.5, 0.0, 0.0, size, size, sampler="ddim",
                          loras=tuple(loras))  # fmt: skip

    cases = {
        "none": [job(k) for k in range(4)],
        "one LoRA, three plain": [job(0, [("style0", 0.8)])] + [job(k) for k in range(1, 4)],
        "four different LoRAs": [job(k, [(f"style{k}", 0.8)]) for k in range(4)],
    }
    evaluations = args.steps
    ours = {}
    for name, jobs in cases.items():
        runs = time_ours(stage, facts, jobs, args.repeat)
        ours[name] = {"runs_s": runs, "per_step_s": statistics.median(runs) / evaluations}
        print(f"sdmesh {name:>24}: {ours[name]['per_step_s']:.3f} s/step", file=sys.stderr)

    unet = UNet2DConditionModel.from_pretrained(Path(args.model) / "unet").eval()
    f = args.resolution // 8
    sample = torch.randn(8, unet.config.in_channels, f, f)
    context = torch.randn(8, 77, width)
    t = torch.tensor(500)
    reference = {"none": statistics.median(time_diffusers(unet, sample, t, context, args.repeat))}
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=attention, init_lora_weights=False))
    reference["one LoRA"] = statistics.median(time_diffusers(unet, sample, t, context, args.repeat))
    for name, seconds in reference.items():
        print(f"diffusers {name:>21}: {seconds:.3f} s/step", file=sys.stderr)

    base = ours["none"]["per_step_s"]
    report = {
        "model": args.model,
        "resolution": args.resolution,
        "steps": args.steps,
        "rank": RANK,
        "images": 4,
        "repeat": args.repeat,
        "machine": platform.platform(),
        "cpu": platform.processor() or _cpu_name(),
        "cpus": os.cpu_count(),
        "sdmesh_per_step_s": {k: v["per_step_s"] for k, v in ours.items()},
        "sdmesh_ratio_vs_none": {k: v["per_step_s"] / base for k, v in ours.items()},
        "diffusers_per_step_s": reference,
        "diffusers_ratio_vs_none": {k: v / reference["none"] for k, v in reference.items()},
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
