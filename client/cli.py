"""The `sdmesh` command.

    sdmesh generate PROMPT [options]       text → PNGs, in this process
    sdmesh bench [options]                 steady-state timing of the in-process pipeline
    sdmesh make-checkpoint SPEC DIR        a random-weight diffusers checkpoint (dev extra)

Imports of JAX and the models happen inside the commands that need them, so the
light client (`pip install sdmesh`) starts fast and says what to install.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = os.environ.get("SDMESH_MODEL", "stabilityai/stable-diffusion-2-1-base")


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", " ").split()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, e.g. 512 or 512x768, got {text!r}")
    return parts[0], parts[1]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="a diffusers-format folder or a Hugging Face Hub id (default: %(default)s; env SDMESH_MODEL)")
    g.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    g.add_argument("--variant", help="weights variant, e.g. fp16 for *.fp16.safetensors")
    g.add_argument("--unet-checkpoint", help="a UNet folder or .safetensors file that replaces the model's UNet")
    g.add_argument("--allow-pickle", action="store_true", help="allow .bin (PyTorch pickle) weights, read with torch.load(weights_only=True)")
    r = p.add_argument_group("runtime")
    r.add_argument("--weights-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    r.add_argument("--activations-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    r.add_argument("--precision", default="default", type=str.lower, choices=("default", "high", "highest"), help="matmul precision")
    r.add_argument("--attention", default="dot_product", choices=("dot_product", "flash"))
    r.add_argument("--jax-cache-dir", help="persistent JAX compilation cache (a second run skips compiling)")


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=_positive_int, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=_positive_int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--resolution", type=_resolution, help="SIZE or HEIGHTxWIDTH; instead of --height/--width")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdmesh", description="Stable Diffusion 1.x/2.x in JAX, in one process or as gRPC stage services.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt", description="Generate images from a prompt and write image_{i}.png.")
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt", default=None)
    _add_model_options(gen)
    gen.add_argument("--steps", type=_positive_int, default=50)
    gen.add_argument("--guidance-scale", type=_finite_float, default=7.5)
    gen.add_argument("--guidance-rescale", type=_finite_float, default=0.0)
    gen.add_argument("--eta", type=_finite_float, default=0.0, help="DDIM η: 0 is deterministic")
    _add_size_options(gen)
    gen.add_argument("--num-images", type=_positive_int, default=1)
    gen.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    gen.add_argument("--latents", type=Path, help="initial noise as .npy, NCHW float32 (N, C, H/8, W/8), as diffusers' `latents`")
    gen.add_argument("--output-dir", type=Path, default=Path("."))
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    bench = sub.add_parser("bench", help="time the in-process pipeline", description="Steady-state timing: compile once, then --repeat timed runs.")
    _add_model_options(bench)
    _add_size_options(bench)
    bench.add_argument("--steps", type=_positive_int, default=50)
    bench.add_argument("--num-images", type=_positive_int, default=1)
    bench.add_argument("--guidance-scale", type=_finite_float, default=7.5)
    bench.add_argument("--repeat", type=_positive_int, default=3)
    bench.add_argument("--json", type=Path, help="write the results here")

    make = sub.add_parser("make-checkpoint", help="write a random-weight diffusers checkpoint (needs the dev extra)")
    make.add_argument("spec", choices=("tiny-sd2", "tiny-sd1", "full-sd2"))
    make.add_argument("directory", type=Path)
    make.add_argument("--seed", type=int, default=0)
    return parser


def _size(args: argparse.Namespace) -> tuple[int | None, int | None]:
    if args.resolution and (args.height or args.width):
        raise UsageError("give --resolution or --height/--width, not both")
    return args.resolution if args.resolution else (args.height, args.width)


def _load(args: argparse.Namespace) -> Any:
    try:
        from sdmesh.services import pipeline
    except ImportError as e:
        raise UsageError(f"running models in this process needs the serve extra ({e.name} is missing): pip install 'sdmesh[serve]'") from e
    options = pipeline.RuntimeOptions(
        weights_dtype=args.weights_dtype, activations_dtype=args.activations_dtype, precision=args.precision,
        attention=args.attention, jax_cache_dir=args.jax_cache_dir,
    )
    t0 = time.perf_counter()
    pipe = pipeline.StableDiffusion.load(
        args.model, revision=args.revision, variant=args.variant, unet_checkpoint=args.unet_checkpoint,
        allow_pickle=args.allow_pickle, options=options,
    )
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return pipeline, pipe


def _read_latents(path: Path) -> Any:
    import numpy as np

    try:
        latents = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--latents {path}: no such file") from None
    except (ValueError, OSError) as e:
        raise UsageError(f"--latents {path}: not a readable .npy array ({e})") from None
    if latents.dtype != np.float32:
        raise UsageError(f"--latents {path}: expected float32, got {latents.dtype} (np.save(path, x.astype(np.float32)))")
    return latents


class ProgressBar:
    """A one-line progress bar on stderr, fed with (step, total)."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled, self.t0 = label, enabled and sys.stderr.isatty(), time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * step / total)
        rate = (time.perf_counter() - self.t0) / max(step, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{total} {rate:.2f}s/step")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    height, width = _size(args)
    latents = _read_latents(args.latents) if args.latents else None
    pipeline, pipe = _load(args)
    request = pipeline.GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images, steps=args.steps,
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale, eta=args.eta,
        height=height, width=width, seed=args.seed, latents=latents,
    )
    pipe.validate(request)  # fail before compiling anything
    chunk = max(1, args.steps // 20)  # ~20 progress updates; the compiled program is the same for every chunk
    result = pipe.generate(request, progress=ProgressBar("denoise", not args.quiet), chunk=chunk)
    for removed in result.truncated:
        print(f"note: the prompt was truncated to the tokenizer's limit; dropped: {removed!r}", file=sys.stderr)
    from PIL import Image

    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = args.output_dir / f"image_{i}.png"
        Image.fromarray(image).save(path)
        print(path)
    t = result.timings
    seed = "from --latents" if latents is not None else result.seed
    print(f"seed {seed}; compile {t['compile']:.2f}s, generate {t['total'] - t['compile']:.2f}s "
          f"(encode {t['encode']:.2f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s)", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    height, width = _size(args)
    pipeline, pipe = _load(args)
    import jax

    from sdmesh.services.benchmark import time_pipeline

    request = pipeline.GenerationRequest(prompt="a photograph of an astronaut riding a horse", num_images=args.num_images,
                                         steps=args.steps, guidance_scale=args.guidance_scale, height=height, width=width, seed=0)
    report = {
        "model": args.model, "weights_dtype": args.weights_dtype, "activations_dtype": args.activations_dtype,
        "precision": args.precision, "attention": args.attention, "devices": [str(d) for d in jax.devices()],
        **time_pipeline(pipe, request, args.repeat),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from sdmesh.services import reference

    try:
        path = reference.build(args.directory, reference.SPECS[args.spec], seed=args.seed)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    print(path)
    return 0


COMMANDS = {"generate": cmd_generate, "bench": cmd_bench, "make-checkpoint": cmd_make_checkpoint}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    user_errors: tuple[type[BaseException], ...] = (UsageError,)
    try:  # errors a user can fix, from the model side, when it is installed
        from sdmesh.services.pipeline import InvalidRequest
        from sdmesh.services.weights import CheckpointError

        user_errors += (InvalidRequest, CheckpointError)
    except ImportError:
        pass
    try:
        return COMMANDS[args.command](args)
    except user_errors as e:
        print(f"sdmesh {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
