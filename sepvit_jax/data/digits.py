"""The 8x8 handwritten digits (UCI, as scikit-learn's `load_digits()`), upsampled once and held
in memory (bundled: no download).

A fixed, stratified held-out split of 360 images (36 per class) is the test set; the other 1,437
train. Batches are gathered by index, vectorised.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

DIGITS_FILE = Path(__file__).with_name("digits.npz")

# Digits: the held-out split is fixed forever (independent of DataConfig.seed), so accuracy
# numbers stay comparable between runs. 36 images per class -> exactly 360 held out.
SPLIT_SEED = 20_240_601
EVAL_PER_CLASS = 36


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of half-pixel-centred bilinear interpolation (edge clamped)."""
    centers = (np.arange(size_out, dtype=np.float64) + 0.5) * size_in / size_out - 0.5
    centers = np.clip(centers, 0.0, size_in - 1)
    lo = np.floor(centers).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = centers - lo
    m = np.zeros((size_out, size_in), np.float64)
    m[np.arange(size_out), lo] += 1.0 - frac
    m[np.arange(size_out), hi] += frac
    return m


@functools.lru_cache(maxsize=1)
def raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (n, 8, 8) with values 0..16, and their labels: scikit-learn's
    `load_digits()`, bundled with this package (`digits.npz`, CC BY 4.0, see
    `digits.LICENSE.txt`), so the default run needs no download and no scikit-learn."""
    with np.load(DIGITS_FILE) as data:
        return data["images"].astype(np.float64), data["labels"].astype(np.int32)


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, eval) indices into load_digits(); stratified, fixed seed."""
    _, labels = raw()
    rng = np.random.default_rng(SPLIT_SEED)
    held_out = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        held_out.append(members[:EVAL_PER_CLASS])
    eval_idx = np.sort(np.concatenate(held_out))
    train_idx = np.setdiff1d(np.arange(len(labels)), eval_idx)
    return train_idx, eval_idx


@functools.lru_cache(maxsize=4)
def arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"eval": (images (n, S, S, 1) float32, labels (n,) int32)}, computed once."""
    images, labels = raw()
    m = bilinear_matrix(8, image_size)
    # Separable bilinear upsampling of all 1,797 images at once: M @ x @ M^T, as two batched
    # matrix products (BLAS: 25x faster than the equivalent unoptimised einsum, and the float32
    # result is bitwise the same).
    up = m @ (images / 16.0) @ m.T
    train_idx, eval_idx = split_indices()
    train_up = up[train_idx]
    mean, std = train_up.mean(), train_up.std()
    up = ((up - mean) / std).astype(np.float32)[..., None]
    return {
        "train": (up[train_idx], labels[train_idx]),
        "eval": (up[eval_idx], labels[eval_idx]),
    }


@dataclasses.dataclass(frozen=True)
class Gather:
    """Maps a batch of example indices to the batch dict (vectorised: one gather per batch).

    Holds only the configuration; the arrays are rebuilt (cached) in each worker process rather
    than pickled into it.
    """

    image_size: int
    split: str
    num_examples: int
    with_mask: bool

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        images, labels = arrays(self.image_size)[self.split]
        return _gather(images, labels, idx, self.num_examples, self.with_mask)


def _gather(images, labels, idx, num_examples, with_mask) -> dict[str, np.ndarray]:
    if not with_mask:
        return {"image": images[idx], "label": labels[idx]}
    mask = idx < num_examples
    safe = np.where(mask, idx, 0)
    image = images[safe]
    image[~mask] = 0.0
    label = np.where(mask, labels[safe], 0).astype(np.int32)
    return {"image": image, "label": label, "mask": mask}
