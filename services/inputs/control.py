"""Control images → the maps a ControlNet takes, as diffusers' ControlNet pipelines prepare them. JAX-free.

    control_input(choice, height, width)   ControlChoice (uint8 RGB, any size) → ControlInput ((1, H, W, 3) in [0, 1])
    canny(image, low, high)                 edges as a white-on-black RGB map (OpenCV's Canny)

The map is made at the image's own size (the preprocessor first, as diffusers' ControlNet examples run
canny on the photo), then resized to the output size with Lanczos and scaled to [0, 1]
(diffusers' `control_image_processor`: VaeImageProcessor without normalisation).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdmesh.services.inputs.contract import ControlChoice, ControlInput


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W, 3) uint8: 255 on edges, 0 elsewhere, in every channel."""
    import cv2  # the serve extra's; imported here so the contract layer loads without it

    edges = cv2.Canny(np.ascontiguousarray(image), float(low), float(high))
    return np.repeat(edges[:, :, None], 3, axis=2)


def control_map(choice: ControlChoice) -> np.ndarray:
    """The control image after its preprocessor, at its own size: (H, W, 3) uint8."""
    if choice.preprocessor == "canny":
        return canny(choice.image, choice.low_threshold, choice.high_threshold)
    return choice.image


def control_input(choice: ControlChoice, height: int, width: int) -> ControlInput:
    """A checked choice as the denoiser's input: its map resized to (height, width), in [0, 1], one row."""
    image = control_map(choice)
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.LANCZOS))
    pixels = (image.astype(np.float32) / 255.0)[None]  # (1, H, W, 3)
    return ControlInput(choice.name, pixels, choice.scale, choice.start, choice.end, choice.guess_mode)
