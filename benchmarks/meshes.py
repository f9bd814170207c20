"""UNet step time per mesh shape: `sdmesh bench` once per (data, fsdp, tensor) mesh.

    python benchmarks/meshes.py --model models/full-sd2 --devices 4 --meshes 1,4,1 1,1,4 2,2,1 2,1,2 1,2,2 \\
        --json benchmarks/results/meshes_cpu_4dev.json

Each mesh runs in its own process with `--devices` devices (on CPU: host devices made by
XLA_FLAGS=--xla_force_host_platform_device_count; on an accelerator host: the real ones), plus a
one-device baseline without a mesh. We record what `sdmesh bench` reports: the median UNet step
and per-image times, compile time and peak host memory. On a CPU the fake devices share the same
cores, so this measures the sharding's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(args: argparse.Namespace, mesh: str | None) -> dict:
    out = Path(tempfile.mkdtemp()) / "bench.json"
    command = [
        sys.executable,
        "-m",
        "sdmesh.client.cli",
        "bench",
        "--model",
        args.model,
        "--resolution",
        str(args.resolution),
        "--steps",
        str(args.steps),
        "--num-images",
        str(args.num_images),
        "--repeat",
        str(args.repeat),
        "--json",
        str(out),
    ]
    env = dict(os.environ)
    if mesh is not None:
        data, fsdp, tensor = mesh.split(",")
        command += ["--ici-data-parallelism", data, "--ici-fsdp-parallelism", fsdp, "--ici-tensor-parallelism", tensor]
        if args.cpu:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/full-sd2")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--meshes", nargs="+", default=["1,4,1", "1,1,4", "2,2,1", "2,1,2", "1,2,2"])
    p.add_argument("--gpu", dest="cpu", action="store_false", help="use the real devices (no fake host devices)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = {
        "model": args.model,
        "resolution": args.resolution,
        "steps": args.steps,
        "num_images": args.num_images,
        "devices": args.devices,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "meshes": {},
    }
    for mesh in [None, *args.meshes]:
        name = mesh or "one device"
        r = bench(args, mesh)
        keep = ("unet_step_seconds", "seconds_per_image", "compile_seconds", "peak_host_memory_mb", "mesh")
        report["meshes"][name] = {k: r[k] for k in keep}
        print(
            f"{name:>12}: UNet step {r['unet_step_seconds']:.3f}s, {r['seconds_per_image']:.2f} s/image, "
            f"compile {r['compile_seconds']:.1f}s, peak host {r['peak_host_memory_mb'] / 1024:.1f} GB",
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
