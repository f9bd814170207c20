"""The invisible watermark Stability's SD 2 scripts put in every image, and reading it back. JAX-free.

    marked = apply_watermark(images)            # (N, H, W, 3) uint8 RGB → the same, carrying b"SDV2"
    read_watermark(marked[0], 32) == b"SDV2"    # 32 bits: the four bytes

Stability-AI/stablediffusion's scripts/txt2img.py does, per image,
`WatermarkEncoder().set_watermark("bytes", b"SDV2")`, then `encode(bgr, "dwtDct")` on the BGR array and back to RGB,
with the invisible-watermark package (ShieldMnt/invisible-watermark, imwatermark 0.2.0). Its dwtDct method
(`imwatermark.maxDct.EmbedMaxDct`, scales [0, 36, 36], 4×4 blocks):

  1. BGR → YUV (OpenCV's uint8 conversion); only the U plane changes: the method's loop runs over planes 0 and 1
     and plane 0's scale is 0, so V's 36 is never used.
  2. One Haar DWT level of U cropped to a multiple of 4 on each side; the approximation band is cut into 4×4 blocks.
  3. Block k carries bit k mod len(bits), blocks taken row by row. In each block the largest-magnitude coefficient
     other than [0, 0] is quantised to (⌊|c|/36⌋ + 0.25 + 0.5·bit)·36, keeping its sign.
  4. Inverse DWT with the horizontal and vertical detail bands swapped (the package's quirk: it transposes every
     2×2 block of U, and costs more PSNR than the mark; kept, as SD 2's images carry it), written back into the
     uint8 plane by truncation, YUV → BGR.

Reading takes each block's largest coefficient past [0, 0] again and votes: bit k is 1 when more than half of its
blocks have |c| mod 36 > 18.

This module does those steps itself, in numpy with OpenCV and PyWavelets, because importing `imwatermark` imports
torch (its rivaGan module does at the top) and serving has no torch. tests/test_watermark.py checks the output is
byte-identical to the package's, called the way Stability's script calls it, and that each reads the other's mark.
"""

from __future__ import annotations

import numpy as np

SD2_MESSAGE = b"SDV2"
# The package refuses smaller images in both encode and decode ("image too small, should be larger than 256x256"):
# it compares the area, so 128×512 is fine and 255×256 is not.
MIN_PIXELS = 256 * 256
_SCALE = 36.0  # the package's dwtDct scale for the U plane
_BLOCK = 4
_U = 1  # YUV plane index
_INSTALL = "pip install PyWavelets (the serve extra has it)"


def can_watermark(height: int, width: int, length_bits: int = 8 * len(SD2_MESSAGE)) -> bool:
    """Whether dwtDct can carry `length_bits` in an image this size: the package's own limit (H·W ≥ 256·256),
    and every bit in at least one block (one per 8×8 pixels), which only very thin images miss."""
    return height * width >= MIN_PIXELS and (height // 8) * (width // 8) >= length_bits


def apply_watermark(images: np.ndarray, message: bytes = SD2_MESSAGE) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB → the same images carrying `message`, as Stability's SD 2 scripts mark them.

    Raises ValueError for images smaller than the method can mark (H·W < 256·256): the package raises there too,
    and an image that silently went unmarked would be worse than an error. Callers that skip small images ask
    `can_watermark` first.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"apply_watermark takes (N, H, W, 3) uint8 RGB images, got {images.dtype} {images.shape}")
    if not message:
        raise ValueError("apply_watermark needs a non-empty message (Stability's is b'SDV2')")
    _, height, width, _ = images.shape
    if not can_watermark(height, width, 8 * len(message)):
        raise ValueError(
            f"a {width}×{height} image is too small for the dwtDct watermark, which needs width·height ≥ "
            f"{MIN_PIXELS} (256×256) and an 8×8 block per bit; generate at least 256×256 or skip the watermark "
            "for smaller images (can_watermark says which)"
        )
    cv2, pywt = _libraries()
    bits = np.unpackbits(np.frombuffer(message, dtype=np.uint8)).astype(np.float64)
    return np.stack([_encode_rgb(cv2, pywt, image, bits) for image in images])


