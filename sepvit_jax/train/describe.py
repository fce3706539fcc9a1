"""What a run's input pipeline does to images, as the preprocessing record its model carries.

The exported `model/` says how to prepare its input (`sepvit_jax.core.preprocessing`), so that
it can be used without the training code: for each dataset, the evaluation pipeline's own
numbers (`sepvit_jax.data`).
"""

from __future__ import annotations

import os

from sepvit_jax.core.format import read_preprocessing
from sepvit_jax.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from sepvit_jax.data import DataConfig
from sepvit_jax.data import digits as digits_data

# imagefolder's evaluation: resize the short side to size / 0.875 (bilinear), central crop.
IMAGEFOLDER_CROP_FRACTION = 0.875


def digits_normalisation(image_size: int) -> tuple[float, float]:
    """(mean, std) the digits pipeline normalises with: those of its bilinearly upsampled
    training images, pixels scaled to [0, 1] (computed as `digits.arrays` does, in float64)."""
    images, _ = digits_data.raw()
    m = digits_data.bilinear_matrix(8, image_size)
    train_idx, _ = digits_data.split_indices()
    train_up = (m @ (images / 16.0) @ m.T)[train_idx]
    return float(train_up.mean()), float(train_up.std())


def preprocessing(data_cfg: DataConfig, channels: int) -> Preprocessing:
    """The record of how `data_cfg`'s evaluation pipeline turns images into model input."""
    size = (data_cfg.image_size, data_cfg.image_size)
    if data_cfg.name == "digits":
        mean, std = digits_normalisation(data_cfg.image_size)
        # The 8x8 digits are upsampled whole: no crop.
        return Preprocessing(size, (mean,), (std,), "bilinear", 1.0, origin="trained")
    if data_cfg.name == "imagefolder":
        return Preprocessing(
            size, IMAGENET_MEAN, IMAGENET_STD, "bilinear", IMAGEFOLDER_CROP_FRACTION, "trained"
        )
    # synthetic: standard normal images, already what the model sees.
    return Preprocessing(size, (0.0,) * channels, (1.0,) * channels, "bilinear", 1.0, "trained")


def recorded_image_size(directory: str | os.PathLike) -> tuple[int, int]:
    """(height, width) a checkpoint directory's preprocessing record names."""
    return tuple(int(s) for s in read_preprocessing(directory).image_size)
