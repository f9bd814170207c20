"""Request images become exactly the arrays diffusers' image and mask processors make, or a clear refusal."""

from __future__ import annotations

import io

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


def test_bad_depth_maps_are_refused():
    refused("color image", images.decode_depth, png(rgb(8, 8)))
    refused("constant", images.decode_depth, npy(np.ones((8, 8), np.float32)))
    refused("NaN or infinite", images.decode_depth, npy(np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)))
    refused(r"expected a float array \(H, W\) or \(N, H, W\)", images.decode_depth, npy(np.zeros((1, 1, 8, 8))))
    refused("not a readable .npy", images.decode_depth, npy(np.array([{"a": 1}], dtype=object)))