def read_watermark(image: np.ndarray, length_bits: int) -> bytes:
    """The first `length_bits` // 8 bytes of the dwtDct mark in one (H, W, 3) uint8 RGB image.

    Any image reads back some bytes; an unmarked one reads back noise, so compare with the message you expect.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"read_watermark takes one (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if length_bits <= 0 or length_bits % 8:
        raise ValueError(f"length_bits must be a positive multiple of 8 (32 for b'SDV2'), got {length_bits}")
    height, width, _ = image.shape
    if not can_watermark(height, width, length_bits):
        raise ValueError(
            f"a {width}×{height} image is too small to carry a {length_bits}-bit dwtDct watermark (it needs "
            f"width·height ≥ {MIN_PIXELS} and an 8×8 block per bit)"
        )
    cv2, pywt = _libraries()
    yuv = cv2.cvtColor(np.ascontiguousarray(image[..., ::-1]), cv2.COLOR_BGR2YUV)
    band = _approximation(pywt, yuv[..., _U])
    values = np.abs(_block_peaks(band)[1])
    scores = (values % _SCALE > 0.5 * _SCALE).astype(np.float64)
    which = np.arange(scores.size) % length_bits
    votes = np.bincount(which, weights=scores, minlength=length_bits) / np.bincount(which, minlength=length_bits)
    bits = votes * 255 > 127  # the package's threshold, kept exactly
    return np.packbits(bits).tobytes()


def _libraries():
    import cv2

    try:
        import pywt
    except ImportError as e:
        raise ImportError(f"the invisible watermark needs PyWavelets: {_INSTALL}") from e
    return cv2, pywt


def _approximation(pywt, plane: np.ndarray) -> np.ndarray:
    rows, cols = plane.shape
    approx, _ = pywt.dwt2(plane[: rows // 4 * 4, : cols // 4 * 4], "haar")
    return approx


def _block_peaks(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 4×4 block of `band`, row by row: the flat index of its largest |coefficient| past [0, 0], and its value."""
    n_rows, n_cols = band.shape[0] // _BLOCK, band.shape[1] // _BLOCK
    tiles = band[: n_rows * _BLOCK, : n_cols * _BLOCK].reshape(n_rows, _BLOCK, n_cols, _BLOCK)
    blocks = tiles.transpose(0, 2, 1, 3).reshape(n_rows * n_cols, _BLOCK * _BLOCK)  # (blocks, 16)
    where = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
    return where, blocks[np.arange(len(blocks)), where]


def _encode_rgb(cv2, pywt, rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2YUV)
    rows, cols = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    approx, (horizontal, vertical, diagonal) = pywt.dwt2(yuv[:rows, :cols, _U], "haar")
    where, values = _block_peaks(approx)
    bit = bits[np.arange(values.size) % bits.size]
    # The package's two branches, kept apart so -0.0 goes the same way it does.
    marked = np.where(
        values >= 0.0,
        (values // _SCALE + 0.25 + 0.5 * bit) * _SCALE,
        -1.0 * (np.abs(values) // _SCALE + 0.25 + 0.5 * bit) * _SCALE,
    )
    n_cols = approx.shape[1] // _BLOCK
    block_row, block_col = np.divmod(np.arange(values.size), n_cols)
    approx[block_row * _BLOCK + where // _BLOCK, block_col * _BLOCK + where % _BLOCK] = marked
    # The package reconstructs with the horizontal and vertical details swapped; matched, as the mark's readers
    # expect exactly its pixels. Assigning into the uint8 plane truncates, as there.
    yuv[:rows, :cols, _U] = pywt.idwt2((approx, (vertical, horizontal, diagonal)), "haar")
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[..., ::-1]
