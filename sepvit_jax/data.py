"""Input pipelines for SepViT training and evaluation, built on Grain's dataset API.

Every batch is a dict of NumPy arrays in NHWC layout:

    image: (b, H, W, C) float32, normalised
    label: (b,) int32
    mask:  (b,) bool          (evaluation batches only; False marks padding)

Three datasets:

* ``digits`` (default): scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
  download), upsampled to ``image_size`` once and held in memory. A fixed, stratified held-out
  split of 360 images is used for evaluation; the other 1,437 train.
* ``imagefolder``: an ImageNet-style tree ``DIR/{train,val}/CLASS/*.jpg`` decoded with Pillow,
  with random-resized-crop + flip for training and resize + center crop for evaluation.
* ``synthetic``: random images generated lazily per index, for benchmarking without input cost.

Sharding across JAX processes (multi-host). Each global training step consumes a global batch of
``G`` examples from a per-epoch shuffled order. The global batch is cut into ``process_count``
contiguous blocks of ``b = G // process_count`` and process ``p`` reads only block ``p``, so the
concatenation of the local batches in process-index order is exactly the batch a single process
would produce with ``process_count=1``. In Grain terms: shuffle -> slice to whole batches ->
``batch(b)`` (one "micro-batch" per block) -> ``[p::process_count]`` -> ``repeat()``. Everything
before the final map is index arithmetic, so a process only ever decodes its own examples.

This module does not import JAX: Grain's worker processes (spawned) import it cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import grain
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "eval_batches",
    "steps_per_epoch",
    "train_iterator",
    "unreadable_images",
]

DATASETS = ("digits", "imagefolder", "synthetic")

# Digits: the held-out split is fixed forever (independent of DataConfig.seed), so accuracy
# numbers stay comparable between runs. 36 images per class -> exactly 360 held out.
_DIGITS_SPLIT_SEED = 20_240_601
_DIGITS_EVAL_PER_CLASS = 36

# Synthetic: ImageNet-1k sized, but nothing is materialised.
_SYNTHETIC_NUM_TRAIN = 1_281_167
_SYNTHETIC_NUM_EVAL = 50_000
_SYNTHETIC_BANK_SIZE = 32

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_EVAL_CROP_FRACTION = 0.875


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


def _check_config(cfg: DataConfig) -> None:
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
    if cfg.name == "synthetic":
        for field in ("num_classes", "channels"):
            value = getattr(cfg, field)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise DataError(f"DataConfig.{field} must be a positive int, got {value!r}")


def _check_matches(cfg: DataConfig, info: DatasetInfo) -> DatasetInfo:
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


def _local_batch(global_batch_size: int, process_index: int, process_count: int, what: str) -> int:
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


def _seeds(seed: int) -> tuple[int, int]:
    # Grain's shuffle reseeds epoch e with (seed + e), so raw seeds s and s+1 would share all
    # but one epoch order. Hashing the user seed makes different seeds unrelated.
    shuffle_seed, augment_seed = np.random.SeedSequence([seed, 0x5E9]).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


# ---- digits ----------------------------------------------------------------------------------


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
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
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: sklearn import costs ~1 s

    digits = load_digits()
    return digits.images.astype(np.float64), digits.target.astype(np.int32)


@functools.lru_cache(maxsize=1)
def _digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, eval) indices into load_digits(); stratified, fixed seed."""
    _, labels = _digits_raw()
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    held_out = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        held_out.append(members[:_DIGITS_EVAL_PER_CLASS])
    eval_idx = np.sort(np.concatenate(held_out))
    train_idx = np.setdiff1d(np.arange(len(labels)), eval_idx)
    return train_idx, eval_idx


