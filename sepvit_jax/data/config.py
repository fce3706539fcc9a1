"""What a dataset is: its configuration, its static facts, and the checks on both."""

from __future__ import annotations

import dataclasses

import numpy as np

from sepvit_jax.data.randaugment import RandAugment

DATASETS = ("digits", "imagefolder", "synthetic")


class DataError(ValueError):
    """A problem with the data or the data configuration, with a message meant for the user."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset to read and how.

    Args:
      name: "digits", "imagefolder" or "synthetic".
      data_dir: root of an imagefolder tree with ``train/CLASS/*`` and ``val/CLASS/*``.
      image_size: side of the square images the model sees.
      num_classes: number of classes of the synthetic dataset (default 10). For the other
        datasets it is implied by the data; if given it must match.
      channels: channels of the synthetic dataset (default 3); must match for the others.
      num_workers: Grain worker processes; 0 reads in the training process (best for the small
        in-memory datasets, where process start-up and IPC would dominate).
      prefetch: batches read ahead (per worker when ``num_workers > 0``).
      seed: seed of the training shuffle and augmentation (the digits split does not use it).
      max_bad_fraction: imagefolder only; raise `DataError` once more than this fraction of a
        split's images turned out to be undecodable.
      randaugment: imagefolder only; a timm RandAugment string such as
        ``"rand-m9-mstd0.5-inc1"``, applied to training images after the random-resized crop
        and flip, before normalisation (DeiT's order). None: no RandAugment.
      random_erasing: imagefolder only; probability of timm's random erasing ("pixel" mode,
        one box) of a normalised training image. 0.0: off.
      repeated_aug: imagefolder only; DeiT's repeated augmentation: each epoch draws
        ``num_train / repeated_aug`` images and shows each ``repeated_aug`` times, differently
        augmented, keeping ``num_train // global_batch_size`` steps per epoch. 1: off.

    The three augmentation settings are errors (not ignored) for the digits and synthetic
    datasets, whose pipelines have no per-image randomness to apply them to.
    """

    name: str = "digits"
    data_dir: str | None = None
    image_size: int = 56
    num_classes: int | None = None
    channels: int | None = None
    num_workers: int = 0
    prefetch: int = 2
    seed: int = 0
    max_bad_fraction: float = 0.01
    randaugment: str | None = None
    random_erasing: float = 0.0
    repeated_aug: int = 1


@dataclasses.dataclass
class DatasetInfo:
    """Static facts about a dataset that the model and the training loop need.

    Args:
      num_classes: number of label values (labels are ``0 .. num_classes - 1``).
      channels: image channels (C of NHWC).
      image_size: image height and width.
      num_train: training examples (for imagefolder: files found, readable or not).
      num_eval: held-out examples.
      class_names: one name per label.
    """

    num_classes: int
    channels: int
    image_size: int
    num_train: int
    num_eval: int
    class_names: list[str]


# ---- config checks ---------------------------------------------------------------------------


def check_config(cfg: DataConfig) -> None:
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset name {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    for field in ("image_size", "prefetch"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"DataConfig.{field} must be a positive int, got {value!r}")
    if isinstance(cfg.num_workers, bool) or not isinstance(cfg.num_workers, int):
        raise DataError(f"DataConfig.num_workers must be an int, got {cfg.num_workers!r}")
    if cfg.num_workers < 0:
        raise DataError(f"DataConfig.num_workers must be >= 0, got {cfg.num_workers}")
    if not 0 <= cfg.seed < 2**32:
        raise DataError(f"DataConfig.seed must be in [0, 2**32), got {cfg.seed}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise DataError(
            f"DataConfig.max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}"
        )
    if cfg.name == "imagefolder" and not cfg.data_dir:
        raise DataError("the imagefolder dataset needs DataConfig.data_dir (the dataset root)")
    _check_augmentation(cfg)
    if cfg.name == "synthetic":
        for field in ("num_classes", "channels"):
            value = getattr(cfg, field)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise DataError(f"DataConfig.{field} must be a positive int, got {value!r}")


def rand_augment(cfg: DataConfig) -> RandAugment | None:
    """The RandAugment that ``cfg.randaugment`` names (None when unset); bicubic, ImageNet fill.

    Raises:
      DataError: for a string that is not a valid timm RandAugment config.
    """
    if cfg.randaugment is None:
        return None
    if not isinstance(cfg.randaugment, str):
        raise DataError(f"DataConfig.randaugment must be a string or None, got {cfg.randaugment!r}")
    try:
        return RandAugment.from_string(cfg.randaugment)
    except ValueError as e:
        raise DataError(f"DataConfig.randaugment={cfg.randaugment!r}: {e}") from None


def _check_augmentation(cfg: DataConfig) -> None:
    rand_augment(cfg)
    p = cfg.random_erasing
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise DataError(f"DataConfig.random_erasing must be a probability in [0, 1], got {p!r}")
    k = cfg.repeated_aug
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"DataConfig.repeated_aug must be an int >= 1 (1: off), got {k!r}")
    given = [
        f"{field}={getattr(cfg, field)!r}"
        for field, off in (("randaugment", None), ("random_erasing", 0.0), ("repeated_aug", 1))
        if getattr(cfg, field) != off
    ]
    if given and cfg.name != "imagefolder":
        # An error rather than silently ignored: a run that asked for the DeiT recipe must not
        # train without it unnoticed.
        raise DataError(
            f"DataConfig.{given[0]} applies to the imagefolder dataset only, not {cfg.name}; "
            "leave it at its default"
        )


def check_matches(cfg: DataConfig, info: DatasetInfo) -> DatasetInfo:
    # num_classes / channels only configure the synthetic data; elsewhere they are facts of the
    # data, and a different value in the config means the model would be built wrongly.
    for field in ("num_classes", "channels"):
        wanted = getattr(cfg, field)
        if wanted is not None and wanted != getattr(info, field):
            raise DataError(
                f"DataConfig.{field}={wanted} but the {cfg.name} dataset has "
                f"{field}={getattr(info, field)}; leave it unset (None) for this dataset"
            )
    return info


def local_batch(global_batch_size: int, process_index: int, process_count: int, what: str) -> int:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise DataError(f"{what} must be an int, got {global_batch_size!r}")
    if global_batch_size <= 0:
        raise DataError(f"{what} must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index={process_index} is not in [0, process_count={process_count})"
        )
    if global_batch_size % process_count:
        raise DataError(
            f"{what}={global_batch_size} is not divisible by process_count={process_count}; "
            "every process must get the same number of examples per step"
        )
    return global_batch_size // process_count


def seeds(seed: int) -> tuple[int, int]:
    # Grain's shuffle reseeds epoch e with (seed + e), so raw seeds s and s+1 would share all
    # but one epoch order. Hashing the user seed makes different seeds unrelated.
    shuffle_seed, augment_seed = np.random.SeedSequence([seed, 0x5E9]).generate_state(2)
    return int(shuffle_seed), int(augment_seed)
