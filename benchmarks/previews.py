"""What live previews cost the denoiser: median denoise time with preview_every=5 against 0, in the same run.

    python benchmarks/previews.py --model models/tiny-sd2 --json benchmarks/results/previews_cpu.json

The Denoiser service in this process (its continuous batcher and its `run`, as a Denoise call drives them, without
the gRPC hop), warm, at the model's own chunk of DEFAULT_CHUNK_STEPS steps. The two settings alternate, run after
run, so a machine whose speed drifts (a shared CPU) slows both alike. A preview is one x̂₀ to the host, a 3 × C
projection and a JPEG encode on the call's thread; besides the end-to-end ratio we time those pieces alone, which
a noisy machine cannot blur, and the one-time fit of the map on the decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny-sd2")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--preview-every", type=int, default=5)
    p.add_argument("--repeat", type=int, default=9, help="runs of each setting")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import jax.numpy as jnp

    from sdmesh.services.engine.stages import DecoderStage, DenoiserStage, TextEncoderStage, preview_jpeg
    from sdmesh.services.inputs.contract import DenoiseJob
    from sdmesh.services.serving import denoiser_service

    folder = Path(args.model)
    encoder, denoiser, decoder = TextEncoderStage.load(folder), DenoiserStage.load(folder), DecoderStage.load(folder)
    facts = denoiser_service.denoiser_facts(denoiser, folder)
    service = denoiser_service.DenoiserService(denoiser, facts, str(folder), max_batch=1)

    # the map, fitted as a decoder's warm-up does: once cold (compile included), once more warm
    f, size = decoder.scale_factor, args.resolution
    native = decoder.preview_size or (size // f, size // f)
    t0 = time.perf_counter()
    projection = decoder.latent_preview()
    fit_cold_s = time.perf_counter() - t0
    decoder._latent_preview = None  # forget it, to time a second fit with the decode compiled
    t0 = time.perf_counter()
    projection = decoder.latent_preview()
    fit_warm_s = time.perf_counter() - t0

    hidden, _, _ = encoder.encode(["a lighthouse at dusk", ""])
    hidden = np.asarray(hidden)
    cond, uncond = hidden[:1], hidden[1:]

    def job(preview_every: int) -> DenoiseJob:
        return DenoiseJob(cond, uncond, None, 0, args.steps, 7.5, 0.0, 0.0, size, size,
                          preview_every=preview_every, preview_projection=projection)  # fmt: skip

    def run(preview_every: int) -> tuple[float, int, int]:
        """(seconds from submit to the final latents, previews, their bytes)."""
        t0 = time.perf_counter()
        previews = [pv for _, _, latents, pv in service.run(job(preview_every)) if pv]
        return time.perf_counter() - t0, len(previews), sum(map(len, previews))

    run(0), run(args.preview_every)  # compile, and warm every path
    times: dict[int, list[float]] = {0: [], args.preview_every: []}
    previews = jpeg_bytes = 0
    for _ in range(args.repeat):
        for k in times:
            seconds, previews_k, bytes_k = run(k)
            times[k].append(seconds)
            if k:
                previews, jpeg_bytes = previews_k, bytes_k
    off, on = statistics.median(times[0]), statistics.median(times[args.preview_every])

    # the pieces of one preview, alone: x̂₀ to the host (from a device array of a batch's shape), then the JPEG
    h, w = size // f, size // f
    x0_history = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, h, w, 4), np.float32))
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        x0 = np.asarray(x0_history[0, 0])
    fetch_ms = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        preview_jpeg(x0, projection)
    jpeg_ms = (time.perf_counter() - t0) / n * 1e3

    report = {
        "model": args.model,
        "resolution": size,
        "latent_size": [h, w],
        "steps": args.steps,
        "chunk_steps": service.chunk,
        "preview_every": args.preview_every,
        "repeat": args.repeat,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "denoise_s_median": {"preview_every_0": off, f"preview_every_{args.preview_every}": on},
        "denoise_s_all": {f"preview_every_{k}": v for k, v in times.items()},
        "ratio": on / off,
        "overhead_percent": (on / off - 1) * 100,
        "previews_per_request": previews,
        "preview_jpeg_bytes_mean": jpeg_bytes / max(previews, 1),
        "per_preview_ms": {"x0_to_host": fetch_ms, "project_and_jpeg": jpeg_ms},
        "per_preview_percent_of_denoise": (fetch_ms + jpeg_ms) * previews / 1e3 / off * 100,
        "fit": {"latent_size": list(native), "cold_s_with_compile": fit_cold_s, "warm_s": fit_warm_s},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    service.batcher.close()
    return 0


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
