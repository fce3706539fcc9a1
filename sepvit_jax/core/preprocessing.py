"""What a model expects of its input: the preprocessing record every saved model carries.

Stored in a checkpoint directory's sepvit.json (`"preprocessing"`), shown by `convert inspect`,
exposed by `sepvit_jax.create_model`, read by `train.py --init-from / --eval-only` and copied
into exported programs' sidecars. `origin` says how much to trust it: "trained" (the pipeline a
run used), "given" (flags of the converter) or "default" (a converted checkpoint says nothing
about its preprocessing: timm's ImageNet defaults are assumed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from sepvit_jax.core.config import SepViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
ORIGINS = ("trained", "given", "default")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images become the model's NHWC input.

    Args:
      image_size: (height, width) the model was trained or verified at.
      mean, std: per channel, applied to pixels scaled to [0, 1].
      interpolation: resampling of the resize ("bilinear", "bicubic", "nearest").
      crop_fraction: evaluation resizes the short side to image_size / crop_fraction, then
        takes the central crop.
      origin: "trained", "given" or "default" (see the module docstring).
    """

    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_fraction: float = 0.875
    origin: str = "default"

    def __post_init__(self):
        if len(self.image_size) != 2 or any(int(s) != s or s <= 0 for s in self.image_size):
            raise ValueError(f"image_size must be (height, width) > 0, got {self.image_size!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean!r} and std {self.std!r} need one value a channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if self.origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {self.origin!r}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self, config: SepViTConfig | None = None) -> dict[str, Any]:
        """JSON-able; with `config`, also the square sizes up to 1024 whose windows tile."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        if config is not None:
            data["tiled_sizes"] = tiled_sizes(config)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(f"bad preprocessing record {dict(data)!r}: {err}") from None

    def replace(self, **changes: Any) -> Preprocessing:
        return dataclasses.replace(self, **changes)


def tiled_sizes(config: SepViTConfig, limit: int = 1024) -> list[int]:
    """Every square input side up to `limit` whose feature maps tile into whole windows."""
    return [side for side in range(1, limit + 1) if config.tiles(side, side)]


def nearest_tiled_sizes(config: SepViTConfig, side: int) -> list[int]:
    """The tiling square sides nearest below and above `side` (one if `side` tiles).

    Tiling sides come in runs of consecutive values (a stride-4 patch embedding maps 221..224 to
    the same map); the top of each run, a multiple of the total stride, is the one offered.
    """
    sizes = tiled_sizes(config, limit=max(1024, 2 * side + 64))
    tops = [s for s in sizes if s + 1 not in sizes]
    if side in sizes:
        return [side]
    below = [s for s in tops if s < side][-1:]
    above = [s for s in tops if s > side][:1]
    return below + above


def default_image_size(config: SepViTConfig) -> int:
    """224 when it tiles the model's windows, else the tiling side nearest to it."""
    candidates = nearest_tiled_sizes(config, DEFAULT_IMAGE_SIZE)
    return min(candidates, key=lambda s: (abs(s - DEFAULT_IMAGE_SIZE), s))


def imagenet(
    config: SepViTConfig,
    image_size: int | Sequence[int] | None = None,
    *,
    interpolation: str = "bicubic",
    origin: str = "default",
) -> Preprocessing:
    """ImageNet statistics (timm's defaults for DeiT-style recipes) for a 3-channel model;
    other channel counts get mean 0.5 and std 0.5."""
    side = image_size or default_image_size(config)
    size = (side, side) if isinstance(side, int) else tuple(side)
    if config.channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.5,) * config.channels, (0.5,) * config.channels
    return Preprocessing(size, mean, std, interpolation=interpolation, origin=origin)
