"""`--verify`: the torch reference and the converted Flax model on the same random batch.

Both run in float32, in eval mode, JAX matmuls at full precision; the logits must agree to
`VERIFY_RTOL` (max|diff| / max|reference|).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.model import SepViT
from sepvit_torch.model import SepViT as TorchSepViT

VERIFY_RTOL = 2e-5


@dataclasses.dataclass(frozen=True)
class Verification:
    max_abs: float
    max_rel: float
    image_size: tuple[int, int]
    batch: int

    @property
    def ok(self) -> bool:
        return self.max_rel <= VERIFY_RTOL


def round_through(state_dict: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """float32 copies of the weights as they are after storing them in `dtype`."""
    target = np.dtype(jnp.dtype(dtype))
    return {k: np.asarray(v).astype(target).astype(np.float32) for k, v in state_dict.items()}


def verify(
    config: SepViTConfig,
    state_dict: Mapping[str, np.ndarray],
    flax_model: SepViT,
    *,
    image_size: tuple[int, int] | None = None,
    seed=0,
) -> Verification:
    """Run the torch reference on `state_dict` and `flax_model` on one random batch.

    Give the state_dict (today's layout) rounded through the checkpoint's dtype
    (`round_through`) and a float32 `flax_model`: this checks the layout transforms and the
    files, not the precision. `image_size`: (H, W), default the smallest that tiles.
    """
    torch_model = TorchSepViT.from_config(config).eval()
    weights = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state_dict.items()}
    torch_model.load_state_dict(weights, strict=True)
    side = config.smallest_image_size()
    height, width = image_size or (side, side)
    batch = 2
    x = np.random.default_rng(seed).standard_normal(
        (batch, config.channels, height, width), np.float32
    )
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(x)).numpy().astype(np.float64)
    flax_model.eval()
    # One compiled program: op-by-op eager dispatch of a SepViT is several times slower.
    with jax.default_matmul_precision("highest"):
        got = nnx.jit(lambda m, images: m(images))(flax_model, x.transpose(0, 2, 3, 1))
    got = np.asarray(got, np.float64)
    diff = float(np.abs(got - reference).max())
    scale = float(np.abs(reference).max())
    rel = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
    return Verification(diff, rel, (height, width), batch)
