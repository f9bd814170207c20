"""sdmesh vs diffusers' PyTorch StableDiffusionPipeline (DDIM) on the same full-size SD2 weights, same run.

    python benchmarks/bench_vs_diffusers.py --resolution 256 --steps 2 --repeat 3 --json benchmarks/results/cpu.json

Makes the full-size SD 2.x checkpoint with random weights (models/full-sd2, ~5 GB) if it is absent.
Both pipelines get the same prompt, steps, guidance and size; each compiles/warms up once, then
--repeat timed runs; we report medians and the ratio sdmesh / diffusers (lower is better).
Per-stage times for diffusers come from timing its modules' calls inside the same pipeline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"


def diffusers_timing(
    folder: Path, height: int, width: int, steps: int, repeat: int, guidance: float, dtype: str
) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    stage_times: dict[str, list[float]] = {"text_encoder": [], "unet": [], "vae_decode": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if device == "cuda":
                torch.cuda.synchronize()
            stage_times[name].append(time.perf_counter() - t0)
            return out

        return wrapper

    pipe.text_encoder.forward = timed("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = timed("unet", pipe.unet.forward)
    pipe.vae.decode = timed("vae_decode", pipe.vae.decode)

    def run() -> float:
        for v in stage_times.values():
            v.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(
                PROMPT,
                num_inference_steps=steps,
                height=height,
                width=width,
                guidance_scale=guidance,
                generator=torch.Generator(device).manual_seed(0),
                output_type="np",
            )
        return time.perf_counter() - t0

    first = run()
    totals, te, unet, vae = [], [], [], []
    for _ in range(repeat):
        totals.append(run())
        te.append(sum(stage_times["text_encoder"]))
        unet.append(statistics.median(stage_times["unet"]))
        vae.append(sum(stage_times["vae_decode"]))
    return {
        "first_run_seconds": first,
        "seconds_per_image": statistics.median(totals),
        "seconds_per_image_all": totals,
        "text_encoder_seconds": statistics.median(te),
        "unet_step_seconds": statistics.median(unet),
        "vae_decode_seconds": statistics.median(vae),
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def sdmesh_timing(
    folder: Path, height: int, width: int, steps: int, repeat: int, guidance: float, dtype: str, precision: str
) -> dict:
    import jax

    from sdmesh.services.dev.benchmark import time_pipeline
    from sdmesh.services.engine.stages import RuntimeOptions
    from sdmesh.services.inputs.contract import GenerationRequest
    from sdmesh.services.pipeline import StableDiffusion

    options = RuntimeOptions(weights_dtype=dtype, activations_dtype=dtype, precision=precision)
    t0 = time.perf_counter()
    pipe = StableDiffusion.load(str(folder), options=options)
    load = time.perf_counter() - t0
    request = GenerationRequest(prompt=PROMPT, steps=steps, guidance_scale=guidance, height=height, width=width, seed=0)
    report = time_pipeline(pipe, request, repeat)
    report.update(load_seconds=load, jax=jax.__version__, devices=[str(d) for d in jax.devices()])
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/full-sd2"))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--precision", default="default")
    p.add_argument(
        "--only", choices=("sdmesh", "diffusers"), help="time one side (e.g. where the other is not installed)"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    if not (args.model / "model_index.json").is_file():
        from sdmesh.services.dev import reference

        print(f"building the full-size SD2 checkpoint in {args.model} (random weights) ...", file=sys.stderr)
        reference.build(args.model, reference.FULL_SD2, seed=0)

    common = (args.model, args.resolution, args.resolution, args.steps, args.repeat, args.guidance_scale, args.dtype)
    report: dict = {
        "what": "seconds per image, median over repeats, after one warm-up/compile run; CFG batch of 2 UNet rows",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "resolution": args.resolution,
        "steps": args.steps,
        "repeat": args.repeat,
        "dtype": args.dtype,
        "guidance_scale": args.guidance_scale,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.only != "diffusers":
        report["sdmesh"] = sdmesh_timing(*common, args.precision)
        print(json.dumps(report["sdmesh"], indent=2), file=sys.stderr)
    if args.only != "sdmesh":
        with contextlib.suppress(KeyboardInterrupt):
            report["diffusers"] = diffusers_timing(*common)
            print(json.dumps(report["diffusers"], indent=2), file=sys.stderr)
    if "sdmesh" in report and "diffusers" in report:
        ours, ref = report["sdmesh"], report["diffusers"]
        report["ratio"] = {
            k: ours[k] / ref[k]
            for k in ("seconds_per_image", "text_encoder_seconds", "unet_step_seconds", "vae_decode_seconds")
        }
    print(json.dumps({k: report[k] for k in ("ratio",) if k in report}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
