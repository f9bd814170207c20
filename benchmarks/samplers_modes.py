"""Time per image: DPM-Solver++ at 20 steps vs DDIM at 50, and what each image mode adds to text-to-image.

    python benchmarks/samplers_modes.py --model models/full-sd2 --resolution 128 \\
        --json benchmarks/results/samplers_modes_cpu.json

One in-process pipeline on the full-size SD 2 architecture (random weights: the time does not depend on
them). Each case compiles once, then runs --repeat times; we report the median seconds per image and
the split by stage (encode, encode_image, denoise, decode). Modes run at strength 1 so they take the
same number of steps as text-to-image and the difference is the mode's own cost (VAE encode of the
init and masked images, the blend, the wider UNet input).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/full-sd2")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not Path(args.model).exists():
        subprocess.run(
            [sys.executable, "-m", "sdmesh.client.cli", "make-checkpoint", "full-sd2", args.model], check=True
        )

    from sdmesh.services.inputs.contract import GenerationRequest
    from sdmesh.services.pipeline import StableDiffusion

    pipe = StableDiffusion.load(args.model)
    size = args.resolution
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    base = dict(prompt="a lighthouse at dusk", height=size, width=size, seed=0, guidance_scale=7.5)
    cases = {
        "ddim-50": dict(sampler="ddim", steps=50),
        "dpm++2m-20": dict(sampler="dpm++2m", steps=20),
        "text-to-image-20": dict(sampler="dpm++2m", steps=20),
        "img2img-20": dict(sampler="dpm++2m", steps=20, init_image=init, strength=1.0, height=None, width=None),
        "inpaint-blend-20": dict(
            sampler="dpm++2m", steps=20, init_image=init, mask_image=mask, strength=1.0, height=None, width=None
        ),
    }
    report = {
        "model": args.model,
        "resolution": size,
        "repeat": args.repeat,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "cases": {},
    }
    for name, options in cases.items():
        request = GenerationRequest(**{**base, **options})
        first = pipe.generate(request)  # compiles
        runs = [pipe.generate(request).timings for _ in range(args.repeat)]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        report["cases"][name] = {
            "seconds_per_image": median["total"],
            "stages": median,
            "compile_s": first.timings["compile"],
        }
        print(
            f"{name:>18}: {median['total']:.2f} s/image  "
            f"({', '.join(f'{k} {v:.2f}' for k, v in median.items() if k != 'total')})",
            file=sys.stderr,
        )
    c = report["cases"]
    report["dpm20_over_ddim50"] = c["dpm++2m-20"]["seconds_per_image"] / c["ddim-50"]["seconds_per_image"]
    for mode in ("img2img-20", "inpaint-blend-20"):
        report[f"{mode}_over_text"] = c[mode]["seconds_per_image"] / c["text-to-image-20"]["seconds_per_image"]
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
