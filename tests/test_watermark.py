"""The SD 2 invisible watermark: the same pixels Stability's txt2img.py writes, and it reads back.

The reference is the invisible-watermark package (imwatermark) called exactly as Stability-AI/stablediffusion's
scripts/txt2img.py calls it in `put_watermark`. Importing it imports torch, which the dev extra has.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

from sdmesh.services import watermark
from sdmesh.services.watermark import apply_watermark, can_watermark, read_watermark


def natural(height: int, width: int, seed: int = 0, contrast: float = 40.0) -> np.ndarray:
    """(H, W, 3) uint8 RGB with a natural image's 1/f amplitude spectrum in each channel."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, *f.shape)) + 1j * rng.normal(size=(3, *f.shape))) / f
    spectrum[:, 0, 0] = 0.0
    channels = np.fft.irfft2(spectrum, s=(height, width)).transpose(1, 2, 0)  # (H, W, 3)
    return np.clip(channels / channels.std() * contrast + 128, 0, 255).astype(np.uint8)


def stabilitys_put_watermark(rgb: np.ndarray) -> np.ndarray:
    """txt2img.py's encoder setup and put_watermark, line for line (PIL in, PIL out)."""
    wm_encoder = WatermarkEncoder()
    wm_encoder.set_watermark("bytes", b"SDV2")  # wm = "SDV2"; wm.encode("utf-8")
    img = Image.fromarray(rgb)
    img = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR)
    img = wm_encoder.encode(img, "dwtDct")
    return np.array(Image.fromarray(img[:, :, ::-1]))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


SIZES = [(256, 256), (512, 512), (384, 640)]  # (H, W)


@pytest.mark.parametrize("size", SIZES + [(515, 258), (130, 520)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_marked_pixels_are_byte_identical_to_stabilitys_script(size):
    # 515×258 and 130×520 are not multiples of 4 or 8: the crops at the edges match too.
    image = natural(*size)
    np.testing.assert_array_equal(apply_watermark(image[None])[0], stabilitys_put_watermark(image))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_marked_image_reads_back_sdv2(size):
    marked = apply_watermark(natural(*size, seed=1)[None])[0]
    assert read_watermark(marked, 32) == b"SDV2"


@pytest.mark.parametrize("seed", [0, 1])
def test_reading_agrees_with_the_packages_decoder_on_marked_and_unmarked_images(seed):
    image = natural(512, 512, seed=seed)
    for candidate in (image, apply_watermark(image[None])[0]):
        bgr = np.ascontiguousarray(candidate[..., ::-1])
        assert read_watermark(candidate, 32) == WatermarkDecoder("bytes", 32).decode(bgr, "dwtDct")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_unmarked_image_does_not_read_back_sdv2(seed):
    assert read_watermark(natural(512, 512, seed=seed), 32) != b"SDV2"


def test_the_change_is_invisible_in_luma_and_small_in_rgb():
    # The mark moves only the U (blue-difference) plane; luma changes by conversion rounding alone (measured
    # 68.2-71.8 dB over seeds 0-5 and these sizes). RGB PSNR measured 24.9-26.3 dB on these textured images, nearly
    # all of it the package reconstructing with the horizontal and vertical details swapped (that alone measures
    # 25.1-26.1 dB); smoother images lose less (about 33 dB on gradients with σ = 8 noise).
    for size in SIZES:
        image = natural(*size, seed=2)
        marked = apply_watermark(image[None])[0]
        luma = [cv2.cvtColor(x, cv2.COLOR_RGB2YUV)[..., 0] for x in (image, marked)]
        assert psnr(*luma) > 60.0
        assert psnr(image, marked) > 24.0


def test_a_batch_is_marked_image_by_image():
    batch = np.stack([natural(256, 384, seed=s) for s in (3, 4)])
    marked = apply_watermark(batch)
    assert marked.shape == batch.shape and marked.dtype == np.uint8
    for image, expected in zip(batch, marked):
        np.testing.assert_array_equal(apply_watermark(image[None])[0], expected)


def test_another_message_round_trips():
    marked = apply_watermark(natural(512, 512, seed=5)[None], message=b"sdmesh")[0]
    assert read_watermark(marked, 48) == b"sdmesh"


def test_the_size_limit_is_the_packages_area_rule():
    # The package compares H·W with 256·256, so a 128×512 image is markable and 255×256 is not.
    assert can_watermark(256, 256) and can_watermark(128, 512)
    assert not can_watermark(255, 256)
    WatermarkEncoder(b"SDV2").encode(natural(128, 512), "dwtDct")
    with pytest.raises(RuntimeError, match="too small"):
        WatermarkEncoder(b"SDV2").encode(natural(255, 256), "dwtDct")


def test_a_too_small_image_is_refused_naming_the_limit():
    with pytest.raises(ValueError, match=r"256×256"):
        apply_watermark(natural(255, 256)[None])
    with pytest.raises(ValueError, match=r"too small"):
        read_watermark(natural(128, 128), 32)


def test_a_message_needs_a_block_per_bit():
    # 8×8192 has the area but a single row of 1024 blocks: 1024 bits fit, 1032 do not.
    assert can_watermark(8, 8192, 1024) and not can_watermark(8, 8192, 1032)
    with pytest.raises(ValueError, match="block per bit"):
        apply_watermark(np.zeros((1, 8, 8192, 3), np.uint8), message=bytes(129))


@pytest.mark.parametrize(
    "images", [np.zeros((256, 256, 3), np.uint8), np.zeros((1, 256, 256, 4), np.uint8), np.zeros((1, 256, 256, 3))]
)
def test_apply_watermark_takes_nhwc_uint8_rgb_only(images):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8 RGB"):
        apply_watermark(images)


@pytest.mark.parametrize("bits", [0, 31, -8])
def test_the_length_to_read_is_a_positive_multiple_of_eight(bits):
    with pytest.raises(ValueError, match="multiple of 8"):
        read_watermark(natural(256, 256), bits)


def test_without_pywavelets_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pywt", None)  # makes `import pywt` raise ImportError
    with pytest.raises(ImportError, match="pip install PyWavelets"):
        watermark.apply_watermark(natural(256, 256)[None])
