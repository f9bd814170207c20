"""Serving throughput and latency: one request at a time vs request-level vs step-level continuous batching.

    python benchmarks/serving.py --model models/full-sd2 --resolution 64 --requests 24 \\
        --json benchmarks/results/serving_cpu.json

For each mode the whole stack runs as `sdmesh up` (encoder, denoiser, decoder, gateway as
processes), and an open-loop client sends the same requests at the same Poisson arrival
times: the same prompts, seeds and a mixed workload of step counts (uniform in
[--steps-min, --steps-max]). Open loop: a request is sent at its arrival time whether or
not earlier ones have finished, as real traffic does. We record per-request latency
(arrival → images) and throughput (images / (last completion − first arrival)).

    one          --max-batch 1: every stage serves one call at a time
    request      --max-batch B --batching request: a batch forms from the waiting requests and runs to its end
    continuous   --max-batch B --batching continuous: requests join and leave between chunks of steps

The arrival rate defaults to --load × the one-at-a-time service rate, measured first with
a calibration request of the mean step count. All modes share one JAX compilation cache,
so every mode after the first starts warm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = {
    "one": ["--max-batch", "1"],
    "request": ["--batching", "request"],
    "continuous": ["--batching", "continuous"],
}
PROMPTS = ["a lighthouse at dusk", "a red bicycle in the rain", "an astronaut riding a horse", "a bowl of ramen"]


def start_stack(model: str, mode: str, args: argparse.Namespace, log_dir: Path) -> tuple[subprocess.Popen, str]:
    size = args.resolution
    batch = ["--max-batch", str(args.max_batch)] if mode != "one" else []
    shapes = ",".join(f"{b}x{size}x{size}" for b in (1, 2, 4, 8, 16) if b <= (1 if mode == "one" else args.max_batch))
    command = [
        sys.executable,
        "-m",
        "sdmesh.client.cli",
        "up",
        "--model",
        model,
        "--port",
        "0",
        "--shapes",
        shapes,
        "--chunk-steps",
        str(args.chunk_steps),
        "--jax-cache-dir",
        str(args.jax_cache_dir),
        "--log-dir",
        str(log_dir / mode),
        "--max-inflight",
        "256",
        "--max-queue",
        "256",
        *batch,
        *MODES[mode],
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    address = process.stdout.readline().strip()  # `sdmesh up` prints the gateway's address once everything serves
    if not address:
        raise SystemExit(f"sdmesh up failed for mode {mode}; see {log_dir / mode}")
    return process, address


def run_load(address: str, requests: list[dict], size: int) -> list[dict]:
    """Send each request at its arrival time (seconds from now) on its own thread; return the measurements."""
    from sdmesh.client import Client

    results: list[dict] = [{} for _ in requests]
    with Client(address) as client:
        t0 = time.perf_counter()

        def one(i: int, r: dict) -> None:
            delay = r["arrival"] - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter() - t0
            try:
                client.generate(
                    r["prompt"], steps=r["steps"], seed=r["seed"], height=size, width=size, guidance_scale=7.5
                )
                results[i] = {"sent": sent, "done": time.perf_counter() - t0, "steps": r["steps"], "ok": True}
            except Exception as e:
                results[i] = {
                    "sent": sent,
                    "done": time.perf_counter() - t0,
                    "steps": r["steps"],
                    "ok": False,
                    "error": str(e),
                }

        threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    latencies = sorted(r["done"] - r["sent"] for r in ok)
    span = max(r["done"] for r in ok) - min(r["sent"] for r in results)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p / 100 * (len(latencies) - 1)))]

    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "images_per_s": len(ok) / span,
        "latency_p50_s": pct(50),
        "latency_p99_s": pct(99),
        "latency_mean_s": statistics.fmean(latencies),
        "span_s": span,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/full-sd2")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--steps-min", type=int, default=10)
    p.add_argument("--steps-max", type=int, default=50)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--chunk-steps", type=int, default=2)
    p.add_argument(
        "--load", type=float, default=2.0, help="arrival rate as a multiple of the one-at-a-time service rate"
    )
    p.add_argument("--rate", type=float, help="arrival rate in requests/s (instead of --load)")
    p.add_argument("--modes", default="one,request,continuous")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jax-cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sdmesh-bench-jax")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not Path(args.model).exists():
        subprocess.run(
            [sys.executable, "-m", "sdmesh.client.cli", "make-checkpoint", "full-sd2", args.model], check=True
        )

    rng = random.Random(args.seed)
    steps = [rng.randint(args.steps_min, args.steps_max) for _ in range(args.requests)]
    log_dir = Path(tempfile.mkdtemp(prefix="sdmesh-serving-"))
    report: dict = {
        "model": args.model,
        "resolution": args.resolution,
        "requests": args.requests,
        "steps": [args.steps_min, args.steps_max],
        "max_batch": args.max_batch,
        "chunk_steps": args.chunk_steps,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "modes": {},
    }
    rate = args.rate
    for mode in args.modes.split(","):
        process, address = start_stack(args.model, mode, args, log_dir)
        try:
            mean_steps = round((args.steps_min + args.steps_max) / 2)
            warm = [{"arrival": 0.0, "prompt": PROMPTS[0], "steps": mean_steps, "seed": 999}]
            run_load(address, warm, args.resolution)  # first call of each path; compiles nothing new (warmed up)
            calibration = run_load(address, warm, args.resolution)[0]
            single = calibration["done"] - calibration["sent"]
            report.setdefault("single_request_latency_by_mode_s", {})[mode] = single
            report.setdefault("single_request_latency_s", single)  # the first mode's: the one-at-a-time reference
            if rate is None:  # measured once, in the first mode, and kept for all: the same traffic for every mode
                rate = args.load / single
            report["rate_per_s"] = rate
            arrival, requests = 0.0, []
            for i in range(args.requests):
                requests.append({"arrival": arrival, "prompt": PROMPTS[i % len(PROMPTS)], "steps": steps[i], "seed": i})
                arrival += rng_arrivals(args.seed, i, rate)
            results = run_load(address, requests, args.resolution)
            report["modes"][mode] = {**summarize(results), "requests": results}
            s = report["modes"][mode]
            print(
                f"{mode:>10}: {s['images_per_s']:.3f} images/s, p50 {s['latency_p50_s']:.1f}s, "
                f"p99 {s['latency_p99_s']:.1f}s ({s['completed']} ok, {s['failed']} failed)",
                file=sys.stderr,
            )
        finally:
            process.terminate()
            process.wait(timeout=60)
    modes = report["modes"]
    if "continuous" in modes and "request" in modes:
        c, r = modes["continuous"], modes["request"]
        report["continuous_vs_request"] = {
            "throughput_ratio": c["images_per_s"] / r["images_per_s"],
            "p99_ratio": c["latency_p99_s"] / r["latency_p99_s"],
        }
    if "continuous" in modes and "one" in modes:
        c, o = modes["continuous"], modes["one"]
        report["continuous_vs_one"] = {
            "throughput_ratio": c["images_per_s"] / o["images_per_s"],
            "p99_vs_single_latency": c["latency_p99_s"] / report["single_request_latency_s"],
        }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=2))
    return 0


def rng_arrivals(seed: int, i: int, rate: float) -> float:
    """The i-th Poisson inter-arrival gap: the same for every mode."""
    return random.Random(seed * 1_000_003 + i).expovariate(rate)


if __name__ == "__main__":
    raise SystemExit(main())
