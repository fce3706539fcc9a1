"""convert: PyTorch SepViT checkpoints <-> sepvit_jax, through the one weight table.

The command line is `convert.cli` (`convert`, `sepvit-convert`, `python -m convert`). The
functions below are offered here for the README's examples; they live with the models
(`sepvit_jax.checkpoint`) and the ground floor (`sepvit_jax.core.table`) and load on first use.
"""

import importlib

_LAZY = {
    "nnx_to_state_dict": "sepvit_jax.checkpoint",
    "state_dict_to_nnx": "sepvit_jax.checkpoint",
    "weight_table": "sepvit_jax.core.table",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
