"""The HTTP front's cost over gRPC: the same request, one at a time, through `Gateway.Generate` and through
`POST /v1/images/generations` (and `POST /v1/jobs` followed to its end over SSE), in the same run.

    python benchmarks/http_front.py --model models/tiny-sd2 --steps 10 --repeat 15 \\
        --json benchmarks/results/http_front_cpu.json

The stack runs as `sdmesh up` (four processes; the front lives in the gateway's). Requests alternate between the
paths so drift on a noisy machine falls on each alike; medians and their ratio are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-sd2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import httpx

    from sdmesh.client import Client

    log_dir = Path(tempfile.mkdtemp(prefix="sdmesh-http-bench-"))
    command = [sys.executable, "-m", "sdmesh.client.cli", "up", "--model", args.model, "--port", "0",
               "--http-port", "0", "--log-dir", str(log_dir)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip()
        http = process.stdout.readline().strip().removeprefix("http: ")
        if not address or not http.startswith("http"):
            raise SystemExit(f"sdmesh up did not start; see {log_dir}")
        body = {"prompt": "a lighthouse at dusk", "steps": args.steps, "seed": 1}
        times: dict[str, list[float]] = {"grpc": [], "http": [], "http_job": []}
        with Client(address, timeout=120) as client, httpx.Client(base_url=http, timeout=120) as web:

            def grpc_once() -> None:
                client.generate(body["prompt"], steps=args.steps, seed=1)

            def http_once() -> None:
                answer = web.post("/v1/images/generations", json=body)
                answer.raise_for_status()

            def job_once() -> None:
                job = web.post("/v1/jobs", json={**body, "preview_every": 0}).json()
                with web.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
                    for line in stream.iter_lines():
                        if line.startswith("event: done"):
                            break

            paths = {"grpc": grpc_once, "http": http_once, "http_job": job_once}
            for run in paths.values():  # warm: first calls of each path
                run()
            for _ in range(args.repeat):
                for name, run in paths.items():
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
    finally:
        process.send_signal(2)
        process.wait(60)

    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "http_front",
        "cpu": cpu_name(),
        "command": " ".join(["python", *sys.argv]),
        "model": args.model,
        "steps": args.steps,
        "repeat": args.repeat,
        "median_seconds": medians,
        "http_over_grpc": medians["http"] / medians["grpc"],
        "http_job_over_grpc": medians["http_job"] / medians["grpc"],
        "seconds": times,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
