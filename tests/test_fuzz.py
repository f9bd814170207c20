"""Every RPC of every stage and of the gateway, fuzzed: generated requests, arbitrary ones and valid ones with a few
things broken (tensor headers that lie, NaN and infinity, absurd shapes and counts, wrong dtypes, broken and huge
images, odd unicode, huge prompts), are answered with a status other than INTERNAL or UNKNOWN within BOUND seconds;
the stage stays SERVING and answers a normal request afterwards. Servers run in this process on loopback ports,
around the tiny random-weight checkpoint, loaded once for the module.

Accepted requests must stay cheap: a new shape compiles a new program (seconds on a CPU). So every valid size the
strategies draw is one compiled in `mesh` (16×16 pixels, 1 or 2 images, 1 to 3 steps), and every other size they
draw is invalid. A failure prints the example and the blob that reproduces it (@reproduce_failure).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
import time
import types
import zlib

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdmesh.services.engine.stages import DecoderStage, DenoiserStage, TextEncoderStage
from sdmesh.services.serving import decoder_service, denoiser_service, gateway, server, text_encoder_service
from sdmesh.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    denoiser_pb2,
    denoiser_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    tensor_pb2,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
)
from sdmesh.v1.tensors import to_proto

# The tiny sd2 checkpoint's numbers (checked against its facts in `mesh`).
SIZE = 16  # native pixels per side: UNet sample_size 8 × VAE factor 2
LATENT = 8  # latent pixels per side
C = 4  # latent channels
L, D = 77, 32  # conditioning (N, L, D)
MAX_STEPS = 999
SAMPLERS = ("ddim", "euler", "euler-ancestral", "dpm++2m", "dpm++2m-karras", "plms")

BOUND = 5.0  # seconds any answer may take: an accepted request runs a few steps of compiled programs
COMPILE_BOUND = 30.0  # an accepted request that needs a program for a new conditioning length
OK, INVALID, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
ALLOWED = {OK, INVALID, EXHAUSTED}  # RESOURCE_EXHAUSTED only as gRPC's refusal of a message past the size limit
STREAMING = {"Denoise", "Generate"}

# Hypothesis warns when an example's repr passes 50 kB: a Tensor's data printed in full, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

fuzz = settings(
    max_examples=80,
    deadline=None,  # BOUND is checked per call instead: hypothesis' own deadline would count generation too
    derandomize=True,  # the same examples every run: a failure in CI reproduces here
    print_blob=True,
    database=None,  # nothing written into the shared tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- the servers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tiny_checkpoints):
    """The three stages behind warmed-up servers, a gateway over them, a stub per service, and every program a
    cheap valid request may use compiled (by running the normal requests once)."""
    folder = tiny_checkpoints["sd2"]
    encoder, denoiser, decoder = TextEncoderStage.load(folder), DenoiserStage.load(folder), DecoderStage.load(folder)
    facts = denoiser_service.denoiser_facts(denoiser, folder)
    assert (facts.default_size, facts.latent_channels, facts.hidden_size, facts.max_length, facts.max_steps) == (
        (SIZE, SIZE),
        C,
        D,
        L,
        MAX_STEPS,
    ) and set(facts.samplers) == set(SAMPLERS), "the tiny checkpoint changed: update this file's constants"
    shapes = [(1, SIZE, SIZE)]
    # max_batch 1: one compiled bucket; 2 images run one after the other, through the same program
    services = {
        "encoder": text_encoder_service.stage_service(
            text_encoder_service.TextEncoderService(encoder, str(folder)), shapes
        ),
        "denoiser": denoiser_service.stage_service(
            denoiser_service.DenoiserService(denoiser, facts, str(folder), chunk=2, max_batch=1), shapes
        ),
        "decoder": decoder_service.stage_service(decoder_service.DecoderService(decoder, str(folder)), shapes),
    }
    servers = {name: server.StageServer(s, max_queue=2).start() for name, s in services.items()}
    for s in servers.values():
        s.warm_up()
    pools = [gateway.ReplicaPool(name, [servers[name].address]) for name in ("encoder", "denoiser", "decoder")]
    gateway_server, port = gateway.build_server(gateway.GatewayService(*pools), "127.0.0.1:0")
    gateway_server.start()
    big = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    addresses = {name: s.address for name, s in servers.items()} | {"gateway": f"127.0.0.1:{port}"}
    channels = {name: grpc.insecure_channel(a, options=big) for name, a in addresses.items()}
    m = types.SimpleNamespace(
        channels=channels,
        stubs={
            "encoder": text_encoder_pb2_grpc.TextEncoderStub(channels["encoder"]),
            "denoiser": denoiser_pb2_grpc.DenoiserStub(channels["denoiser"]),
            "decoder": decoder_pb2_grpc.DecoderStub(channels["decoder"]),
            "gateway": gateway_pb2_grpc.GatewayStub(channels["gateway"]),
        },
    )
    for stage in ("encoder", "denoiser", "decoder", "gateway"):
        for method, request in normal_requests(stage):
            code, details = call(m, stage, method, request, timeout=120)  # compiles what these requests use
            assert code == OK, f"a normal {stage}.{method} failed: {code.name}: {details}"
    yield m
    for c in channels.values():
        c.close()
    gateway_server.stop(None).wait()
    for pool in pools:
        pool.close()
    for s in servers.values():
        s.stop(grace=0)


def png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def rgb(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def normal_requests(stage: str) -> list[tuple[str, object]]:
    """Requests each stage must answer: after the fuzzing as before it. Between them they use every program a
    cheap valid request of the strategies may need (guided or not, from a seed or latents, img2img, blending)."""
    cond = to_proto(np.zeros((1, L, D), np.float32))
    latents = to_proto(np.zeros((1, C, LATENT, LATENT), np.float32))
    if stage == "encoder":
        texts = {"prompts": ["a red cube", "a blue ball"], "negative_prompts": ["", "blurry"]}
        return [
            ("Encode", text_encoder_pb2.EncodeRequest(prompts=["a red cube"])),
            ("Encode", text_encoder_pb2.EncodeRequest(prompts=["a red cube", "a blue ball"])),
            ("Encode", text_encoder_pb2.EncodeRequest(prompts=["a red cube"], unconditional=True)),
            ("Encode", text_encoder_pb2.EncodeRequest(**texts, unconditional=True)),
            ("ModelInfo", common_pb2.ModelInfoRequest()),
        ]
    if stage == "denoiser":
        mask = to_proto(np.ones((1, 1, LATENT, LATENT), np.float32))
        cond2, mask2 = to_proto(np.zeros((2, L, D), np.float32)), to_proto(np.ones((2, 1, LATENT, LATENT), np.float32))
        latents2 = to_proto(np.zeros((2, C, LATENT, LATENT), np.float32))
        return [
            ("Denoise", denoiser_pb2.DenoiseRequest(cond=cond, uncond=cond, seed=1, num_inference_steps=1)),
            ("Denoise", denoiser_pb2.DenoiseRequest(cond=cond, latents=latents, num_inference_steps=2)),
            (
                "Denoise",
                denoiser_pb2.DenoiseRequest(
                    cond=cond,
                    uncond=cond,
                    seed=1,
                    num_inference_steps=2,
                    init_latents=latents,
                    strength=0.5,
                    blend_mask=mask,
                ),
            ),
            ("Denoise", denoiser_pb2.DenoiseRequest(cond=cond, seed=1, num_inference_steps=2, init_latents=latents)),
            # more images than the running batch holds (max_batch 1) run alone, at the next bucket: 2
            (
                "Denoise",
                denoiser_pb2.DenoiseRequest(
                    cond=cond2, uncond=cond2, seed=1, num_inference_steps=2, init_latents=latents2, blend_mask=mask2
                ),
            ),
            ("Denoise", denoiser_pb2.DenoiseRequest(cond=cond2, latents=latents2, num_inference_steps=1)),
            (
                "Denoise",
                denoiser_pb2.DenoiseRequest(
                    cond=cond2, seed=1, num_inference_steps=1, blend_mask=mask2, init_latents=latents2
                ),
            ),
            ("ModelInfo", common_pb2.ModelInfoRequest()),
        ]
    if stage == "decoder":
        pixels = to_proto(np.zeros((1, SIZE, SIZE, 3), np.uint8))
        return [
            ("Decode", decoder_pb2.DecodeRequest(latents=latents)),
            ("Decode", decoder_pb2.DecodeRequest(latents=to_proto(np.zeros((2, C, LATENT, LATENT), np.float32)))),
            ("EncodeImage", decoder_pb2.EncodeImageRequest(images=pixels)),
            ("EncodeImage", decoder_pb2.EncodeImageRequest(images=pixels, seed=3, stream=1)),
            ("ModelInfo", common_pb2.ModelInfoRequest()),
        ]
    image, mask = png(rgb()), png(Image.new("L", (SIZE, SIZE), 255))
    return [
        ("Generate", gateway_pb2.GenerateRequest(prompt="a cat", num_inference_steps=1, seed=1)),
        ("Generate", gateway_pb2.GenerateRequest(prompt="a cat", num_inference_steps=1, guidance_scale=1.0)),
        ("Generate", gateway_pb2.GenerateRequest(prompt="a cat", num_images=2, num_inference_steps=2, seed=2)),
        ("Generate", gateway_pb2.GenerateRequest(prompt="a cat", num_inference_steps=2, init_image=image)),
        (
            "Generate",
            gateway_pb2.GenerateRequest(
                prompt="a cat",
                num_inference_steps=2,
                init_image=image,
                mask_image=mask,
                guidance_scale=1.0,
                num_images=2,
            ),
        ),
        ("ModelInfo", common_pb2.ModelInfoRequest()),
    ]


# --- the property --------------------------------------------------------------------------------------------


def call(mesh, stage: str, method: str, request, *, timeout: float = COMPILE_BOUND) -> tuple[grpc.StatusCode, str]:
    """(status, details) of one call, reading a stream to its end."""
    try:
        reply = getattr(mesh.stubs[stage], method)(request, timeout=timeout)
        if method in STREAMING:
            events = list(reply)
            assert events and events[-1].WhichOneof("event") in ("latents", "result"), f"{method} ended early"
        return OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def serving(mesh, stage: str) -> bool:
    reply = health_pb2_grpc.HealthStub(mesh.channels[stage]).Check(health_pb2.HealthCheckRequest(), timeout=BOUND)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def answered(mesh, stage: str, method: str, request) -> grpc.StatusCode:
    """The property, for one request: a status the caller can act on, within BOUND, and the stage still SERVING."""
    t0 = time.perf_counter()
    code, details = call(mesh, stage, method, request)
    took = time.perf_counter() - t0
    assert code in ALLOWED, f"{stage}.{method} answered {code.name}: {details}"
    assert code == OK or details, f"{stage}.{method} answered {code.name} without saying why"
    # not, say, a status message too long to reach the caller ("received metadata size exceeds …")
    assert code != EXHAUSTED or "larger than max" in details, f"{stage}.{method} answered {code.name}: {details}"
    # a refusal comes at once; an accepted request may first compile the programs for its conditioning length
    # (a prompt of k 77-token chunks: one denoise program per k)
    bound = BOUND if code != OK else COMPILE_BOUND
    assert took < bound, f"{stage}.{method} took {took:.1f}s (> {bound}s) to answer {code.name}"
    assert serving(mesh, stage), f"{stage} is no longer SERVING"
    event(f"{code.name}: {details[:60]}")  # hypothesis' statistics: what the examples reached
    return code


def still_serves(mesh, stage: str) -> None:
    """After the fuzzing: SERVING, and every normal request answered OK."""
    assert serving(mesh, stage)
    for method, request in normal_requests(stage):
        code, details = call(mesh, stage, method, request)
        assert code == OK, f"a normal {stage}.{method} failed after the fuzzing: {code.name}: {details}"


# --- strategies: numbers, text ------------------------------------------------------------------------------

RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}


def integers(kind: str) -> st.SearchStrategy[int]:
    """Any integer of a protobuf type, the edges often."""
    low, high = RANGES[kind]
    edges = [v for v in (low, high, 0, 1, -1, 2**31 - 1, 2**32 - 1, 2**53 + 1, 2**63 - 1) if low <= v <= high]
    return st.sampled_from(edges) | st.integers(low, high)


floats32 = st.floats(width=32)  # NaN, ±inf, ±0, subnormals and 3.4e38 included
ODD_TEXTS = [
    "",
    "x" * 10_000,  # the longest prompt allowed
    "word " * 2000,
    "🙂" * 2_500,
    "e\u0301" * 300,  # combining accents
    "\u202eevil\u202c",  # right-to-left override
    "\u200b\ufeff\u2028\u2029",  # zero-width, byte-order mark, line and paragraph separators
    "\x00\x01\x7f\n\t\r",
    "\U0010ffff\ufffd\ufffe",
    "<|startoftext|><|endoftext|>",
    "漢字かなカナ한글",
]
texts = st.sampled_from(ODD_TEXTS) | st.text(max_size=40)  # valid prompts; st.text draws any code point but surrogates
too_long = st.sampled_from(["x" * 10_001, "🙂" * 10_001, "word " * 20_000])


@dataclasses.dataclass(frozen=True)
class Field:
    """A field's two strategies: `valid` values (cheap to serve; None leaves the field unset) and `bad` ones."""

    valid: st.SearchStrategy
    bad: st.SearchStrategy


