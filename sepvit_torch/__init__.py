"""sepvit_torch: the PyTorch SepViT, state_dict-compatible with vit-pytorch's `SepViT` (NCHW).

Importing it never imports JAX: the shared `SepViTConfig` lives in the JAX-free ground floor,
`sepvit_jax.core`. `sepvit_torch.load` reads torch checkpoints and sepvit_jax directories alike;
it is the converter's bridge (`convert.bridge.load_torch_model`), loaded on first use.
"""

import importlib

from sepvit_jax.core.config import CONFIGS, SepViTConfig, get_config
from sepvit_torch.model import (
    DSSA,
    PEG,
    ChanLayerNorm,
    FeedForward,
    OverlappingPatchEmbed,
    SepViT,
    Transformer,
)

_BRIDGES = {"load": ("convert.bridge", "load_torch_model")}

__all__ = [
    "CONFIGS",
    "DSSA",
    "PEG",
    "ChanLayerNorm",
    "FeedForward",
    "OverlappingPatchEmbed",
    "SepViT",
    "SepViTConfig",
    "Transformer",
    "get_config",
    "load",
]


def __getattr__(name):
    if name in _BRIDGES:
        module, attribute = _BRIDGES[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'sepvit_torch' has no attribute {name!r}")