@functools.lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"eval": (images (n, S, S, 1) float32, labels (n,) int32)}, computed once."""
    images, labels = _digits_raw()
    m = _bilinear_matrix(8, image_size)
    # Separable bilinear upsampling of all 1,797 images at once: M @ x @ M^T.
    up = np.einsum("hi,nij,wj->nhw", m, images / 16.0, m)
    train_idx, eval_idx = _digits_split()
    mean, std = up[train_idx].mean(), up[train_idx].std()
    up = ((up - mean) / std).astype(np.float32)[..., None]
    return {
        "train": (up[train_idx], labels[train_idx]),
        "eval": (up[eval_idx], labels[eval_idx]),
    }


@dataclasses.dataclass(frozen=True)
class _DigitsGather:
    """Maps a batch of example indices to the batch dict (vectorised: one gather per batch).

    Holds only the configuration; the arrays are rebuilt (cached) in each worker process rather
    than pickled into it.
    """

    image_size: int
    split: str
    num_examples: int
    with_mask: bool

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        images, labels = _digits_arrays(self.image_size)[self.split]
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


# ---- synthetic -------------------------------------------------------------------------------


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
    shape = (_SYNTHETIC_BANK_SIZE, image_size, image_size, channels)
    return rng.standard_normal(shape, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class _SyntheticGather:
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
        bank_id = ((h >> np.uint64(32)) % np.uint64(_SYNTHETIC_BANK_SIZE)).astype(np.int64)
        images = _synthetic_bank(self.seed, self.image_size, self.channels)[bank_id]
        out = {"image": images, "label": labels}
        if self.with_mask:
            mask = np.asarray(idx) < self.num_examples
            images[~mask] = 0.0
            out["label"] = np.where(mask, labels, 0).astype(np.int32)
            out["mask"] = mask
        return out


# ---- imagefolder -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Split:
    files: tuple[str, ...]
    labels: np.ndarray  # int32, aligned with files


@dataclasses.dataclass(frozen=True)
class _Tree:
    classes: tuple[str, ...]
    train: _Split
    val: _Split


def _list_class_dirs(split_dir: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _list_images(class_dir: Path) -> list[str]:
    return sorted(
        e.path
        for e in os.scandir(class_dir)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


@functools.lru_cache(maxsize=8)
def _scan_imagefolder(root: str) -> _Tree:
    """Lists the tree once per process (cached: ImageNet's 1.3M files take seconds to list)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder data_dir {str(base)!r} does not exist or is not a directory")
    split_dirs = {name: base / name for name in ("train", "val")}
    missing = [str(d) for d in split_dirs.values() if not d.is_dir()]
    if missing:
        raise DataError(
            f"imagefolder data_dir {str(base)!r} must contain train/CLASS/* and val/CLASS/*; "
            f"missing: {', '.join(missing)}"
        )
    train_classes = _list_class_dirs(split_dirs["train"])
    val_classes = _list_class_dirs(split_dirs["val"])
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"class folders differ between {split_dirs['train']} and {split_dirs['val']}: "
            f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}"
        )
    if not train_classes:
        raise DataError(f"no class folders in {split_dirs['train']} (expected train/CLASS/*.jpg)")
    splits = {}
    for name, split_dir in split_dirs.items():
        files: list[str] = []
        labels: list[int] = []
        empty = []
        for label, cls in enumerate(train_classes):
            found = _list_images(split_dir / cls)
            if not found:
                empty.append(cls)
            files += found
            labels += [label] * len(found)
        if not files:
            raise DataError(
                f"no images in {split_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                f"in its {len(train_classes)} class folders)"
            )
        if empty:
            logger.warning(
                "%s: %d class folder(s) without images: %s", split_dir, len(empty), empty
            )
        splits[name] = _Split(tuple(files), np.asarray(labels, np.int32))
    return _Tree(tuple(train_classes), splits["train"], splits["val"])


# Undecodable images are detected lazily, when the pipeline first decodes them, instead of
# opening every file up front: a PIL verify() pass is fine for a small tree but takes many
# minutes on ImageNet, and it would run again in every process. Each process (worker processes
# included) records the distinct unreadable paths it met, logs them, and raises DataError as
# soon as the count exceeds max_bad_fraction of the split. The check is therefore per process:
# with several workers the limit is reached a little later than with one, never spuriously.
# What "skipped" means keeps batch shapes static and the pipeline deterministic:
#   * train: the slot of an unreadable file is filled by the next readable file in listing
#     order (same class in practice), so batch composition depends only on (seed, step), never
#     on num_workers or process_count, and iterator checkpoints stay exact;
#   * eval: the example is masked out (mask=False), so it does not count in the metrics.
_bad_lock = threading.Lock()
_bad_paths: dict[str, set[str]] = {}
_LOGGED_BAD_PATHS = 10