def one_of(valid: list, bad: list) -> Field:
    return Field(st.sampled_from(valid), st.sampled_from(bad))


def near_valid(draw, cls, fields: dict[str, Field], *, most_broken: int = 2):
    """A message of `cls` with every field valid but at most `most_broken` of them, which are bad. A field of
    `cls` not in `fields` (one added since this file was written) is unset when valid and anything when bad."""
    fields = {f.name: fields.get(f.name) or Field(st.none(), field_values(f)) for f in cls.DESCRIPTOR.fields}
    breakable = sorted(name for name, field in fields.items() if not field.bad.is_empty)
    broken = draw(st.lists(st.sampled_from(breakable), max_size=most_broken, unique=True))
    message = cls()
    for name, field in fields.items():
        value = draw(field.bad if name in broken else field.valid)
        if value is None:
            continue
        if isinstance(value, Message):  # a Tensor, or any message field added since
            getattr(message, name).CopyFrom(value)
        elif isinstance(value, list):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


# --- strategies: tensors --------------------------------------------------------------------------------------

DTYPES = [tensor_pb2.FLOAT32, tensor_pb2.FLOAT16, tensor_pb2.BFLOAT16, tensor_pb2.INT32, tensor_pb2.INT64,
          tensor_pb2.UINT8]  # fmt: skip
