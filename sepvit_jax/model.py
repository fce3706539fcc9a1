"""SepViT in Flax NNX: stages of (overlapping patch embedding, PEG, transformer), then a head.

Input NHWC `(batch, height, width, channels)`. Same hyper-parameters as vit-pytorch's `SepViT`
(see `sepvit_jax.core.config.SepViTConfig`) and the same function: weights convert both ways through
the table in `sepvit_jax.core.table`. Module paths follow the torch names where they can:

    torch                                   here
    layers.{i}.0 / .1 / .2                  layers[i].patch_embed / .peg / .transformer
    layers.{i}.2.layers.{j}.0 / .1          layers[i].transformer.layers[j].attn / .ff
    mlp_head.1 / mlp_head.2                 mlp_head.norm / mlp_head.fc
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sepvit_jax.attention import DSSA
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.layers import (
    PEG,
    ChanLayerNorm,
    FeedForward,
    OverlappingPatchEmbed,
    torch_layer_norm,
    torch_linear,
)


class TransformerBlock(nnx.Module):
    """x + DSSA(x), then x + FeedForward(x)."""

    def __init__(self, attn: DSSA, ff: FeedForward):
        self.attn = attn
        self.ff = ff

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.attn(x) + x
        return self.ff(x) + x


class Transformer(nnx.Module):
    """`depth` TransformerBlocks, then a ChanLayerNorm (every stage but the last)."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        heads: int,
        dim_head: int,
        window_size: int,
        ff_inner_dim: int,
        dropout: float,
        norm_output: bool,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List(
            [
                TransformerBlock(
                    DSSA(
                        dim,
                        heads=heads,
                        dim_head=dim_head,
                        window_size=window_size,
                        dropout=dropout,
                        rngs=rngs,
                        **dtypes,
                    ),
                    FeedForward(dim, ff_inner_dim, dropout=dropout, rngs=rngs, **dtypes),
                )
                for _ in range(depth)
            ]
        )
        self.norm = ChanLayerNorm(dim, **dtypes) if norm_output else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.layers:
            x = block(x)
        return x if self.norm is None else self.norm(x)


class Stage(nnx.Module):
    """One resolution: patch embedding (downsampling), PEG, transformer."""

    def __init__(self, patch_embed: OverlappingPatchEmbed, peg: PEG, transformer: Transformer):
        self.patch_embed = patch_embed
        self.peg = peg
        self.transformer = transformer

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.transformer(self.peg(self.patch_embed(x)))


class MlpHead(nnx.Module):
    """Global mean pool over H and W, LayerNorm, Linear to the class logits."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = torch_layer_norm(dim, rngs=rngs, **dtypes)
        self.fc = torch_linear(dim, num_classes, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = x.astype(jnp.promote_types(x.dtype, jnp.float32)).mean(axis=(1, 2))
        return self.fc(self.norm(pooled.astype(x.dtype)))


class SepViT(nnx.Module):
    """The SepViT classifier on NHWC images.

    Args:
      num_classes, dim, depth, heads, window_size, dim_head, ff_mult, channels, dropout: the
        vit-pytorch keyword arguments, validated by `SepViTConfig`.
      rngs: `nnx.Rngs` for parameter init (stream `params`) and dropout (stream `dropout`).
      dtype: compute dtype (e.g. jnp.bfloat16); norms and softmax still run in float32.
      param_dtype: dtype of the parameters.

    `model.eval()` turns dropout off, `model.train()` on (the default, as in torch).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dim: int,
        depth: tuple[int, ...],
        heads: int | tuple[int, ...],
        window_size: int | tuple[int, ...] = 7,
        dim_head: int = 32,
        ff_mult: float = 4,
        channels: int = 3,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.config = SepViTConfig(
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            window_size=window_size,
            dim_head=dim_head,
            ff_mult=ff_mult,
            channels=channels,
            dropout=dropout,
        )
        cfg = self.config
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        widths = (channels, *cfg.stage_dims)
        self.layers = nnx.List(
            [
                Stage(
                    OverlappingPatchEmbed(
                        widths[i], widths[i + 1], stride=4 if i == 0 else 2, rngs=rngs, **dtypes
                    ),
                    PEG(widths[i + 1], rngs=rngs, **dtypes),
                    Transformer(
                        widths[i + 1],
                        depth=cfg.depth[i],
                        heads=cfg.stage_heads[i],
                        dim_head=dim_head,
                        window_size=cfg.stage_window_sizes[i],
                        ff_inner_dim=cfg.ff_inner_dim(i),
                        dropout=dropout,
                        norm_output=i < cfg.num_stages - 1,
                        rngs=rngs,
                        **dtypes,
                    ),
                )
                for i in range(cfg.num_stages)
            ]
        )
        self.mlp_head = MlpHead(widths[-1], num_classes, rngs=rngs, **dtypes)

    @classmethod
    def from_config(
        cls, config: SepViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ) -> SepViT:
        return cls(**config.to_dict(), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def check_input(self, x: jax.Array) -> None:
        """Raise ValueError for a batch this model cannot take (shapes are static under jit)."""
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D NHWC image batch, got shape {x.shape} ({x.ndim}-D)")
        if x.shape[-1] != self.config.channels:
            raise ValueError(
                f"expected {self.config.channels} input channels (NHWC last axis), got shape "
                f"{x.shape}"
            )
        self.config.check_image_size(x.shape[1], x.shape[2])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Every stage's output map, NHWC: a multi-scale backbone for detection/segmentation."""
        self.check_input(x)
        maps = []
        for stage in self.layers:
            x = stage(x)
            maps.append(x)
        return maps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.mlp_head(self.features(x)[-1])
