"""Steady-state timing of the in-process pipeline (what `sdmesh bench` and benchmarks/ report)."""

from __future__ import annotations

import resource
import statistics
from typing import Any

from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.pipeline import StableDiffusion


def peak_host_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_pipeline(pipe: StableDiffusion, request: GenerationRequest, repeat: int) -> dict[str, Any]:
    """Compile once (the first run), then `repeat` timed runs; medians per stage, seconds."""
    pipe.validate(request)
    warm = pipe.generate(request)
    runs = [pipe.generate(request).timings for _ in range(repeat)]
    n = warm.images.shape[0]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "height": int(warm.images.shape[1]),
        "width": int(warm.images.shape[2]),
        "steps": request.steps,
        "num_images": n,
        "repeat": repeat,
        "guidance_scale": request.guidance_scale,
        "compile_seconds": warm.timings["compile"],
        "first_run_seconds": warm.timings["total"],
        "seconds_per_image": median("total") / n,
        "seconds_per_image_all": [r["total"] / n for r in runs],
        "text_encoder_seconds": median("encode"),
        "unet_step_seconds": median("denoise") / request.steps,
        "vae_decode_seconds": median("decode"),
        "peak_host_memory_mb": peak_host_memory_mb(),
    }