ITEMSIZE = {tensor_pb2.FLOAT32: 4, tensor_pb2.FLOAT16: 2, tensor_pb2.BFLOAT16: 2, tensor_pb2.INT32: 4,
            tensor_pb2.INT64: 8, tensor_pb2.UINT8: 1}  # fmt: skip
NUMPY = {tensor_pb2.FLOAT32: "<f4", tensor_pb2.UINT8: "u1"}
MAX_ELEMENTS = 1 << 20  # data are generated up to this many elements; past it, the header lies
HUGE_DIMS = [-1, -(2**63), 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38]

any_dtype = st.sampled_from([*DTYPES, tensor_pb2.DTYPE_UNSPECIFIED, 7, 99, -1, 2**31 - 1])
lying_tensors = st.builds(
    tensor_pb2.Tensor,
    dtype=any_dtype,
    shape=st.lists(st.sampled_from([0, 1, 2, 3, 77, *HUGE_DIMS]) | integers("int64"), max_size=10),
    data=st.binary(max_size=64),
)  # headers and data that mostly disagree

Dim = tuple[list[int], list[int]]  # (sizes that are valid and cheap, sizes to be refused)


@st.composite
def tensor_values(draw, dims: list[Dim], *, dtype: int, low: float, high: float, broken: bool):
    shape = [draw(st.sampled_from(valid)) for valid, _ in dims]
    fault = draw(st.sampled_from(["size", "rank", "dtype", "value", "lie", "arbitrary"])) if broken else None
    if fault == "arbitrary":
        return draw(lying_tensors)
    if fault == "size":
        i = draw(st.integers(0, len(dims) - 1))
        shape[i] = draw(st.sampled_from(dims[i][1] + HUGE_DIMS[:2]))
    if fault == "rank":
        shape = draw(st.sampled_from([shape[:-1], [*shape, 1], [1, *shape], shape[:1], [], [1] * 9]))
    if fault == "dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if d != dtype] + [tensor_pb2.DTYPE_UNSPECIFIED, 42]))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if not 0 <= count <= MAX_ELEMENTS:  # cannot be backed by data: whatever is sent, the header lies
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=16)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype in NUMPY:
        values = rng.uniform(low, high, count).astype(NUMPY[dtype])
        if fault == "value" and count and dtype == tensor_pb2.FLOAT32:
            values[draw(st.integers(0, count - 1))] = draw(st.sampled_from(SPECIAL))
        data = values.tobytes()
    else:
        data = rng.bytes(count * ITEMSIZE.get(dtype, 4))
    if fault == "lie":
        data = data[: max(0, len(data) - draw(st.integers(1, 8)))] if data and draw(st.booleans()) else data + b"\0"
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def tensors(
    dims: list[Dim], *, dtype: int = tensor_pb2.FLOAT32, low: float = -3.0, high: float = 3.0, optional: bool = False
) -> Field:
    """A tensor as the RPC takes it (each size one of its dim's valid ones, values in [low, high]) or one with one
    thing wrong: a size, the rank, the dtype, a NaN/inf/huge value, data that disagree with the header by a few
    bytes, or a header and data that are arbitrary. `optional`: the valid tensor may be absent."""
    valid = tensor_values(dims, dtype=dtype, low=low, high=high, broken=False)
    return Field(
        st.none() | valid if optional else valid, tensor_values(dims, dtype=dtype, low=low, high=high, broken=True)
    )


