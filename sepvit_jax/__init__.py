"""sepvit_jax: SepViT (Separable Vision Transformer) in Flax NNX, NHWC.

Computes the same function as vit-pytorch's `SepViT` (and `sepvit_torch.SepViT`); weights convert
both ways with `convert`. The ground floor (`sepvit_jax.core`: config, weight table, checkpoint
format, torch file reading) imports neither JAX nor torch; the model and its checkpoints load
lazily, on first use of these names.
"""

import importlib

from sepvit_jax.core.config import CONFIGS, SepViTConfig, get_config

_LAZY = {
    "SepViT": "sepvit_jax.model",
    "load": "sepvit_jax.checkpoint",
    "save": "sepvit_jax.checkpoint",
    "from_torch": "sepvit_jax.checkpoint",
    "create_model": "sepvit_jax.registry",
    "list_models": "sepvit_jax.registry",
    "export": "sepvit_jax.stablehlo",
    "load_exported": "sepvit_jax.stablehlo",
}

__all__ = ["CONFIGS", "SepViTConfig", "get_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sepvit_jax' has no attribute {name!r}")
