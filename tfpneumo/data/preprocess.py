"""Turning a decoded DICOM into what the network sees, the same way at cache and test time.

``tfpneumo prepare`` caches training images with :func:`network_image`; ``submit``,
``predict`` and the export use the same function on test DICOMs, so a network never meets
pixels resampled or contrast-equalised differently from the ones it was trained on.
"""

from __future__ import annotations

import numpy as np

CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 or float32 -> (size, size), same dtype. Non-square images are squashed."""
    import cv2

    if image.shape == (size, size):
        return image
    # INTER_AREA averages whole source pixels when shrinking (no aliasing); it is a poor
    # upscaler, so growing uses bilinear.
    interp = cv2.INTER_AREA if size < min(image.shape) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) 0/1 mask -> (size, size) uint8 0/1.

    The mask is resized as a coverage fraction (area average) and thresholded at 0.5, which
    avoids the aliasing of nearest-neighbour sampling. A non-empty mask never becomes empty:
    if no pixel reaches half coverage (a sliver thinner than one cached pixel), every pixel
    it touches is kept instead.
    """
    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    cover = resize_image(mask.astype(np.float32), size)
    out = cover >= 0.5
    if not out.any() and mask.any():
        out = cover > 0
    return out.astype(np.uint8)


def clahe(image: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a (H, W) uint8 image."""
    import cv2

    return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(image)


def network_image(pixels: np.ndarray, size: int, use_clahe: bool = False) -> np.ndarray:
    """A decoded (H, W) uint8 DICOM -> the (size, size) uint8 image the network is fed."""
    image = resize_image(pixels, size)
    return clahe(image) if use_clahe else image
