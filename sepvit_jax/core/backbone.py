"""Backbone rules both models share (pure Python): stage selection, feature info, drop path.

`sepvit_jax.SepViT` and `sepvit_torch.SepViT` expose the same timm-style backbone API and the
same stochastic depth; the rules that need no tensor library live here, once.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from sepvit_jax.core.config import SepViTConfig


def feature_info(config: SepViTConfig) -> list[dict]:
    """Per stage: channels, total stride and module path (`layers.{i}` in both models)."""
    return [
        dict(num_chs=width, reduction=4 * 2**i, module=f"layers.{i}")
        for i, width in enumerate(config.stage_dims)
    ]


def stochastic_depth_rates(depth: tuple[int, ...], rate: float) -> list[list[float]]:
    """Per stage, the drop-path rate of each block: 0 to `rate` linearly over all blocks.

    timm's schedule (`torch.linspace(0, rate, sum(depth))`), in Python floats so that both
    models get bit-identical rates.
    """
    total = sum(depth)
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    starts = [sum(depth[:s]) for s in range(len(depth))]
    return [flat[start : start + d] for start, d in zip(starts, depth, strict=True)]


def check_drop_path_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate!r}")


def select_stages(num_stages: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's `indices` as sorted, distinct stage indices; ValueError when out of range."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the last n stages needs 1 <= n <= {num_stages}")
        return list(range(num_stages - int(indices), num_stages))
    chosen = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"stage indices must be ints, got {i!r} in {indices!r}")
        if not -num_stages <= i < num_stages:
            raise ValueError(
                f"stage index {i} is out of range for {num_stages} stages "
                f"({-num_stages} to {num_stages - 1})"
            )
        chosen.add(int(i) % num_stages)
    if not chosen:
        raise ValueError("indices names no stage")
    return sorted(chosen)
