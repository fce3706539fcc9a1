"""Random images generated per index, for benchmarking without input cost (ImageNet-sized)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# Synthetic: ImageNet-1k sized, but nothing is materialised.
NUM_TRAIN = 1_281_167
NUM_EVAL = 50_000
BANK_SIZE = 32


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a cheap, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=4)
def _synthetic_bank(seed: int, image_size: int, channels: int) -> np.ndarray:
    # Generating fresh Gaussian pixels per example would cost ~1 ms per 224^2 image; a small bank
    # of random images, picked per example by a hash, keeps the input pipeline nearly free.
    rng = np.random.default_rng([seed, image_size, channels])
    shape = (BANK_SIZE, image_size, image_size, channels)
    return rng.standard_normal(shape, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Gather:
    """Maps a batch of example indices to random images/labels, a pure function of (seed, idx)."""

    seed: int
    split: str
    image_size: int
    channels: int
    num_classes: int
    num_examples: int
    with_mask: bool

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        key = _mix64(np.array([self.seed * 2 + (self.split == "eval")], np.uint64))
        h = _mix64(np.asarray(idx).astype(np.uint64) ^ key)
        labels = (h % np.uint64(self.num_classes)).astype(np.int32)
        bank_id = ((h >> np.uint64(32)) % np.uint64(BANK_SIZE)).astype(np.int64)
        images = _synthetic_bank(self.seed, self.image_size, self.channels)[bank_id]
        out = {"image": images, "label": labels}
        if self.with_mask:
            mask = np.asarray(idx) < self.num_examples
            images[~mask] = 0.0
            out["label"] = np.where(mask, labels, 0).astype(np.int32)
            out["mask"] = mask
        return out
