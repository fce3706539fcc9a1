"""Models by name, as timm, big_vision and bonsai create them: `list_models`, `create_model`.

    model = sepvit_jax.create_model("sepvit_tiny", checkpoint="tiny_flax", num_classes=10)
    model.preprocessing  # input size, mean/std, interpolation, crop (core.preprocessing)

A name is a named variant (`sepvit_jax.CONFIGS`, `testing` included); a checkpoint is a
directory written by `convert torch2flax`, `train.py` or `sepvit_jax.save`, or a PyTorch file
(read through the converter's reader; needs torch). The checkpoint's architecture must be the
named variant's (`num_classes` may differ: a new, zero-initialised head is made, as for
fine-tuning).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sepvit_jax.checkpoint import describe, from_torch, load
from sepvit_jax.core.config import CONFIGS, SepViTConfig, get_config
from sepvit_jax.core.preprocessing import imagenet
from sepvit_jax.model import SepViT

# Model keywords that are not SepViTConfig fields.
_MODEL_OPTIONS = ("drop_path_rate", "remat")


def list_models() -> list[str]:
    """The names `create_model` knows."""
    return sorted(CONFIGS)


def create_model(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    dtype=None,
    param_dtype=None,
    **overrides: Any,
) -> SepViT:
    """The named SepViT, randomly initialised or with a checkpoint's weights.

    Args:
      name: a named variant (`list_models()`).
      checkpoint: a sepvit_jax checkpoint directory or a PyTorch checkpoint file.
      num_classes: the head's size (default: the checkpoint's, else the variant's).
      seed: initialisation and dropout seed.
      dtype, param_dtype: compute and parameter dtypes (default float32).
      **overrides: SepViTConfig fields (e.g. `window_size=7`, `dropout=0.1`) and the model
        options `drop_path_rate`, `remat`.

    The model carries `preprocessing` (the checkpoint's record, else ImageNet's defaults) and
    `class_names` (when the checkpoint knows them).
    """
    options = {k: overrides.pop(k) for k in _MODEL_OPTIONS if k in overrides}
    config = get_config(name, **overrides)
    dtypes = dict(dtype=jnp.dtype(dtype or "float32"), param_dtype=param_dtype)
    if checkpoint is None:
        config = config.replace(num_classes=num_classes or config.num_classes)
        model = SepViT.from_config(
            config, rngs=nnx.Rngs(seed), dtype=dtypes["dtype"],
            param_dtype=jnp.dtype(param_dtype or "float32"), **options,
        )  # fmt: skip
        return describe(model, imagenet(config))
    model = _from_checkpoint(Path(checkpoint), seed, dtypes, overrides)
    _check_architecture(name, config, model.config)
    if options:
        raise ValueError(f"{sorted(options)} apply to new models only, not to a checkpoint")
    if num_classes is not None and num_classes != model.config.num_classes:
        _reset_head(model, num_classes, seed)
    return model


def _from_checkpoint(path: Path, seed: int, dtypes: dict, overrides: dict) -> SepViT:
    if path.is_dir():
        return load(path, seed=seed, **dtypes)
    model = from_torch(path, seed=seed, **dtypes, **overrides)
    return describe(model, imagenet(model.config))


def _check_architecture(name: str, wanted: SepViTConfig, found: SepViTConfig) -> None:
    differs = [
        f"{field}={getattr(found, field)!r} (not {getattr(wanted, field)!r})"
        for field in ("dim", "depth", "heads", "dim_head", "ff_mult", "channels", "window_size")
        if getattr(found, field) != getattr(wanted, field)
    ]
    if differs:
        raise ValueError(f"the checkpoint is not a {name}: it has {', '.join(differs)}")


def _reset_head(model: SepViT, num_classes: int, seed: int) -> None:
    """A zero-initialised head of `num_classes` (as big_vision fine-tunes); names dropped."""
    model.reset_classifier(num_classes, rngs=nnx.Rngs(seed))
    for weight in (model.mlp_head.fc.kernel, model.mlp_head.fc.bias):
        weight.set_value(jnp.zeros_like(weight.get_value()))
    model.class_names = None
