"""SepViTConfig: the SepViT keyword arguments as one frozen dataclass, shared by all packages.

Part of the ground floor (`sepvit_jax.core`): it imports nothing but the standard library, so
`sepvit_torch` and the converter use it without pulling in JAX. Its fields are exactly the
keyword arguments of vit-pytorch's `SepViT`:

    SepViT(num_classes, dim, depth, heads, window_size=7, dim_head=32, ff_mult=4, channels=3,
           dropout=0.)

`heads` and `window_size` are an int (every stage) or a tuple with one entry per stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SepViTConfig:
    """The SepViT hyper-parameters (vit-pytorch's keyword arguments, nothing more).

    Args:
      num_classes: size of the classification head.
      dim: width of the first stage; stage i has width `dim * 2**i`.
      depth: number of transformer blocks per stage; its length is the number of stages.
      heads: attention heads, one int for every stage or a tuple per stage.
      window_size: side of the square attention windows, an int or a tuple per stage.
        (Upstream vit-pytorch ignores this argument and always uses 7; we honour it.)
      dim_head: width of one attention head (upstream ignores it and uses 32; we honour it).
      ff_mult: feed-forward expansion; the hidden width is `int(width * ff_mult)`.
      channels: input image channels.
      dropout: dropout rate of the attention maps and feed-forward blocks.
    """

    num_classes: int
    dim: int
    depth: tuple[int, ...]
    heads: int | tuple[int, ...]
    window_size: int | tuple[int, ...] = 7
    dim_head: int = 32
    ff_mult: float = 4
    channels: int = 3
    dropout: float = 0.0

    def __post_init__(self):
        _check_positive_int("num_classes", self.num_classes)
        _check_positive_int("dim", self.dim)
        _check_positive_int("dim_head", self.dim_head)
        _check_positive_int("channels", self.channels)
        if not isinstance(self.depth, tuple):
            raise ValueError(
                f"depth must be a tuple with one block count per stage, got {self.depth!r}"
            )
        if not self.depth:
            raise ValueError("depth must name at least one stage, got ()")
        for i, d in enumerate(self.depth):
            _check_positive_int(f"depth[{i}]", d)
        for name in ("heads", "window_size"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                if len(value) != self.num_stages:
                    raise ValueError(
                        f"{name} has {len(value)} entries {value!r} but depth {self.depth!r} "
                        f"has {self.num_stages} stages; give one per stage or a single int"
                    )
                for i, v in enumerate(value):
                    _check_positive_int(f"{name}[{i}]", v)
            else:
                _check_positive_int(name, value)
        if isinstance(self.ff_mult, bool) or not isinstance(self.ff_mult, int | float):
            raise ValueError(f"ff_mult must be a number, got {self.ff_mult!r}")
        if not math.isfinite(self.ff_mult) or int(self.dim * self.ff_mult) <= 0:
            raise ValueError(
                f"ff_mult={self.ff_mult!r} gives a feed-forward width of "
                f"{int(self.dim * self.ff_mult) if math.isfinite(self.ff_mult) else 'nan'}; "
                "it must be positive"
            )
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    # ---- per-stage views -------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.depth)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.dim * 2**i for i in range(self.num_stages))

    @property
    def stage_heads(self) -> tuple[int, ...]:
        return _per_stage(self.heads, self.num_stages)

    @property
    def stage_window_sizes(self) -> tuple[int, ...]:
        return _per_stage(self.window_size, self.num_stages)

    def ff_inner_dim(self, stage: int) -> int:
        return int(self.stage_dims[stage] * self.ff_mult)

    def feature_map_sizes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        """(H, W) of every stage's feature map for an input image of `height` x `width`.

        Stage 0's patch embedding has kernel 7, stride 4, padding 3; later stages kernel 3,
        stride 2, padding 1 (the usual conv output-size formula).
        """
        sizes = []
        h, w = height, width
        for i in range(self.num_stages):
            stride = 4 if i == 0 else 2
            kernel = 2 * stride - 1
            pad = kernel // 2
            h = (h + 2 * pad - kernel) // stride + 1
            w = (w + 2 * pad - kernel) // stride + 1
            sizes.append((h, w))
        return tuple(sizes)

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ValueError unless every stage's feature map tiles into whole windows."""
        for i, ((h, w), ws) in enumerate(
            zip(self.feature_map_sizes(height, width), self.stage_window_sizes, strict=True)
        ):
            if h % ws or w % ws:
                raise ValueError(
                    f"input {height}x{width}: stage {i} has a {h}x{w} feature map, which is not "
                    f"divisible by its window size {ws}"
                )

    def tiles(self, height: int, width: int) -> bool:
        """True when every stage's feature map of a `height` x `width` input tiles into windows."""
        return all(
            h % ws == 0 and w % ws == 0
            for (h, w), ws in zip(
                self.feature_map_sizes(height, width), self.stage_window_sizes, strict=True
            )
        )

    def smallest_image_size(self, limit: int = 8192) -> int:
        """The smallest square input side that tiles into whole windows in every stage."""
        side = next((s for s in range(1, limit) if self.tiles(s, s)), None)
        if side is None:
            raise ValueError(f"no input size up to {limit} tiles the windows {self.window_size}")
        return side

    def num_windows(self, height: int, width: int) -> tuple[int, ...]:
        """Number of attention windows per stage for an input image of `height` x `width`."""
        return tuple(
            (h // ws) * (w // ws)
            for (h, w), ws in zip(
                self.feature_map_sizes(height, width), self.stage_window_sizes, strict=True
            )
        )

    # ---- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SepViTConfig:
        """Build from a mapping (JSON lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown SepViT config keys {unknown}; expected some of {sorted(names)}"
            )
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in data
        )
        if missing:
            raise ValueError(f"SepViT config is missing required keys {missing}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> SepViTConfig:
        """Parse a JSON string, or read a `.json` file when given a path."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"SepViT config is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"SepViT config JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> SepViTConfig:
        return dataclasses.replace(self, **changes)


def _per_stage(value: int | tuple[int, ...], num_stages: int) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,) * num_stages


def format_value(value: Any) -> str:
    """A config value as flags write it: `7`, `7,7,14,7`."""
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


# ---- named variants ------------------------------------------------------------------------
# Widths of the SepViT paper (Li et al., 2022, table 1) in vit-pytorch's vocabulary, dim_head 32.
CONFIGS: dict[str, SepViTConfig] = {
    "sepvit_lite": SepViTConfig(
        num_classes=1000, dim=32, depth=(1, 2, 6, 2), heads=(1, 2, 4, 8), dim_head=32
    ),
    "sepvit_tiny": SepViTConfig(
        num_classes=1000, dim=96, depth=(1, 2, 6, 2), heads=(3, 6, 12, 24), dim_head=32
    ),
    "sepvit_small": SepViTConfig(
        num_classes=1000, dim=96, depth=(1, 2, 14, 2), heads=(3, 6, 12, 24), dim_head=32
    ),
    "sepvit_base": SepViTConfig(
        num_classes=1000, dim=128, depth=(1, 2, 14, 2), heads=(4, 8, 16, 32), dim_head=32
    ),
    # The default of train.py: 8x8 digits upsampled to 56x56 -> a 14x14 map (2x2 windows of 7),
    # then 7x7 (one window).
    "digits": SepViTConfig(
        num_classes=10, dim=32, depth=(1, 1), heads=(1, 2), dim_head=32, channels=1
    ),
    # Tiny, for tests: 56x56 inputs give 2x2 windows of 7, then one window.
    "testing": SepViTConfig(num_classes=10, dim=16, depth=(1, 1), heads=(1, 2), dim_head=8),
}


def get_config(name: str, **overrides: Any) -> SepViTConfig:
    """A named variant from CONFIGS, with keyword overrides (e.g. num_classes=10)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown SepViT variant {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]
