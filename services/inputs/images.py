"""Request images → arrays: the input side of img2img, inpainting, depth and upscaling. JAX-free.

Each function takes what a caller sends (PNG/JPEG bytes, or a .npy for depth) and returns
exactly the arrays diffusers' pipelines feed their models, NHWC instead of NCHW:

    decode_image(data)      → (H, W, 3) uint8 RGB      (diffusers.utils.load_image: EXIF-rotated, RGB)
    decode_mask(data)       → (H, W) uint8 luminance   (the mask processor's convert("L"))
    decode_depth(data)      → (H, W) float32 depth     (StableDiffusionDepth2ImgPipeline's `depth_map`)
    resize(...)             → the PIL resize VaeImageProcessor does when height/width are given
    preprocess_image(rgb)   → (N, H, W, 3) float32 in [-1, 1]  (VaeImageProcessor.preprocess)
    preprocess_mask(gray)   → (N, H, W, 1) float32 in {0, 1}   (the inpaint pipeline's mask processor)

Everything a caller can get wrong raises `InvalidRequest` naming the problem and the fix.
"""

from __future__ import annotations

import io
import math
from typing import cast

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin

from sdmesh.services.inputs.contract import MAX_SIDE
from sdmesh.services.inputs.errors import InvalidRequest

FORMATS = ("PNG", "JPEG")
# Each format's signature → PIL's parser for it, which reads only the header when constructed. Image.open runs the
# same parsers but then refuses a large image (DecompressionBombError past ~179 M pixels, a warning past ~89 M)
# before its caller sees the size (a 20000×20000 PNG of zeros can be a few tens of kB): so `_open` parses the
# header itself and checks the size against the contract's limit first.
_PARSERS = {b"\x89PNG\r\n\x1a\n": PngImagePlugin.PngImageFile, b"\xff\xd8\xff": JpegImagePlugin.jpeg_factory}
_NPY_MAGIC = b"\x93NUMPY"
# VaeImageProcessor's `resample` names → PIL filters (diffusers' PIL_INTERPOLATION).
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


# --------------------------------------------------------------------------- decoding


