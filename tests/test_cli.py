"""`sdmesh generate` / `sdmesh bench`: the one-process CLI, on real-format checkpoint folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdmesh.client import cli
from sdmesh.client.cli import build_parser, main


def test_generate_with_latents_equals_diffusers(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints["sd1"]
    latents = np.random.default_rng(7).standard_normal((2, 4, 16, 16), dtype=np.float32)
    np.save(tmp_path / "noise.npy", latents)
    code = main(
        [
            "generate",
            "an astronaut riding a horse",
            "--model",
            str(folder),
            "--latents",
            str(tmp_path / "noise.npy"),
            "--steps",
            "3",
            "--resolution",
            "32",
            "--num-images",
            "2",
            "--negative-prompt",
            "blurry",
            "--output-dir",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 0
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / f"image_{i}.png")) for i in range(2)])

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )  # its own PNDM
    ref = pipe(
        "an astronaut riding a horse",
        negative_prompt="blurry",
        latents=torch.from_numpy(latents),
        num_inference_steps=3,
        height=32,
        width=32,
        num_images_per_prompt=2,
        output_type="pil",
    ).images
    diff = np.abs(ours.astype(int) - np.stack([np.asarray(im) for im in ref]).astype(int))
    assert diff.max() <= 2


def test_generate_prints_paths_and_times(tiny_checkpoints, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "a cat",
                "--model",
                str(tiny_checkpoints["sd2"]),
                "--steps",
                "2",
                "--seed",
                "5",
                "--output-dir",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "image_0.png")
    assert "seed 5" in err and "compile" in err and "generate" in err


def _latents_file(tmp_path, shape, dtype):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, dtype))
    return str(path)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "/nonexistent/model"], "no model folder"),
        (["--height", "31"], "multiple of"),
        (["--steps", "0"], "at least 1"),
        (["--steps", "100000"], "steps must be"),
        (["--guidance-scale", "nan"], "finite"),
        (["--num-images", "-2"], "at least 1"),
        (["--latents", "LATENTS_SHAPE"], "latents must be"),
        (["--latents", "LATENTS_DTYPE"], "expected float32"),
        (["--latents", "/nonexistent.npy"], "no such file"),
        (["--resolution", "abc"], "HEIGHTxWIDTH"),
        (
            ["--ici-data-parallelism", "2"],
            "make a mesh of 2 devices, but this stage uses 1",
        ),  # this process has 1 device
        (["--ici-fsdp-parallelism", "0"], "positive integer or -1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoints, tmp_path, capsys, extra, message):
    extra = [
        _latents_file(tmp_path, (1, 4, 3, 3), np.float32)
        if e == "LATENTS_SHAPE"
        else _latents_file(tmp_path, (1, 4, 8, 8), np.float64)
        if e == "LATENTS_DTYPE"
        else e
        for e in extra
    ]
    argv = [
        "generate",
        "a cat",
        "--model",
        str(tiny_checkpoints["sd2"]),
        "--output-dir",
        str(tmp_path),
        "--quiet",
        *extra,
    ]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals exit 2 too
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.processes
def test_console_script_reports_missing_model_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdmesh.client.cli", "generate", "x", "--model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_writes_seconds_per_image(tiny_checkpoints, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(["bench", "--model", str(tiny_checkpoints["sd2"]), "--steps", "2", "--repeat", "2", "--json", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    for key in (
        "compile_seconds",
        "seconds_per_image",
        "text_encoder_seconds",
        "unet_step_seconds",
        "vae_decode_seconds",
        "peak_host_memory_mb",
    ):
        assert report[key] > 0, key
    assert len(report["seconds_per_image_all"]) == 2


def test_generate_with_an_init_image_and_mask_equals_the_pipeline(tiny_checkpoints, tmp_path):
    """`sdmesh generate --init-image --mask --strength`: inpainting by blending, as the in-process API does it."""
    from sdmesh.services.inputs.contract import GenerationRequest
    from sdmesh.services.pipeline import StableDiffusion

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(pixels).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    folder = tiny_checkpoints["sd2"]
    code = main(
        [
            "generate",
            "a lighthouse",
            "--model",
            str(folder),
            "--init-image",
            str(tmp_path / "init.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--strength",
            "0.9",
            "--sampler",
            "euler",
            "--steps",
            "3",
            "--seed",
            "4",
            "--output-dir",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "image_0.png"))
    expected = (
        StableDiffusion.load(str(folder))
        .generate(
            GenerationRequest(
                prompt="a lighthouse",
                init_image=pixels,
                mask_image=mask,
                strength=0.9,
                sampler="euler",
                steps=3,
                seed=4,
            )
        )
        .images[0]
    )
    np.testing.assert_array_equal(ours, expected)


def test_a_mask_without_an_init_image_is_one_line_and_status_2(tiny_checkpoints, tmp_path, capsys):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask.png")
    code = main(
        ["generate", "x", "--model", str(tiny_checkpoints["sd2"]), "--mask", str(tmp_path / "mask.png"), "--quiet"]
    )
    assert code == 2
    assert "needs an init image" in capsys.readouterr().err


def test_process_flags_belong_to_serve(tiny_checkpoints, capsys):
    assert main(["generate", "x", "--model", str(tiny_checkpoints["sd2"]), "--num-processes", "2", "--quiet"]) == 2
    assert "sdmesh serve" in capsys.readouterr().err


def test_up_passes_limits_drain_and_keys_to_the_services_that_use_them():
    from sdmesh.client import cli, stack

    args = cli.build_parser().parse_args(
        ["up", "--model", "m", "--api-keys", "keys.txt", "--max-work", "100", "--max-side", "512",
         "--drain-seconds", "7"]
    )  # fmt: skip
    gateway, stages = stack.gateway_args(args), stack.serve_args(args)
    assert gateway[gateway.index("--api-keys") + 1] == "keys.txt" and "--api-keys" not in stages
    for flags in (gateway, stages):
        assert flags[flags.index("--max-work") + 1] == "100.0" and flags[flags.index("--max-side") + 1] == "512"
        assert flags[flags.index("--drain-seconds") + 1] == "7.0"
    served = cli.build_parser().parse_args(["serve", "gateway", *gateway])  # every flag is one serve takes
    assert served.max_work == 100 and served.drain_seconds == 7 and str(served.api_keys) == "keys.txt"


# --- the persistent compilation cache ---------------------------------------------------------------------------


def test_the_compilation_cache_is_on_by_default_in_sdmeshs_cache_one_folder_per_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("SDMESH_JAX_CACHE")
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path))
    parse = lambda *flags: build_parser().parse_args(["generate", "x", *flags])

    def resolved(*flags):
        args = parse(*flags)
        cli._resolve_jax_cache(args)
        return args.jax_cache_dir

    default = resolved()
    assert default is not None and Path(default).parent == tmp_path / "jax"
    assert resolved("--jax-cache-dir", "/elsewhere") == "/elsewhere"
    assert resolved("--no-jax-cache") is None
    monkeypatch.setenv("SDMESH_JAX_CACHE", "off")
    assert resolved() is None
    monkeypatch.setenv("SDMESH_JAX_CACHE", str(tmp_path / "chosen"))
    assert resolved() == str(tmp_path / "chosen")
    monkeypatch.delenv("SDMESH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SDMESH_JAX_CACHE")
    assert Path(resolved()).parent == tmp_path / "xdg" / "sdmesh" / "jax"


def test_up_hands_no_jax_cache_to_every_stage():
    from sdmesh.client import stack

    args = build_parser().parse_args(["up", "--no-jax-cache"])
    cli._resolve_jax_cache(args)
    assert "--no-jax-cache" in stack.stage_args(args) and "--jax-cache-dir" not in stack.stage_args(args)


@pytest.mark.processes
def test_a_second_generate_compiles_from_the_cache(tiny_checkpoints, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SDMESH_JAX_CACHE"} | {"SDMESH_CACHE": str(tmp_path / "c")}
    command = [sys.executable, "-m", "sdmesh.client.cli", "generate", "a cat", "--model", str(tiny_checkpoints["sd2"]),
               "--steps", "2", "--resolution", "32", "--quiet", "--output-dir", str(tmp_path)]  # fmt: skip

    def compile_seconds() -> float:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        return float(re.search(r"compile ([\d.]+)s", proc.stdout + proc.stderr).group(1))

    first, second = compile_seconds(), compile_seconds()
    assert any((tmp_path / "c" / "jax").rglob("*"))  # the programs were kept
    assert second < 0.5 * first, (first, second)
