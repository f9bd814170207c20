"""Checkpoint hashes and the stack of several models they plan.

model_hash: A1111's short hash (SHA-256 of the UNet's bytes, 10 hex digits), remembered on disk; tensors_hash: equal
for equal tensors however they were written. The denoiser reports the first in ModelInfo; `sdmesh up --model A
--model B` uses the second to give models with equal text encoders or VAEs one encoder or decoder.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdmesh.client import cli, stack
from sdmesh.services.checkpoints import checkpoint


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def opened(monkeypatch) -> list[str]:
    """The paths every later open() call names."""
    seen: list[str] = []
    real = builtins.open

    def spy(file, *args, **kwargs):
        seen.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


# --- model_hash -----------------------------------------------------------------------------------------------


def test_model_hash_is_the_first_10_hex_digits_of_sha256_over_the_files_in_order(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(np.random.default_rng(0).bytes(3 * 2**20 + 17))  # more than one 1 MB block
    b.write_bytes(b"second shard")
    assert checkpoint.model_hash([a, b]) == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()[:10]
    assert checkpoint.model_hash([b, a]) == hashlib.sha256(b.read_bytes() + a.read_bytes()).hexdigest()[:10]


def test_a_second_call_reads_the_cache_not_the_weights_until_the_file_changes(tmp_path, cache, monkeypatch):
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"x" * 1000)
    first = checkpoint.model_hash([weights])
    assert (cache / "hashes.json").is_file()
    seen = opened(monkeypatch)
    assert checkpoint.model_hash([weights]) == first
    assert str(weights) not in seen  # from the cache alone
    weights.write_bytes(b"y" * 1001)  # a new version: another size and mtime
    assert checkpoint.model_hash([weights]) == hashlib.sha256(b"y" * 1001).hexdigest()[:10]
    assert str(weights) in seen


def test_a_cache_that_cannot_be_written_only_costs_the_hashing(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SDMESH_CACHE", str(blocker / "cache"))
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"weights")
    assert checkpoint.model_hash([weights]) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert checkpoint.model_hash([weights]) == hashlib.sha256(b"weights").hexdigest()[:10]


# --- tensors_hash ---------------------------------------------------------------------------------------------


TENSORS = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
    "conv.bias": np.ones(2, np.float16),
    "position_ids": np.arange(5, dtype=np.int64)[None],
}


def test_equal_tensors_hash_equal_however_they_are_written(tmp_path):
    save_file(TENSORS, tmp_path / "one.safetensors")
    reordered = dict(reversed(list(TENSORS.items())))
    save_file({k: reordered[k] for k in ("position_ids",)}, tmp_path / "shard-1.safetensors", metadata={"by": "x"})
    save_file({k: reordered[k] for k in ("conv.bias", "conv.weight")}, tmp_path / "shard-2.safetensors")
    one = checkpoint.tensors_hash([tmp_path / "one.safetensors"])
    assert checkpoint.tensors_hash([tmp_path / "shard-2.safetensors", tmp_path / "shard-1.safetensors"]) == one
    assert (tmp_path / "one.safetensors").read_bytes() != (tmp_path / "shard-2.safetensors").read_bytes()


@pytest.mark.parametrize(
    "change",
    [
        lambda t: {**t, "conv.bias": np.array([1, 1.5], np.float16)},  # one value
        lambda t: {**t, "conv.bias": t["conv.bias"].astype(np.float32)},  # the dtype
        lambda t: {**t, "conv.weight": t["conv.weight"].reshape(2, 3, 4)},  # the shape
        lambda t: {("conv.b" if k == "conv.bias" else k): v for k, v in t.items()},  # a name
    ],
    ids=["value", "dtype", "shape", "name"],
)
def test_tensors_that_differ_in_anything_hash_differently(tmp_path, change):
    save_file(TENSORS, tmp_path / "a.safetensors")
    save_file(change(TENSORS), tmp_path / "b.safetensors")
    assert checkpoint.tensors_hash([tmp_path / "a.safetensors"]) != checkpoint.tensors_hash(
        [tmp_path / "b.safetensors"]
    )


def test_tensors_hash_is_cached_too(tmp_path, monkeypatch):
    save_file(TENSORS, tmp_path / "a.safetensors")
    first = checkpoint.tensors_hash([tmp_path / "a.safetensors"])
    seen = opened(monkeypatch)
    assert checkpoint.tensors_hash([tmp_path / "a.safetensors"]) == first
    assert str(tmp_path / "a.safetensors") not in seen


# --- the denoiser's ModelInfo ---------------------------------------------------------------------------------


def test_the_denoiser_reports_its_unets_short_hash(tiny_checkpoints):
    from sdmesh.services.engine.stages import DenoiserStage, LoadOptions
    from sdmesh.services.serving import denoiser_service

    folder = tiny_checkpoints["sd2"]
    stage = DenoiserStage.load(folder)
    files = denoiser_service.hashed_files(folder, LoadOptions())
    assert files == [folder / "unet" / "diffusion_pytorch_model.safetensors"]
    service = denoiser_service.DenoiserService(
        stage, denoiser_service.denoiser_facts(stage, folder), str(folder), hashed_files=files
    )
    expected = hashlib.sha256(files[0].read_bytes()).hexdigest()[:10]
    assert service.ModelInfo(None, None).model_hash == expected
    assert re.fullmatch(r"[0-9a-f]{10}", expected)


def test_a_single_file_model_is_hashed_as_automatic1111_hashes_its_file(tiny_checkpoints, tmp_path, monkeypatch):
    """A1111 shows a checkpoint file's own short hash; a model served from a single file reports that one, not
    the hash of the folder it was converted into."""
    from sdmesh.services.dev import reference
    from sdmesh.services.engine.stages import LoadOptions
    from sdmesh.services.serving import denoiser_service

    monkeypatch.setenv("SDMESH_CACHE", str(tmp_path / "cache"))
    path = reference.to_single_file(tiny_checkpoints["sd1"], tmp_path / "tiny.safetensors")
    folder = checkpoint.resolve(str(path), config=str(tiny_checkpoints["sd1"]))
    assert denoiser_service.hashed_files(folder, LoadOptions()) == [path]
    assert checkpoint.model_hash([path]) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    path.unlink()  # moved away since: the folder's own UNet is hashed
    assert denoiser_service.hashed_files(folder, LoadOptions()) == [
        folder / "unet" / "diffusion_pytorch_model.safetensors"
    ]


def test_an_inpainting_denoiser_warms_up_with_its_extra_input_channels(tmp_path):
    from sdmesh.services.dev import reference
    from sdmesh.services.engine.stages import DenoiserStage
    from sdmesh.services.serving import denoiser_service

    folder = reference.build(tmp_path / "inpaint", reference.TINY["sd2-inpaint"], seed=0)
    stage = DenoiserStage.load(folder)
    facts = denoiser_service.denoiser_facts(stage, folder)
    assert facts.extra_channels == 5  # mask and masked-image latents join the UNet input
    service = denoiser_service.DenoiserService(stage, facts, "inpaint", max_batch=1)
    service.warm_up(denoiser_service.default_shapes(facts))
    assert ("denoise", 1, *facts.default_size) in service.compiled


# --- `sdmesh up` with several models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """base and inpaint: one text encoder, tokenizer and VAE, different UNets; other-vae: inpaint with one VAE value
    changed."""
    from sdmesh.services.dev import reference

    root = tmp_path_factory.mktemp("models")
    base = reference.build(root / "base", reference.TINY["sd2"], seed=0)
    inpaint = reference.build(root / "inpaint", reference.TINY["sd2"], seed=1)
    for component in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(inpaint / component)
        shutil.copytree(base / component, inpaint / component)
    other = root / "other-vae"
    shutil.copytree(inpaint, other)
    vae = other / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] += 1
    save_file(tensors, vae)
    return {"base": base, "inpaint": inpaint, "other-vae": other}


def up(*flags: str):
    return cli.build_parser().parse_args(["up", *flags])


def fake_addresses(pools: list[stack.Pool]) -> dict[str, str]:
    return {name: f"{name}:1" for p in pools for name in p.processes}


def test_models_with_one_text_encoder_and_vae_share_an_encoder_and_a_decoder(checkpoints):
    base, inpaint = checkpoints["base"], checkpoints["inpaint"]
    models = cli.up_models(up("--model", str(base), "--model", f"inpaint={inpaint}", "--denoisers", "2"))
    assert [(m.name, m.source) for m in models] == [("base", str(base)), ("inpaint", str(inpaint))]
    pools = stack.plan(models, denoisers=2)
    assert [(p.service, p.source, p.models, p.processes) for p in pools] == [
        ("encoder", str(base), ("base", "inpaint"), ("encoder",)),
        ("denoiser", str(base), ("base",), ("denoiser-base-0", "denoiser-base-1")),
        ("denoiser", str(inpaint), ("inpaint",), ("denoiser-inpaint-0", "denoiser-inpaint-1")),
        ("decoder", str(base), ("base", "inpaint"), ("decoder",)),
    ]
    flags = stack.gateway_routing(pools, models, fake_addresses(pools))
    assert flags == [
        "--encoder", "encoder:1", "--denoiser", "denoiser-base-0:1,denoiser-base-1:1", "--decoder", "decoder:1",
        "--model-name", "base",
        "--route", "inpaint", "denoiser=denoiser-inpaint-0:1,denoiser-inpaint-1:1",
    ]  # fmt: skip
    served = cli.build_parser().parse_args(["serve", "gateway", *flags])  # flags the gateway takes
    assert served.model_name == "base" and served.route == [
        ["inpaint", "denoiser=denoiser-inpaint-0:1,denoiser-inpaint-1:1"]
    ]


def test_models_with_different_vaes_get_a_decoder_each_and_the_route_names_it(checkpoints):
    models = cli.up_models(up("--model", str(checkpoints["base"]), "--model", str(checkpoints["other-vae"])))
    pools = stack.plan(models)
    assert [(p.name, p.models) for p in pools] == [
        ("encoder", ("base", "other-vae")),
        ("denoiser-base", ("base",)),
        ("denoiser-other-vae", ("other-vae",)),
        ("decoder-base", ("base",)),
        ("decoder-other-vae", ("other-vae",)),
    ]
    flags = stack.gateway_routing(pools, models, fake_addresses(pools))
    assert flags[flags.index("--route") :] == [
        "--route", "other-vae", "denoiser=denoiser-other-vae-0:1", "decoder=decoder-other-vae:1"
    ]  # fmt: skip


def test_each_process_loads_the_model_of_its_pool(checkpoints):
    args = up("--model", str(checkpoints["base"]), "--model", str(checkpoints["other-vae"]), "--port", "0")
    running = stack.Stack(stack.stage_args(args), models=cli.up_models(args), port=0)  # nothing started
    loads = {c.name: c.argv[c.argv.index("--model") + 1] for c in running.children if c.service != "gateway"}
    assert loads == {
        "encoder": str(checkpoints["base"]),
        "denoiser-base-0": str(checkpoints["base"]),
        "denoiser-other-vae-0": str(checkpoints["other-vae"]),
        "decoder-base": str(checkpoints["base"]),
        "decoder-other-vae": str(checkpoints["other-vae"]),
    }
    assert "--model" not in running.gateway.argv


def masked(argv: list[str]) -> list[str]:
    return [re.sub(r":\d+", ":PORT", re.sub(r"^\d+$", "PORT", a)) for a in argv]


def test_one_model_runs_the_same_processes_with_the_same_flags_as_before():
    args = up("--model", "models/tiny-sd2", "--denoisers", "2", "--chunk-steps", "1")
    (model,) = cli.up_models(args)  # one model: nothing resolved, nothing hashed
    assert model == stack.StackModel("tiny-sd2", "models/tiny-sd2")
    now = stack.Stack(stack.stage_args(args), models=[model], denoisers=2, port=0)
    before = stack.Stack(stack.serve_args(args), denoisers=2, port=0)  # serve_args names the model itself
    assert [c.name for c in now.children] == ["encoder", "denoiser-0", "denoiser-1", "decoder", "gateway"]
    assert [masked(c.argv) for c in now.children] == [masked(c.argv) for c in before.children]
    assert "--model-name" not in now.gateway.argv and "--route" not in now.gateway.argv


def test_one_named_model_tells_the_gateway_its_name():
    models = stack.stack_models(up("--model", "tiny=models/tiny-sd2"))
    pools = stack.plan(models)
    assert stack.gateway_routing(pools, models, fake_addresses(pools))[-2:] == ["--model-name", "tiny"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "a/x", "--model", "b/x"], "two --model are named 'x'"),
        (["--model", "m", "--model", "bad name=n"], "'bad name' is not a model name"),
        (["--model", "models/a", "--model", "models/b", "--unet-checkpoint", "u"], "--unet-checkpoint replaces"),
    ],
)
def test_up_refuses_models_it_cannot_tell_apart_before_starting_anything(flags, message, capsys):
    assert cli.main(["up", *flags]) == 2
    assert message in capsys.readouterr().err