# --- strategies: image files ----------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height RGB pixels, followed by a few bytes of pixel data."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


@functools.cache
def zeros_png(side: int = 20_000) -> bytes:
    """A real side × side PNG of zeros (1-bit, so it is made fast): a few tens of kB that would decode to 400 M
    pixels."""
    return png(Image.new("1", (side, side)), optimize=False, compress_level=9)


def _npy(shape: tuple, descr: str, body: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


@st.composite
def image_files(draw, gray: bool = False):
    """The bytes of an image field: a valid 16×16 PNG or JPEG (the only valid size: others would compile), or one
    that must be refused: another size, a huge declared or real size, transparency, an odd mode, truncated,
    corrupt, not an image at all."""
    seed = draw(st.integers(0, 2**16))
    image = rgb(seed).convert("L") if gray else rgb(seed)
    kinds = {
        "png": lambda: png(image),
        "jpeg": lambda: png(image.convert("RGB"), format="JPEG", quality=draw(st.integers(1, 95))),
        "gray": lambda: png(image.convert("L")),
        "palette": lambda: png(image.convert("RGB").convert("P")),
        "opaque alpha": lambda: png(image.convert("RGBA")),
        "transparent": lambda: png(Image.new("RGBA", (SIZE, SIZE), (1, 2, 3, 0))),
        "16-bit": lambda: png(Image.fromarray(np.full((SIZE, SIZE), 4000, np.uint16))),
        "1-bit": lambda: png(image.convert("1")),
        "cmyk jpeg": lambda: png(image.convert("RGB").convert("CMYK"), format="JPEG"),
        "other size": lambda: png(rgb(seed, draw(st.sampled_from([(15, 16), (16, 17), (1, 1), (4098, 2), (2, 4098)])))),
        "declared 100000²": lambda: png_declaring(100_000, 100_000),
        "declared": lambda: png_declaring(draw(integers("uint32")), draw(integers("uint32"))),
        "zeros 20000²": zeros_png,
        "truncated": lambda: (lambda b: b[: draw(st.integers(0, len(b) - 1))])(png(image)),
        "bit flip": lambda: (lambda b, i: b[:i] + bytes([b[i] ^ 0x10]) + b[i + 1 :])(
            png(image), draw(st.integers(0, 200))
        ),
        "text bomb": lambda: (
            png(image)[:33] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (2 << 20))) + png(image)[33:]
        ),
        "png magic": lambda: b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=64)),
        "jpeg magic": lambda: b"\xff\xd8\xff" + draw(st.binary(max_size=64)),
        "garbage": lambda: draw(st.binary(min_size=1, max_size=128)),
        "npy": lambda: draw(npy_files()),
    }
    return kinds[draw(st.sampled_from(sorted(kinds)))]()


