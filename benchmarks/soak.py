"""Soak: the whole stack under open-loop load for a while, malformed requests mixed in, a denoiser replica
restarted half-way; requests served, errors by status code, and each service's memory over time.

    python benchmarks/soak.py --model models/tiny-sd2 --minutes 10 --rate 2 \\
        --json benchmarks/results/soak_cpu.json

The stack is `client.stack.Stack` (encoder, two denoiser replicas, decoder, gateway as processes, as
`sdmesh up` runs them). Arrivals are Poisson at --rate; a --malformed fraction of them are requests the
gateway must refuse (unknown sampler, a size past the limit, a broken PNG, a NaN guidance scale, too
many steps, a size no multiple of the UNet's), the rest valid text-to-image and img2img requests of 2 to
8 steps, a --cancel fraction of which the client abandons part-way. At half time one denoiser replica gets
SIGTERM (it drains) and is started again on its port. Every 10 s the resident memory (RSS) of each
service is sampled; the summary compares the first and last minute. Valid requests must all succeed (the
restart included); malformed ones must all be INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import psutil
from PIL import Image

from sdmesh.client import Client, GatewayError, GenerateResult
from sdmesh.client.stack import Stack


def init_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def malformed(rng: random.Random, size: int) -> dict:
    return rng.choice(
        [
            dict(prompt="a cat", sampler="heun"),
            dict(prompt="a cat", height=4096 * 2, width=64),
            dict(prompt="a cat", init_image=b"\x89PNG\r\n\x1a\n broken"),
            dict(prompt="a cat", guidance_scale=float("nan")),
            dict(prompt="a cat", steps=5000),
            dict(prompt="a cat", height=size + 3, width=size),
        ]
    )


def valid(rng: random.Random, size: int, png: bytes) -> dict:
    request = dict(prompt=f"a soak test {rng.randrange(1000)}", steps=rng.randint(2, 8), seed=rng.randrange(10**6))
    if rng.random() < 0.3:
        request.update(init_image=png, strength=0.6)
    return request


def rss_mb(stack: Stack) -> dict[str, float]:
    out = {}
    for child in stack.children:
        try:
            out[child.name] = psutil.Process(child.process.pid).memory_info().rss / 2**20
        except (psutil.NoSuchProcess, AttributeError):
            out[child.name] = float("nan")
    return out


def restart(stack: Stack, name: str, log: list[str]) -> None:
    """SIGTERM the child (it drains), wait for it, start it again with the same command on the same port."""
    child = next(c for c in stack.children if c.name == name)
    t0 = time.monotonic()
    child.process.terminate()
    code = child.process.wait(120)
    log.append(f"{name} exited {code} after {time.monotonic() - t0:.1f}s drain")
    out = child.log.open("a") if child.log else None
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    child.process = subprocess.Popen(child.argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    log.append(f"{name} restarted as pid {child.process.pid}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    p.add_argument("--malformed", type=float, default=0.15)
    p.add_argument("--cancel", type=float, default=0.1)
    p.add_argument("--size", type=int, default=16, help="image side (the tiny checkpoint's native 16)")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/sdmesh-soak"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    serve = ["--model", args.model, "--max-queue", "64", "--chunk-steps", "2", "--drain-seconds", "20"]
    stack = Stack(serve, port=0, denoisers=2, gateway_args=["--max-inflight", "64"], log_dir=args.log_dir,
                  drain_seconds=20)  # fmt: skip
    stack.start()
    stack.wait_serving(900)
    rng = random.Random(0)
    png = init_png(args.size)
    outcomes: collections.Counter = collections.Counter()
    latencies: list[float] = []
    memory: list[tuple[float, dict[str, float]]] = []
    events: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    duration = args.minutes * 60
    t_start = time.monotonic()

    def send(kind: str, request: dict, cancel_after: float | None) -> None:
        t0 = time.monotonic()
        try:
            with Client(stack.address, timeout=300) as client:
                for event in client.stream(**request):
                    if cancel_after is not None and time.monotonic() - t0 > cancel_after:
                        with lock:
                            outcomes[(kind, "CANCELLED_BY_CLIENT")] += 1
                        return
                    if isinstance(event, GenerateResult):
                        break
            with lock:
                outcomes[(kind, "OK")] += 1
                if kind == "valid" and cancel_after is None:
                    latencies.append(time.monotonic() - t0)
        except GatewayError as e:
            with lock:
                outcomes[(kind, e.code.name)] += 1
                if (kind == "valid") or e.code.name != "INVALID_ARGUMENT":
                    failures.append(f"{kind} {sorted(request)}: {e}")

    def sample_memory() -> None:
        while time.monotonic() - t_start < duration + 5:
            memory.append((time.monotonic() - t_start, rss_mb(stack)))
            time.sleep(10)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    restarted = False
    with futures.ThreadPoolExecutor(128) as pool:
        pending = []
        next_at = 0.0
        while (now := time.monotonic() - t_start) < duration:
            if not restarted and now > duration / 2:
                restarted = True
                pool.submit(restart, stack, "denoiser-0", events)
            if now < next_at:
                time.sleep(min(0.05, next_at - now))
                continue
            next_at += rng.expovariate(args.rate)
            if rng.random() < args.malformed:
                pending.append(pool.submit(send, "malformed", malformed(rng, args.size), None))
            else:
                cancel = rng.uniform(0.0, 0.1) if rng.random() < args.cancel else None
                pending.append(pool.submit(send, "valid", valid(rng, args.size, png), cancel))
        for f in pending:
            f.result()
    memory.append((time.monotonic() - t_start, rss_mb(stack)))
    stack.stop()

    first = [m for t, m in memory if t <= 60]
    last = [m for t, m in memory if t >= memory[-1][0] - 60]
    names = list(memory[0][1])
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "model_name": _cpu_name()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "outcomes": {f"{k}:{c}": n for (k, c), n in sorted(outcomes.items())},
        "valid_latency_s": {"p50": statistics.median(latencies), "p99": _quantile(latencies, 0.99),
                            "n": len(latencies)} if latencies else {},
        "rss_mb_first_minute": {n: max(m[n] for m in first) for n in names},
        "rss_mb_last_minute": {n: max(m[n] for m in last) for n in names},
        "rss_mb_peak": {n: max(m[n] for _, m in memory) for n in names},
        "events": events,
        "failures": failures[:20],
        "failure_count": len(failures),
    }  # fmt: skip
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if not failures else 1


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
