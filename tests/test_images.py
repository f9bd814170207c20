"""Request images become exactly the arrays diffusers' image and mask processors make, or a clear refusal."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
from PIL import Image

from sdmesh.services.inputs import contract, images
from sdmesh.services.inputs.errors import InvalidRequest

RNG = np.random.default_rng(0)


def png(array_or_image, mode: str | None = None, **save) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image, mode)
    buf = io.BytesIO()
    image.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def nhwc(t) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


# ---------------------------------------------------------------- parity with diffusers


def test_image_preprocessing_equals_vae_image_processor():
    """StableDiffusionImg2ImgPipeline: image_processor.preprocess(PIL image) → [-1, 1] float32, bit for bit."""
    pixels = rgb()
    expected = nhwc(VaeImageProcessor(vae_scale_factor=8).preprocess(Image.fromarray(pixels)))
    actual = images.preprocess_image(images.decode_image(png(pixels)))
    assert actual.dtype == np.float32 and actual.shape == (1, 24, 32, 3)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(("resample", "size"), [("lanczos", (40, 48)), ("lanczos", (16, 16)), ("bicubic", (12, 20))])
def test_resize_equals_the_processors_resize(resample, size):
    """With height/width given the processor resizes the PIL image first (lanczos; the x4 upscaler's: bicubic)."""
    pixels = rgb()
    processor = VaeImageProcessor(vae_scale_factor=4, resample=resample)
    expected = nhwc(processor.preprocess(Image.fromarray(pixels), height=size[0], width=size[1]))
    actual = images.preprocess_image(images.resize(pixels, *size, resample=resample))
    np.testing.assert_array_equal(actual, expected)


def test_mask_preprocessing_equals_the_inpaint_mask_processor():
    """StableDiffusionInpaintPipeline.mask_processor: grayscale (PIL "L"), no normalisation, binarized at 0.5."""
    mask_rgb = rgb()
    mask_rgb[0, :4] = [[127, 127, 127], [128, 128, 128], [0, 0, 0], [255, 255, 255]]  # either side of the threshold
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = nhwc(processor.preprocess(Image.fromarray(mask_rgb)))
    actual = images.preprocess_mask(images.decode_mask(png(mask_rgb)))
    assert actual.shape == (1, 24, 32, 1)
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(actual[0, 0, :4, 0], [0, 1, 0, 1])


def test_grayscale_mask_is_read_as_is():
    gray = RNG.integers(0, 256, (16, 8), dtype=np.uint8)
    np.testing.assert_array_equal(images.decode_mask(png(gray)), gray)


def test_exif_orientation_is_applied_like_load_image(tmp_path):
    """A phone JPEG stored sideways with an EXIF rotation comes out the right way up,
    as diffusers.utils.load_image does."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    data = png(Image.fromarray(rgb(16, 32)), format="JPEG", exif=exif.tobytes())
    (tmp_path / "photo.jpg").write_bytes(data)
    expected = np.asarray(load_image(str(tmp_path / "photo.jpg")))
    actual = images.decode_image(data)
    assert actual.shape == (32, 16, 3)
    np.testing.assert_array_equal(actual, expected)


# ------------------------------------------------------------------- accepted modes


def test_grayscale_and_palette_images_become_rgb():
    gray = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(images.decode_image(png(gray)), np.stack([gray] * 3, axis=-1))
    palette = Image.fromarray(rgb(8, 8)).convert("P")
    np.testing.assert_array_equal(images.decode_image(png(palette)), np.asarray(palette.convert("RGB")))


def test_fully_opaque_alpha_is_dropped():
    pixels = rgb(8, 8)
    rgba = np.concatenate([pixels, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(images.decode_image(png(rgba)), pixels)


# ------------------------------------------------------------------------- refusals


def refused(match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(InvalidRequest, match=match):
        fn(*args, **kwargs)


def test_transparency_is_refused_naming_the_fix():
    rgba = np.concatenate([rgb(8, 8), np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    rgba[0, 0, 3] = 0
    refused("transparent pixels.*convert\\('RGB'\\)", images.decode_image, png(rgba))
    refused("transparent pixels.*brightness, not alpha", images.decode_mask, png(rgba))
    palette = Image.fromarray(rgb(8, 8)).convert("P")
    refused("transparent pixels", images.decode_image, png(palette, transparency=palette.getpixel((0, 0))))


def test_16_bit_grayscale_image_and_cmyk_are_refused():
    refused("16-bit or float", images.decode_image, png(Image.fromarray(np.full((8, 8), 4000, np.uint16))))
    refused("mode CMYK.*convert it to RGB", images.decode_image, png(Image.new("CMYK", (8, 8)), format="JPEG"))
    refused("8-bit grayscale", images.decode_mask, png(Image.fromarray(np.full((8, 8), 4000, np.uint16))))


def test_not_an_image_is_refused():
    refused("not a PNG or JPEG", images.decode_image, b"GIF89a not really")
    refused("empty", images.decode_image, b"")
    refused("truncated or corrupt", images.decode_image, png(rgb(64, 64))[:200])


def test_oversized_image_is_refused_before_decoding():
    refused("8×5000; the largest side allowed is 4096", images.decode_image, png(Image.new("L", (8, 5000))))
    refused("largest side allowed is 16", images.decode_image, png(rgb(8, 24)), max_side=16)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height RGB pixels, with hardly any pixel data after it."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("decode", [images.decode_image, images.decode_mask, images.decode_depth])
def test_a_huge_image_is_refused_by_its_header_naming_its_size_and_the_limit(decode):
    """Past ~179 M pixels PIL's Image.open raises DecompressionBombError (a warning past ~89 M) before anyone sees
    the size; the header is read first, so the caller learns the size and the limit, and nothing is decompressed."""
    zeros = png(Image.new("1", (20_000, 20_000)), compress_level=9)  # real, and a few tens of kB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        refused("100000×100000; the largest side allowed is 4096", decode, png_declaring(100_000, 100_000))
        refused("20000×20000; the largest side allowed is 4096", decode, zeros)
        refused(f"5000×8; the largest side allowed is {contract.MAX_SIDE}", decode, png_declaring(5000, 8))


def test_a_header_that_cannot_be_read_is_refused_as_corrupt():
    text_bomb = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (2 << 20)))  # past PIL's 1 MB text limit
    valid = png(rgb(8, 8))
    refused("header could not be read.*MAX_TEXT_CHUNK.*truncated or corrupt", images.decode_image,
            valid[:33] + text_bomb + valid[33:])  # fmt: skip
    refused("header could not be read.*truncated or corrupt", images.decode_image, b"\xff\xd8\xff\xe0\0\x10JFIF\0")
    refused("header could not be read.*checksum", images.decode_image, valid[:29] + b"\0" + valid[30:])


def test_size_checks_name_the_multiple_and_a_size_that_works():
    contract.check_size(64, 96, multiple=8, what="image")
    refused(
        "height is 60; it must be a multiple of 8.*e.g. to 56", contract.check_size, 60, 96, multiple=8, what="image"
    )
    refused("width is 4104", contract.check_size, 64, 4104, multiple=8, what="image")
    refused("width is 2; it must be a multiple of 4", contract.check_size, 64, 2, multiple=4, what="image")


# ------------------------------------------------------------------------ depth maps


def test_depth_from_16_bit_and_8_bit_png_keeps_the_raw_values():
    deep = RNG.integers(0, 65536, (12, 20), dtype=np.uint16)
    out = images.decode_depth(png(Image.fromarray(deep)))
    assert out.dtype == np.float32 and out.shape == (12, 20)
    np.testing.assert_array_equal(out, deep.astype(np.float32))
    shallow = RNG.integers(0, 256, (12, 20), dtype=np.uint8)
    np.testing.assert_array_equal(images.decode_depth(png(shallow)), shallow.astype(np.float32))
    np.testing.assert_array_equal(images.decode_depth(png(np.stack([shallow] * 3, -1))), shallow.astype(np.float32))


def test_depth_from_npy():
    depth = RNG.random((2, 12, 20)).astype(np.float64)
    buf = io.BytesIO()
    np.save(buf, depth)
    out = images.decode_depth(buf.getvalue())
    assert out.dtype == np.float32 and out.shape == (2, 12, 20)
    np.testing.assert_array_equal(out, depth.astype(np.float32))


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_a_npy_header_is_checked_before_its_array_is_allocated():
    """np.load would allocate what the header declares (80 GB here) before finding the data missing."""
    refused("100000×100000; the largest side allowed is 4096", images.decode_depth, npy_header((100_000, 100_000)))
    refused("declares float64 \\(8, 8\\) \\(512 bytes\\) but 511 bytes follow", images.decode_depth,
            npy_header((8, 8)) + b"\0" * 511)  # fmt: skip
    refused("Python objects, never unpickled", images.decode_depth, npy_header((2, 2), "|O"))
    fortran = RNG.random((12, 20))
    np.testing.assert_array_equal(images.decode_depth(npy(np.asfortranarray(fortran))), fortran.astype(np.float32))


def test_a_decoders_long_complaint_is_cut_short():
    """A status message past ~8 kB never reaches the caller: numpy quotes a whole malformed header (up to 10 kB)."""
    header = b"{" + b"x" * 9000 + b"}\n"
    with pytest.raises(InvalidRequest, match=r"not a readable \.npy array") as e:
        images.decode_depth(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
    assert len(str(e.value)) < 400


def test_bad_depth_maps_are_refused():
    refused("color image", images.decode_depth, png(rgb(8, 8)))
    refused("constant", images.decode_depth, npy(np.ones((8, 8), np.float32)))
    refused("NaN or infinite", images.decode_depth, npy(np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)))
    refused(r"expected a float array \(H, W\) or \(N, H, W\)", images.decode_depth, npy(np.zeros((1, 1, 8, 8))))
    refused("not a readable .npy", images.decode_depth, npy(np.array([{"a": 1}], dtype=object)))