@st.composite
def npy_files(draw):
    """A .npy depth map: well-formed or not, with a sane or a huge declared shape, data that fit it or not."""
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 8, SIZE, 5000, 100_000, 2**40]), min_size=0, max_size=4)))
    descr = draw(st.sampled_from(["<f4", ">f8", "<f2", "|u1", "<i8", "|b1", "<c8", "|O", "<U2", "|V4"]))
    count = math.prod(shape)
    itemsize = np.dtype(descr).itemsize
    body = np.random.default_rng(0).bytes(count * itemsize) if count * itemsize <= 1 << 16 else b""
    if draw(st.booleans()) and body:
        body = body[:-1]
    if draw(st.integers(0, 5)) == 0:
        return b"\x93NUMPY" + draw(st.binary(max_size=64))
    return _npy(shape, descr, body)


# --- strategies: messages --------------------------------------------------------------------------------------

_SCALARS = {
    "TYPE_DOUBLE": floats32,
    "TYPE_FLOAT": floats32,
    "TYPE_INT32": integers("int32"),
    "TYPE_SINT32": integers("int32"),
    "TYPE_SFIXED32": integers("int32"),
    "TYPE_INT64": integers("int64"),
    "TYPE_SINT64": integers("int64"),
    "TYPE_SFIXED64": integers("int64"),
    "TYPE_UINT32": integers("uint32"),
    "TYPE_FIXED32": integers("uint32"),
    "TYPE_UINT64": integers("uint64"),
    "TYPE_FIXED64": integers("uint64"),
    "TYPE_BOOL": st.booleans(),
    "TYPE_STRING": texts,
    "TYPE_BYTES": st.binary(max_size=64) | image_files(),
    "TYPE_ENUM": integers("int32"),
}