def _open(data: bytes, what: str, max_side: int) -> Image.Image:
    """Parse the header only, check the size, then decode: a huge image is refused before it is decompressed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise InvalidRequest(f"{what} is empty; send the bytes of a PNG or JPEG file")
    data = bytes(data)
    parse = next((p for magic, p in _PARSERS.items() if data.startswith(magic)), None)
    if parse is None:
        raise InvalidRequest(f"{what} is not a PNG or JPEG file; convert it to PNG (lossless) and send its bytes")
    try:
        image = parse(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # a truncated header, a bad checksum, or a text/ICC chunk that decompresses past PIL's limit (ValueError)
        raise InvalidRequest(
            f"{what}'s header could not be read ({_why(e)}); the file is truncated or corrupt: send the file as saved"
        ) from None
    w, h = image.size
    if max(w, h) > max_side:
        raise InvalidRequest(f"{what} is {w}×{h}; the largest side allowed is {max_side}: downscale it first")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated or corrupt data
        raise InvalidRequest(f"{what} could not be decoded ({_why(e)}); the file is truncated or corrupt") from None
    # load_image applies the camera's EXIF orientation, so a phone photo is the right way up.
    return ImageOps.exif_transpose(image)


def _why(error: Exception, limit: int = 200) -> str:
    """A decoder's complaint, cut short: numpy quotes a whole malformed .npy header (up to 10 kB), and a status
    message past ~8 kB never reaches the caller."""
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "…"


def _opaque(image: Image.Image, what: str, fix: str) -> Image.Image:
    """Drop an alpha channel that is fully opaque; refuse real transparency (no background is right for every image)."""
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        lowest, _ = cast("tuple[int, int]", image.getchannel("A").getextrema())  # one band: (min, max)
        if lowest < 255:
            raise InvalidRequest(f"{what} has transparent pixels (mode {image.mode}); {fix}")
        image = image.convert("RGB" if image.mode in ("RGBA", "RGBa", "PA") else "L")
    return image


def decode_image(data: bytes, *, what: str = "image", max_side: int = MAX_SIDE) -> np.ndarray:
    """PNG/JPEG bytes → (H, W, 3) uint8 RGB.

    Grayscale and palette images become RGB (unambiguous); an alpha channel is dropped when
    every pixel is opaque and refused otherwise; 16-bit/float grayscale and CMYK are refused.
    """
    image = _opaque(
        _open(data, what, max_side),
        what,
        "flatten it onto a background (e.g. PIL's Image.convert('RGB')) and send an RGB image; "
        "for inpainting, send the area to repaint as a separate mask",
    )
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise InvalidRequest(
            f"{what} is a {image.mode} (16-bit or float) grayscale image; send an 8-bit RGB or grayscale image"
        )
    if image.mode not in ("RGB", "L", "1"):
        raise InvalidRequest(f"{what} has mode {image.mode}; convert it to RGB (e.g. PIL's Image.convert('RGB')) first")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_mask(data: bytes, *, what: str = "mask", max_side: int = MAX_SIDE) -> np.ndarray:
    """PNG/JPEG bytes → (H, W) uint8 luminance: white repaints, black keeps.

    RGB masks are reduced to luminance exactly as diffusers' mask processor does (PIL's
    convert("L"), ITU-R 601-2). Transparency is refused: it is not how diffusers reads a mask.
    """
    image = _opaque(
        _open(data, what, max_side),
        what,
        "masks are read by brightness, not alpha: send a black-and-white image, white where to repaint",
    )
    if image.mode not in ("L", "RGB", "1"):
        raise InvalidRequest(
            f"{what} has mode {image.mode}; send an 8-bit grayscale PNG, white where to repaint, black elsewhere"
        )
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode_depth(data: bytes, *, what: str = "depth map", max_side: int = MAX_SIDE) -> np.ndarray:
    """A depth map → (H, W) float32, or (N, H, W) from a 3-D .npy.

    Accepts a grayscale PNG (8- or 16-bit; an RGB PNG whose channels are equal, as image
    editors save grayscale) or a .npy float/integer array (H, W) or (N, H, W). Units do not
    matter: the depth pipeline rescales each map to [-1, 1] by its own min and max.
    """
    if bytes(data[:6]) == _NPY_MAGIC:
        depth = _load_npy(data, what, max_side)
    else:
        image = _opaque(_open(data, what, max_side), what, "send a grayscale PNG (or a .npy array) without alpha")
        if image.mode in ("RGB", "RGBA"):
            rgb = np.asarray(image.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise InvalidRequest(
                    f"{what} is a color image; send depth as one channel: a grayscale PNG or a .npy array"
                )
            depth = rgb[..., 0]
        elif image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
            depth = np.asarray(image)
        else:
            raise InvalidRequest(f"{what} has mode {image.mode}; send a grayscale PNG (8- or 16-bit) or a .npy array")
    depth = depth.astype(np.float32)
    if max(depth.shape[-2:]) > max_side:
        raise InvalidRequest(f"{what} is {depth.shape[-1]}×{depth.shape[-2]}; the largest side allowed is {max_side}")
    if not np.isfinite(depth).all():
        raise InvalidRequest(f"{what} contains NaN or infinite values; fill them (e.g. with the nearest valid depth)")
    flat = depth.reshape(-1, depth.shape[-2] * depth.shape[-1])
    if (flat.max(axis=1) == flat.min(axis=1)).any():
        # diffusers divides by (max − min) and would return NaN; a flat map carries no depth anyway
        raise InvalidRequest(f"{what} is constant (every value equal), so it has no depth to condition on")
    return depth


def _load_npy(data: bytes, what: str, max_side: int) -> np.ndarray:
    """Read the .npy header, check the dtype and shape, then take the data: np.load would first allocate
    whatever the header declares (a (100000, 100000) header is 80 GB), before finding the data missing."""
    data = bytes(data)
    buffer = io.BytesIO(data)
    fix = "save it with numpy.save(path, array)"
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(buffer)
        if version not in readers:
            raise ValueError(f".npy format version {version[0]}.{version[1]}; sdmesh reads 1.0 and 2.0")
        shape, fortran_order, dtype = readers[version](buffer)
    except ValueError as e:  # numpy reports every malformed header so (too long, bad keys, not a dict)
        raise InvalidRequest(f"{what}: not a readable .npy array ({_why(e)}); {fix}") from None
    if dtype.hasobject:
        raise InvalidRequest(
            f"{what}: not a readable .npy array (it holds Python objects, never unpickled here); {fix}"
        )
    if dtype.kind not in "fiu" or not 2 <= len(shape) <= 3 or min(shape) < 1:
        raise InvalidRequest(f"{what}: expected a float array (H, W) or (N, H, W), got {dtype} {shape}")
    if max(shape[-2:]) > max_side:
        raise InvalidRequest(f"{what} is {shape[-1]}×{shape[-2]}; the largest side allowed is {max_side}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - buffer.tell() != expected:
        raise InvalidRequest(
            f"{what}: the .npy header declares {dtype} {shape} ({expected} bytes) but {len(data) - buffer.tell()} "
            f"bytes follow it; the file is truncated or corrupt: {fix}"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


# -------------------------------------------------------------------- preprocessing


def resize(image: np.ndarray, height: int, width: int, resample: str = "lanczos") -> np.ndarray:
    """(H, W[, C]) uint8 → (height, width[, C]) uint8 with PIL, as VaeImageProcessor.resize does for PIL input.

    The SD pipelines' processors use "lanczos"; the x4 upscaler's uses "bicubic". A same-size
    resize returns the image unchanged (PIL copies it).
    """
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), resample=RESAMPLE[resample], reducing_gap=None))


def preprocess_image(images: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (N, H, W, 3) uint8 → (N, H, W, 3) float32 in [-1, 1]: pil_to_numpy then normalize."""
    x = np.asarray(images).astype(np.float32) / 255.0
    x = x[None] if x.ndim == 3 else x
    return 2.0 * x - 1.0


def preprocess_mask(masks: np.ndarray) -> np.ndarray:
    """(H, W) or (N, H, W) uint8 luminance → (N, H, W, 1) float32 in {0, 1}.

    The inpaint pipeline's mask processor: no normalisation, then binarize (< 0.5 → 0, else 1),
    so 127 keeps and 128 repaints.
    """
    m = np.asarray(masks).astype(np.float32) / 255.0
    m = m[None] if m.ndim == 2 else m
    return np.where(m < 0.5, 0.0, 1.0).astype(np.float32)[..., None]
