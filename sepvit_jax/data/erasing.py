"""Random erasing (Zhong et al. 2017) with timm's semantics, on one normalised HWC image.

Applied after normalisation, so "pixel" mode's standard-normal noise has the statistics of the
normalised data. The input is a float32 ``(H, W, C)`` array; the result is a new array (the input
is never written to). Every random draw comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import math

import numpy as np

_MODES = ("pixel", "rand", "const")
_ATTEMPTS = 10  # box draws per erasure before giving up on it (timm's count)


def _fill(mode: str, shape: tuple[int, int, int], dtype, rng: np.random.Generator) -> np.ndarray:
    if mode == "pixel":  # independent N(0, 1) per pixel and channel
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if mode == "rand":  # one N(0, 1) colour for the whole box
        return rng.standard_normal((1, 1, shape[2]), dtype=np.float32).astype(dtype, copy=False)
    return np.zeros((1, 1, shape[2]), dtype)  # "const": the dataset mean after normalising


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    probability: float = 0.25,
    *,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    mode: str = "pixel",
    count: int = 1,
    max_count: int | None = None,
) -> np.ndarray:
    """Erases up to ``count`` random boxes of ``image`` with probability ``probability``.

    Each box has an area uniform in [min_area, max_area] of the image (divided by the number of
    boxes) and a log-uniform aspect ratio (height / width) in [min_aspect, max_aspect]. A box that
    does not fit is redrawn up to 10 times, then that box is skipped.

    Args:
        image: (H, W, C) normalised image.
        rng: this record's generator.
        probability: chance that the image is erased at all.
        min_area: smallest box area, as a fraction of the image area.
        max_area: largest box area, as a fraction of the image area.
        min_aspect: smallest height / width ratio of a box.
        max_aspect: largest ratio; default ``1 / min_aspect``.
        mode: "pixel" (per-pixel normal noise), "rand" (one normal colour per box) or "const"
            (zeros).
        count: number of boxes, or the smallest number when ``max_count`` is set.
        max_count: if set, the number of boxes is uniform in [count, max_count].

    Returns:
        The erased copy of ``image``, or ``image`` itself when nothing was erased.
    """
    if mode not in _MODES:
        raise ValueError(f"random erasing mode must be one of {_MODES}, got {mode!r}")
    if image.ndim != 3:
        raise ValueError(f"random_erasing expects one (H, W, C) image, got shape {image.shape}")
    if rng.random() > probability:
        return image
    img_h, img_w, chans = image.shape
    boxes = count if max_count is None else int(rng.integers(count, max_count + 1))
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    out = image.copy()
    for _ in range(boxes):
        for _attempt in range(_ATTEMPTS):
            target = rng.uniform(min_area, max_area) * img_h * img_w / boxes
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            # Strictly smaller than the image, as timm: a box never covers a whole side.
            if h < img_h and w < img_w:
                top = int(rng.integers(0, img_h - h + 1))
                left = int(rng.integers(0, img_w - w + 1))
                out[top : top + h, left : left + w] = _fill(mode, (h, w, chans), out.dtype, rng)
                break
    return out
