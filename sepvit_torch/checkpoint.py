"""Loading a `sepvit_torch.SepViT` (NCHW) from any SepViT checkpoint this project reads.

A PyTorch checkpoint (torch pickle or safetensors, raw or wrapped, see `convert.io`) or a
sepvit_jax checkpoint directory (`sepvit_jax.save` / `convert torch2flax`). The config comes from
the weights (and, for a directory, its config.json); see `convert.pipeline.resolve_config`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sepvit_torch.model import SepViT


def load(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
    **overrides,
) -> SepViT:
    """A float32 `sepvit_torch.SepViT` holding the weights of `path` (loaded with strict=True).

    Args:
      path: a torch/safetensors checkpoint file, or a sepvit_jax checkpoint directory; any
        stored precision becomes float32 (exactly, for float16 and bfloat16).
      key: for wrapped torch checkpoints with several state_dicts (e.g. "model_ema").
      unsafe_pickle: allow pickles that run code (trusted files only).
      **overrides: config fields for a torch checkpoint: `window_size` (default 7, upstream's)
        and `dropout`; other fields must agree with the weights.

    The model is returned in training mode, as torch modules are built; call `.eval()`.
    """
    from convert.io import CheckpointError, read_state_dict
    from convert.pipeline import check_state_dict, flax_dir_state_dict, resolve_config

    p = Path(path)
    if p.is_dir():
        if overrides or key:
            raise CheckpointError(
                f"{p} is a sepvit_jax checkpoint directory; its config.json fixes the config "
                "(no key or overrides)"
            )
        config, state_dict, _ = flax_dir_state_dict(p)
    else:
        state_dict = read_state_dict(p, key=key, unsafe_pickle=unsafe_pickle)
        config = resolve_config(state_dict, flags=overrides, flags_origin="argument").config
        check_state_dict(config, state_dict)
    model = SepViT.from_config(config)
    model.load_state_dict(
        {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in state_dict.items()},
        strict=True,
    )
    return model