def field_values(field, depth: int = 0) -> st.SearchStrategy:
    """Any value of a field, by its type; Tensors with headers that lie; lists of up to 2 (rows stay cheap)."""
    type_name = next(n for n in _SCALARS | {"TYPE_MESSAGE": 0} if getattr(field, n) == field.type)
    if type_name == "TYPE_MESSAGE":
        if field.message_type.full_name == "sdmesh.v1.Tensor":
            value = tensor_values([([0, 1, 2, 3], [])] * 4, dtype=tensor_pb2.FLOAT32, low=-3, high=3, broken=True)
        else:
            value = messages(field.message_type._concrete_class, depth=depth + 1) if depth < 2 else st.nothing()
    else:
        value = _SCALARS[type_name]
    return st.lists(value, max_size=2) if field.is_repeated else value


def messages(cls, depth: int = 0, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """Any message of type `cls`: each field absent or any value of its type (`fields`: a field's own strategy,
    None being absent). Fields this file does not know yet are covered as they are added to the protos."""
    strategies = {f.name: fields.get(f.name, field_values(f, depth)) for f in cls.DESCRIPTOR.fields}
    return st.fixed_dictionaries({}, optional=strategies).map(
        lambda kw: cls(**{k: v for k, v in kw.items() if v is not None})
    )


# --- the stages -------------------------------------------------------------------------------------------------

ROWS = ([1, 2], [0, 65, 2**31])
LATENT_SIDE = ([LATENT], [0, 2049, 2**31])  # 9 would be valid, and compile a new program
PIXEL_SIDE = ([SIZE], [0, 1, 15, 17, 4098])
SAMPLER = Field(st.sampled_from(["", *SAMPLERS]), texts.filter(lambda s: s not in ("", *SAMPLERS)))
PRIORITY = Field(st.integers(-(2**31) + 1, 2**31 - 1), st.just(-(2**31)))
STEPS = Field(st.integers(1, 3), st.sampled_from([MAX_STEPS + 1, 2**31, 2**32 - 1]))  # 0 is valid in Generate: 50
NAN = float("nan")
GUIDANCE = Field(
    st.sampled_from([0.0, 1.0, 7.5]) | st.floats(-1000, 1000, width=32),
    st.sampled_from([NAN, 1001.0]) | st.floats(min_value=1000, exclude_min=True, width=32)
    | st.floats(max_value=-1000, exclude_max=True, width=32),
)  # fmt: skip
RESCALE = Field(st.floats(0, 1, width=32), st.sampled_from([NAN, -0.5, 1.5, float("inf")]))
ETA = Field(st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([NAN, -1.0, 1001.0, float("-inf"), 3.4e38]))
STRENGTH = Field(st.sampled_from([None, 1.0, 0.75, 0.5]), st.sampled_from([NAN, 0.0, -0.0, -1.0, 1.0001, 3.4e38]))
SEED = Field(integers("uint64"), st.nothing())


@st.composite
def encode_requests(draw):
    if not draw(st.integers(0, 4)):
        return draw(messages(text_encoder_pb2.EncodeRequest))
    n, unconditional = draw(st.sampled_from([1, 2])), draw(st.booleans())
    negatives = st.just([]) | st.lists(texts, min_size=n, max_size=n) if unconditional else st.just([])
    many = st.integers(65, 300).map(lambda k: ["a"] * k)
    fields = dict(
        prompts=Field(st.lists(texts, min_size=n, max_size=n), st.just([]) | many | st.lists(too_long, min_size=1)),
        negative_prompts=Field(negatives, st.lists(texts | too_long, min_size=1, max_size=4)),
        unconditional=Field(st.just(unconditional), st.just(not unconditional)),
    )
    return near_valid(draw, text_encoder_pb2.EncodeRequest, fields)


@st.composite
def denoise_requests(draw):
    n = draw(st.sampled_from(ROWS[0]))
    cond = tensors([([n], ROWS[1]), ([L], [0, 1025]), ([D], [0, 31, 33])])
    latents = tensors([([n], ROWS[1]), ([C], [0, 3, 5]), LATENT_SIDE, LATENT_SIDE])
    init_latents = draw(st.booleans())
    fields = dict(
        cond=Field(cond.valid, st.none() | cond.bad),
        uncond=Field(st.none() | cond.valid, cond.bad),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        guidance_rescale=RESCALE,
        eta=ETA,
        noise_seed=SEED,
        sampler=SAMPLER,
        priority=PRIORITY,
        init_latents=Field(latents.valid if init_latents else st.none(), latents.bad),
        strength=Field(STRENGTH.valid if init_latents else st.none(), STRENGTH.bad),
        extra=Field(st.none(), tensors([([n], []), ([1], [0]), LATENT_SIDE, LATENT_SIDE]).valid),
        blend_mask=Field(
            tensors([([n], []), ([1], []), LATENT_SIDE, LATENT_SIDE], low=0, high=1, optional=True).valid
            if init_latents
            else st.none(),
            tensors([([n], ROWS[1]), ([1], [0, 2]), LATENT_SIDE, LATENT_SIDE], low=0, high=1).bad,
        ),
        class_labels=Field(st.none(), tensors([([n], [0])]).valid),
    )
    if draw(st.booleans()):  # from given latents: the size is theirs, and height and width may only repeat it
        fields |= dict(latents=latents, height=one_of([0, SIZE], [LATENT, SIZE + 2]), width=one_of([0, SIZE], [1]))
    else:
        side = one_of([0, SIZE], PIXEL_SIDE[1][1:] + [8192, 2**32 - 1])
        fields |= dict(seed=Field(integers("uint64"), st.none()), height=side, width=side)
    return near_valid(draw, denoiser_pb2.DenoiseRequest, fields)


@st.composite
def decode_requests(draw):
    if not draw(st.integers(0, 4)):
        return draw(messages(decoder_pb2.DecodeRequest))
    latents = tensors([ROWS, ([C], [0, 3, 5]), LATENT_SIDE, LATENT_SIDE])
    return near_valid(draw, decoder_pb2.DecodeRequest, dict(latents=Field(latents.valid, st.none() | latents.bad)))


@st.composite
def encode_image_requests(draw):
    if not draw(st.integers(0, 4)):
        return draw(messages(decoder_pb2.EncodeImageRequest))
    dtype = draw(st.sampled_from([tensor_pb2.UINT8, tensor_pb2.FLOAT32]))
    images = tensors([([1], [0, 65]), PIXEL_SIDE, PIXEL_SIDE, ([3], [1, 4])], dtype=dtype, low=-1.0, high=1.0)
    fields = dict(
        images=Field(images.valid, st.none() | images.bad),
        seed=Field(st.none() | integers("uint64"), st.nothing()),
        stream=Field(integers("uint32"), st.nothing()),
    )
    return near_valid(draw, decoder_pb2.EncodeImageRequest, fields)


@st.composite
def generate_requests(draw):
    """Valid ones are cheap: 1 to 3 steps, 1 or 2 images, 16×16; an image 16×16, or broken."""
    cheap = dict(
        num_images=st.sampled_from([0, 1, 2, 65, 2**32 - 1]),
        num_inference_steps=st.sampled_from([1, 2, 3, MAX_STEPS + 1, 2**32 - 1]),
        height=st.sampled_from([0, SIZE, 1, 15, 17, 4098, 2**32 - 1]),
        width=st.sampled_from([0, SIZE, 1, 15, 17, 4098, 2**32 - 1]),
    )
    if not draw(st.integers(0, 4)):
        return draw(messages(gateway_pb2.GenerateRequest, **cheap))
    image = draw(st.sampled_from([None, "img2img", "inpainting"]))
    init = Field(st.builds(lambda s: png(rgb(s)), st.integers(0, 99)) if image else st.none(), image_files())
    mask = Field(
        st.builds(lambda s: png(rgb(s).convert("L")), st.integers(0, 99)) if image == "inpainting" else st.none(),
        image_files(gray=True),
    )
    fields = dict(
        prompt=Field(texts, too_long),
        negative_prompt=Field(texts, too_long),
        num_images=one_of([0, 1, 2], [65, 2**32 - 1]),
        num_inference_steps=STEPS,
        guidance_scale=Field(st.none() | GUIDANCE.valid, GUIDANCE.bad),
        guidance_rescale=RESCALE,
        height=one_of([0, SIZE], PIXEL_SIDE[1][1:] + [2**32 - 1]),
        width=one_of([0, SIZE], PIXEL_SIDE[1][1:] + [2**32 - 1]),
        seed=Field(st.none() | integers("uint64"), st.nothing()),
        eta=ETA,
        sampler=SAMPLER,
        priority=PRIORITY,
        init_image=init,
        mask_image=mask,
        strength=Field(STRENGTH.valid if image else st.none(), STRENGTH.bad | STRENGTH.valid),
        depth_map=Field(st.none(), npy_files() | image_files(gray=True)),
        noise_level=Field(st.none(), integers("uint32")),
    )
    return near_valid(draw, gateway_pb2.GenerateRequest, fields)


# --- the tests: one per RPC ---------------------------------------------------------------------------------------


def test_text_encoder_encode_answers_every_request(mesh):
    @settings(fuzz, max_examples=100)
    @given(encode_requests())
    def one(request):
        answered(mesh, "encoder", "Encode", request)

    one()
    still_serves(mesh, "encoder")


def test_denoiser_denoise_answers_every_request(mesh):
    @settings(fuzz, max_examples=150)
    @given(denoise_requests())
    def one(request):
        answered(mesh, "denoiser", "Denoise", request)

    one()
    still_serves(mesh, "denoiser")


def test_decoder_decode_answers_every_request(mesh):
    @fuzz
    @given(decode_requests())
    def one(request):
        answered(mesh, "decoder", "Decode", request)

    one()
    still_serves(mesh, "decoder")


def test_decoder_encode_image_answers_every_request(mesh):
    @fuzz
    @given(encode_image_requests())
    def one(request):
        answered(mesh, "decoder", "EncodeImage", request)

    one()
    still_serves(mesh, "decoder")


def test_gateway_generate_answers_every_request(mesh):
    @settings(fuzz, max_examples=300)
    @example(gateway_pb2.GenerateRequest(prompt="a cat", init_image=png_declaring(100_000, 100_000)))
    @example(gateway_pb2.GenerateRequest(prompt="a cat", init_image=zeros_png(), mask_image=zeros_png()))
    @example(gateway_pb2.GenerateRequest(prompt="a cat", depth_map=_npy((100_000, 100_000), "<f8", b"")))
    @example(gateway_pb2.GenerateRequest(prompt="a cat", sampler="🙂" * 2500))
    @given(generate_requests())
    def one(request):
        answered(mesh, "gateway", "Generate", request)

    one()
    still_serves(mesh, "gateway")


def unknown_fields() -> st.SearchStrategy[bytes]:
    """Well-formed protobuf bytes of fields no message here has (numbers 1000 and up): parsed and ignored."""
    varint = st.integers(0, 2**64 - 1).map(_varint)
    field = st.tuples(st.integers(1000, 2**29 - 1), st.sampled_from([0, 2])).flatmap(
        lambda nt: (varint if nt[1] == 0 else st.binary(max_size=32).map(lambda b: _varint(len(b)) + b)).map(
            lambda payload: _varint(nt[0] << 3 | nt[1]) + payload
        )
    )
    return st.lists(field, max_size=4).map(b"".join)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@pytest.mark.parametrize("stage", ["encoder", "denoiser", "decoder", "gateway"])
def test_model_info_answers_any_request(mesh, stage):
    service = {"encoder": "TextEncoder", "denoiser": "Denoiser", "decoder": "Decoder", "gateway": "Gateway"}[stage]
    model_info = mesh.channels[stage].unary_unary(
        f"/sdmesh.v1.{service}/ModelInfo",
        request_serializer=bytes,
        response_deserializer=common_pb2.ModelInfo.FromString,
    )

    @settings(fuzz, max_examples=15)
    @given(unknown_fields())
    def one(request):
        t0 = time.perf_counter()
        info = model_info(request, timeout=BOUND)
        assert info.service == service and time.perf_counter() - t0 < BOUND
        assert serving(mesh, stage)

    one()
    still_serves(mesh, stage)


RPCS = [
    ("encoder", "TextEncoder", "Encode"),
    ("denoiser", "Denoiser", "Denoise"),
    ("decoder", "Decoder", "Decode"),
    ("decoder", "Decoder", "EncodeImage"),
    ("gateway", "Gateway", "Generate"),
]


def test_bytes_that_are_no_message_are_invalid_argument(mesh):
    @settings(fuzz, max_examples=20)
    @given(st.sampled_from(RPCS), st.binary(min_size=1, max_size=64))
    def one(rpc, data):
        stage, service, method = rpc
        path = f"/sdmesh.v1.{service}/{method}"
        channel = mesh.channels[stage]
        raw = channel.unary_stream(path) if method in STREAMING else channel.unary_unary(path)
        t0 = time.perf_counter()
        try:
            reply = raw(data, timeout=2 * BOUND)
            if method in STREAMING:
                list(reply)
            code, details = OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        assert code in ALLOWED, f"{stage}.{method} answered {code.name}: {details}"
        assert time.perf_counter() - t0 < BOUND and serving(mesh, stage)

    one()
