"""The bridge from any SepViT checkpoint to the PyTorch model: `sepvit_torch.load`.

It sits above both models: a torch file needs only the ground floor and `sepvit_torch`; a
sepvit_jax directory is read through `sepvit_jax.checkpoint` (JAX and Orbax, imported only for
that case, so that torch-only users never import JAX).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sepvit_jax.core import table
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.infer import resolve_config
from sepvit_jax.core.layouts import CURRENT
from sepvit_jax.core.torch_io import read_state_dict
from sepvit_torch.model import SepViT


def load_torch_model(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
    **overrides,
) -> SepViT:
    """A float32 `sepvit_torch.SepViT` holding the weights of `path` (loaded with strict=True).

    Args:
      path: a torch/safetensors checkpoint file (any layout vit-pytorch has written), or a
        sepvit_jax checkpoint directory; any stored precision becomes float32 (exactly, for
        float16 and bfloat16).
      key: for wrapped torch checkpoints with several state_dicts (e.g. "model_ema").
      unsafe_pickle: allow pickles that run code (trusted files only).
      **overrides: config fields for a torch checkpoint: `window_size` (default 7, upstream's)
        and `dropout`; other fields must agree with the weights.

    The model is returned in training mode, as torch modules are built; call `.eval()`.
    """
    p = Path(path)
    if p.is_dir():
        if overrides or key:
            raise CheckpointError(
                f"{p} is a sepvit_jax checkpoint directory; its config.json fixes the config "
                "(no key or overrides)"
            )
        from sepvit_jax.checkpoint import directory_state_dict  # JAX and Orbax: heavy

        config, state_dict, _ = directory_state_dict(p)
    else:
        state_dict = read_state_dict(p, key=key, unsafe_pickle=unsafe_pickle)
        resolved = resolve_config(
            state_dict, flags=overrides, flags_origin="argument", source=str(p)
        )
        config = resolved.config
        if resolved.layout is not CURRENT:  # an older vit-pytorch layout: today's names
            params = table.to_flax(config, state_dict, rows=resolved.layout.table(config))
            state_dict = table.to_torch(config, params)
    model = SepViT.from_config(config)
    model.load_state_dict(
        {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in state_dict.items()},
        strict=True,
    )
    return model
