"""An ImageNet-style tree `DIR/{train,val}/CLASS/*.jpg`, decoded with Pillow.

Training: random-resized-crop, horizontal flip, optionally RandAugment, normalisation,
optionally random erasing (DeiT's order); evaluation: resize and center crop, normalisation. The
ImageNet mean and std normalise both. Unreadable images are skipped, counted and reported.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sepvit_jax.data.config import DataError
from sepvit_jax.data.erasing import random_erasing
from sepvit_jax.data.randaugment import RandAugment
from sepvit_jax.data.transforms import normalize, random_resized_crop_box

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_EVAL_CROP_FRACTION = 0.875


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
def scan(root: str) -> _Tree:
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
# soon as the count exceeds max_bad_fraction of its share of the split: each of the `readers`
# processes (workers x JAX processes) decodes about 1/readers of the files of an epoch.
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


def _record_bad(
    split_dir: str, path: str, error: Exception, num_files: int, limit: float, readers: int
) -> None:
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
    if count > limit * num_files / readers:
        raise DataError(
            f"{count} of the {num_files} images in {split_dir} are unreadable, more than "
            f"max_bad_fraction={limit:g} allows; e.g. {examples}"
        )


def _decode_rgb(path: str):
    with Image.open(path) as im:
        return im.convert("RGB")  # convert() forces the full decode: errors surface here


# OSError covers UnidentifiedImageError and truncated files; the others come from broken headers
# of some formats and from absurd sizes.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Loader:
    """Decodes one example of an imagefolder split (train: augmented; eval: center crop).

    Holds only paths and settings; the file list is re-listed (cached) in each worker process
    instead of pickling 1.3M paths into every worker.
    """

    root: str
    split: str  # "train" | "val"
    image_size: int
    max_bad_fraction: float
    readers: int = 1  # processes decoding this split in parallel (for the unreadable limit)

    def _split(self) -> _Split:
        return getattr(scan(self.root), self.split)

    def _load(self, index: int):
        """Decoded RGB image of file `index`, or the exception if it is unreadable."""
        split = self._split()
        try:
            return _decode_rgb(split.files[index])
        except _DECODE_ERRORS as e:
            split_dir = str(Path(self.root).expanduser() / self.split)
            _record_bad(
                split_dir,
                split.files[index],
                e,
                len(split.files),
                self.max_bad_fraction,
                self.readers,
            )
            return e

    def train_crop(self, index: int, rng: np.random.Generator):
        """(PIL image, label) of file `index` (or its stand-in), randomly cropped and flipped."""
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
        box = random_resized_crop_box(img.width, img.height, rng)
        size = (self.image_size, self.image_size)
        img = img.resize(size, Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img, split.labels[i]

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
        short = int(s / _EVAL_CROP_FRACTION)
        w, h = img.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        return {"image": normalize(img), "label": split.labels[position], "mask": np.bool_(True)}


@dataclasses.dataclass(frozen=True)
class TrainExample:
    """One augmented example, every draw from the record's `rng`; the defaults draw nothing more
    than crop and flip, so they leave the pipeline bitwise as it was before augmentations."""

    loader: Loader
    randaugment: RandAugment | None = None
    erasing: float = 0.0  # probability of random erasing, timm's "pixel" mode

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        img, label = self.loader.train_crop(index, rng)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        image = normalize(img)
        if self.erasing > 0:
            image = random_erasing(image, rng, self.erasing, mode="pixel")
        return {"image": image, "label": label}


@dataclasses.dataclass(frozen=True)
class EvalExample:
    loader: Loader

    def __call__(self, position: int) -> dict[str, Any]:
        return self.loader.eval_example(position)
