"""Cold and warm start-up of each stage service, with the persistent JAX compilation cache.

    python benchmarks/startup.py --model models/full-sd2 --shapes 1x64x64 --json benchmarks/results/startup_cpu.json

For each stage, `sdmesh serve STAGE` starts twice with the same --jax-cache-dir: first with the
cache empty (cold: every program compiles), then again (warm: XLA reads the compiled programs from
the cache). We record the seconds from process start to SERVING, and the warm-up (compile) part
the service logs itself ("SERVING on … (warm-up Xs)"); the rest is imports and loading weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("encoder", "denoiser", "decoder")


def start_once(stage: str, args: argparse.Namespace, cache: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "sdmesh.client.cli",
        "serve",
        stage,
        "--model",
        args.model,
        "--port",
        "0",
        "--shapes",
        args.shapes,
        "--jax-cache-dir",
        str(cache),
        "--max-batch",
        str(args.max_batch),
    ]
    t0 = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        for line in process.stderr:
            match = re.search(r"SERVING on \S+ \(warm-up ([0-9.]+)s\)", line)
            if match:
                return {"to_serving_s": time.perf_counter() - t0, "warm_up_s": float(match.group(1))}
        raise SystemExit(f"{stage} never reported SERVING (exit {process.wait()})")
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/full-sd2")
    p.add_argument("--shapes", default="1x64x64")
    p.add_argument("--max-batch", type=int, default=1, help="1: compile only the --shapes batch sizes")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = {
        "model": args.model,
        "shapes": args.shapes,
        "max_batch": args.max_batch,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "stages": {},
    }
    for stage in STAGES:
        cache = Path(tempfile.mkdtemp(prefix=f"sdmesh-jax-{stage}-"))
        cold = start_once(stage, args, cache)
        warm = start_once(stage, args, cache)
        report["stages"][stage] = {"cold": cold, "warm": warm}
        print(
            f"{stage:>8}: cold {cold['to_serving_s']:.1f}s (compile {cold['warm_up_s']:.1f}s), "
            f"warm {warm['to_serving_s']:.1f}s (compile {warm['warm_up_s']:.1f}s)",
            file=sys.stderr,
        )
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
