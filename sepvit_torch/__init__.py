"""sepvit_torch: the PyTorch SepViT, state_dict-compatible with vit-pytorch's `SepViT` (NCHW).

Importing it never imports JAX: the shared `SepViTConfig` lives in a JAX-free module.
"""

from sepvit_jax.config import CONFIGS, SepViTConfig, get_config
from sepvit_torch.checkpoint import load
from sepvit_torch.model import (
    DSSA,
    PEG,
    ChanLayerNorm,
    FeedForward,
    OverlappingPatchEmbed,
    SepViT,
    Transformer,
)

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