def unreadable_images() -> dict[str, list[str]]:
    """Undecodable image files met so far by this process, by split directory.

    Detection is lazy (at decode time), so this grows as the pipelines run; worker processes keep
    their own lists (and log them).
    """
    with _bad_lock:
        return {split: sorted(paths) for split, paths in _bad_paths.items()}


def _record_bad(split_dir: str, path: str, error: Exception, num_files: int, limit: float) -> None:
    with _bad_lock:
        seen = _bad_paths.setdefault(split_dir, set())
        is_new = path not in seen
        seen.add(path)
        count = len(seen)
        examples = sorted(seen)[:3]
    if is_new and (count <= _LOGGED_BAD_PATHS or count % 100 == 0):
        logger.warning(
            "skipping unreadable image %s (%s: %s); %d unreadable of %d in %s so far, e.g. %s",
            path,
            type(error).__name__,
            error,
            count,
            num_files,
            split_dir,
            examples,
        )
    if count > limit * num_files:
        raise DataError(
            f"{count} of the {num_files} images in {split_dir} are unreadable, more than "
            f"max_bad_fraction={limit:g} allows; e.g. {examples}"
        )


def _decode_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")  # convert() forces the full decode: errors surface here


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # OSError covers UnidentifiedImageError and truncated files; the others come from broken
    # headers of some formats and from absurd sizes.
    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _normalize(img) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def _random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of an Inception-style random crop (torchvision's algorithm)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # Fallback (rare: extreme aspect ratios): the central crop with the aspect clamped to ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclasses.dataclass(frozen=True)
class _ImageFolderLoader:
    """Decodes one example of an imagefolder split (train: augmented; eval: center crop).

    Holds only paths and settings; the file list is re-listed (cached) in each worker process
    instead of pickling 1.3M paths into every worker.
    """

    root: str
    split: str  # "train" | "val"
    image_size: int
    max_bad_fraction: float

    def _split(self) -> _Split:
        return getattr(_scan_imagefolder(self.root), self.split)

    def _load(self, index: int):
        """Decoded RGB image of file `index`, or the exception if it is unreadable."""
        split = self._split()
        try:
            return _decode_rgb(split.files[index])
        except _decode_errors() as e:
            split_dir = str(Path(self.root).expanduser() / self.split)
            _record_bad(split_dir, split.files[index], e, len(split.files), self.max_bad_fraction)
            return e

    def train_example(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        split = self._split()
        n = len(split.files)
        # Replace an unreadable file by the next readable one (see the comment on _bad_paths);
        # _record_bad raises long before this loop could go round the whole split.
        for k in range(n):
            i = (int(index) + k) % n
            img = self._load(i)
            if not isinstance(img, Exception):
                break
        else:  # pragma: no cover - only reachable with max_bad_fraction=1
            raise DataError(f"no readable image in {self.root}/{self.split}")
        from PIL import Image

        box = _random_resized_crop_box(img.width, img.height, rng)
        size = (self.image_size, self.image_size)
        img = img.resize(size, Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": _normalize(img), "label": split.labels[i]}

    def eval_example(self, position: int) -> dict[str, Any]:
        split = self._split()
        s = self.image_size
        if position >= len(split.files):  # padding of the last batch
            return {
                "image": np.zeros((s, s, 3), np.float32),
                "label": np.int32(0),
                "mask": np.bool_(False),
            }
        img = self._load(position)
        if isinstance(img, Exception):
            return {
                "image": np.zeros((s, s, 3), np.float32),
                "label": split.labels[position],
                "mask": np.bool_(False),
            }
        from PIL import Image

        short = int(s / _EVAL_CROP_FRACTION)
        w, h = img.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        return {"image": _normalize(img), "label": split.labels[position], "mask": np.bool_(True)}


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    loader: _ImageFolderLoader

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.loader.train_example(index, rng)


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    loader: _ImageFolderLoader

    def __call__(self, position: int) -> dict[str, Any]:
        return self.loader.eval_example(position)


# ---- public API ------------------------------------------------------------------------------


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Returns the static description of the dataset `cfg` names.

    Args:
      cfg: the data configuration.

    Raises:
      DataError: for an invalid configuration or (imagefolder) a malformed tree.
    """
    _check_config(cfg)
    if cfg.name == "digits":
        train_idx, eval_idx = _digits_split()
        info = DatasetInfo(
            num_classes=10,
            channels=1,
            image_size=cfg.image_size,
            num_train=len(train_idx),
            num_eval=len(eval_idx),
            class_names=[str(c) for c in range(10)],
        )
        return _check_matches(cfg, info)
    if cfg.name == "synthetic":
        num_classes = cfg.num_classes or 10
        return DatasetInfo(
            num_classes=num_classes,
            channels=cfg.channels or 3,
            image_size=cfg.image_size,
            num_train=_SYNTHETIC_NUM_TRAIN,
            num_eval=_SYNTHETIC_NUM_EVAL,
            class_names=[f"class_{c}" for c in range(num_classes)],
        )
    tree = _scan_imagefolder(str(cfg.data_dir))
    info = DatasetInfo(
        num_classes=len(tree.classes),
        channels=3,
        image_size=cfg.image_size,
        num_train=len(tree.train.files),
        num_eval=len(tree.val.files),
        class_names=list(tree.classes),
    )
    return _check_matches(cfg, info)


def steps_per_epoch(cfg: DataConfig, global_batch_size: int) -> int:
    """Training steps in one epoch: ``num_train // global_batch_size`` (the remainder is dropped).

    Args:
      cfg: the data configuration.
      global_batch_size: examples per step summed over all processes.

    Raises:
      DataError: if the batch is not positive or larger than the training set.
    """
    _local_batch(global_batch_size, 0, 1, "global_batch_size")
    num_train = dataset_info(cfg).num_train
    if global_batch_size > num_train:
        raise DataError(
            f"global_batch_size={global_batch_size} is larger than the {num_train} training "
            f"examples of {cfg.name}"
        )
    return num_train // global_batch_size


def _element_gather(cfg: DataConfig, split: str, num_examples: int, with_mask: bool):
    """Batch-level map for the in-memory datasets (None for imagefolder)."""
    if cfg.name == "digits":
        return _DigitsGather(cfg.image_size, split, num_examples, with_mask)
    if cfg.name == "synthetic":
        info = dataset_info(cfg)
        return _SyntheticGather(
            cfg.seed,
            split,
            cfg.image_size,
            info.channels,
            info.num_classes,
            num_examples,
            with_mask,
        )
    return None


def _ensure_absl_flags_parsed() -> None:
    # Grain's multiprocess prefetch reads absl flags (its --grain_* options) and fails with
    # UnparsedFlagAccessError unless the program parsed them, i.e. unless it runs under
    # absl.app. Marking them parsed keeps every flag at its default; an absl.app program has
    # already parsed them and is unaffected.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(cfg: DataConfig, ds: grain.MapDataset) -> grain.IterDataset:
    """MapDataset of batches -> IterDataset, read in-process or by worker processes."""
    if cfg.name == "imagefolder":
        # Decoding is real work: overlap it with training. Within a worker one thread suffices
        # (parallelism comes from the workers); in-process, `prefetch` threads each build a batch.
        threads = 1 if cfg.num_workers else cfg.prefetch
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=cfg.prefetch)
    else:
        # In-memory gathers take microseconds: a thread pool would cost more than it saves.
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    it_ds = ds.to_iter_dataset(read)
    if cfg.num_workers > 0:
        # Batching happens before to_iter_dataset, so each worker builds whole batches (worker w
        # takes batches w, w+W, ...) and their round-robin interleave restores the exact order:
        # the batches are the same for every num_workers.
        _ensure_absl_flags_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch
        )
        it_ds = it_ds.mp_prefetch(options)
    return it_ds


def train_iterator(
    cfg: DataConfig, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Infinite iterator over this process's share of the training batches.

    Each epoch is a fresh deterministic shuffle (from ``cfg.seed``) cut into
    ``steps_per_epoch`` global batches (the remainder is dropped, so batches never straddle
    epochs). Process ``p`` yields rows ``[p*b, (p+1)*b)`` of every global batch, where
    ``b = global_batch_size // process_count``; concatenating all processes' batches of a step
    in process order gives exactly the single-process global batch. Random augmentation is
    seeded per example and epoch, so it too is independent of ``process_count`` and
    ``num_workers``.

    Args:
      cfg: the data configuration.
      global_batch_size: examples per step summed over all processes.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      A Grain ``DatasetIterator`` of ``dict(image=(b, H, W, C) float32, label=(b,) int32)``.
      Its ``get_state()`` (a small JSON-able dict) and ``set_state()`` restore the exact
      position, so it can be checkpointed, e.g. with ``grain.checkpoint.CheckpointHandler``.
      The state's layout depends on ``num_workers``: restore with the same value. With
      ``num_workers > 0`` the arrays are Grain ``SharedMemoryArray`` (ndarray subclasses) and
      the iterator should be ``close()``d after use to stop its worker processes.

    Raises:
      DataError: if the batch does not divide among the processes or exceeds the dataset.
    """
    b = _local_batch(global_batch_size, process_index, process_count, "global_batch_size")
    steps = steps_per_epoch(cfg, global_batch_size)
    info = dataset_info(cfg)
    shuffle_seed, augment_seed = _seeds(cfg.seed)
    # Indices of one epoch, shuffled; Grain reshuffles every epoch (index // length) itself.
    ds = grain.MapDataset.range(info.num_train).shuffle(seed=shuffle_seed)
    ds = ds[: steps * global_batch_size]  # drop the remainder of every epoch
    gather = _element_gather(cfg, "train", info.num_train, with_mask=False)
    if gather is None:
        loader = _ImageFolderLoader(
            str(cfg.data_dir), "train", cfg.image_size, cfg.max_bad_fraction
        )
        # Applied before sharding: the rng is keyed on the global (epoch, position) index.
        ds = ds.random_map(_TrainExample(loader), seed=augment_seed)
    ds = ds.batch(b, drop_remainder=True)  # `process_count` consecutive blocks form one step
    ds = ds[process_index::process_count]
    ds = ds.repeat()
    if gather is not None:
        ds = ds.map(gather)
    return iter(_finish(cfg, ds))


def eval_batches(
    cfg: DataConfig, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """One deterministic pass over the held-out set, padded to full batches.

    ``batch_size`` is global, like the training batch: there are
    ``ceil(num_eval / batch_size)`` steps on every process, and process ``p`` yields rows
    ``[p*b, (p+1)*b)`` of each global batch (``b = batch_size // process_count``). Over all
    processes every example appears exactly once with ``mask=True``; the padding of the last
    batch (and, for imagefolder, undecodable files) has ``mask=False`` and zero images.

    Args:
      cfg: the data configuration.
      batch_size: examples per step summed over all processes.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      A re-iterable Grain ``IterDataset`` of
      ``dict(image=(b, H, W, C) float32, label=(b,) int32, mask=(b,) bool)``.

    Raises:
      DataError: if the batch does not divide among the processes.
    """
    b = _local_batch(batch_size, process_index, process_count, "batch_size")
    info = dataset_info(cfg)
    num_steps = -(-info.num_eval // batch_size)
    # Positions >= num_eval are padding; the loaders turn them into mask=False rows.
    ds = grain.MapDataset.range(num_steps * batch_size)
    gather = _element_gather(cfg, "eval", info.num_eval, with_mask=True)
    if gather is None:
        loader = _ImageFolderLoader(str(cfg.data_dir), "val", cfg.image_size, cfg.max_bad_fraction)
        ds = ds.map(_EvalExample(loader))
    ds = ds.batch(b)[process_index::process_count]
    if gather is not None:
        ds = ds.map(gather)
    return _finish(cfg, ds)
