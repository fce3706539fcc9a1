"""SepViT in Flax NNX: stages of (overlapping patch embedding, PEG, transformer), then a head.

Input NHWC `(batch, height, width, channels)`. Same hyper-parameters as vit-pytorch's `SepViT`
(see `sepvit_jax.core.config.SepViTConfig`) and the same function: weights convert both ways through
the table in `sepvit_jax.core.table`. Module paths follow the torch names where they can:

    torch                                   here
    layers.{i}.0 / .1 / .2                  layers[i].patch_embed / .peg / .transformer
    layers.{i}.2.layers.{j}.0 / .1          layers[i].transformer.layers[j].attn / .ff
    mlp_head.1 / mlp_head.2                 mlp_head.norm / mlp_head.fc

Backbone API after timm's (`forward_features`, `forward_head`, `forward_intermediates`,
`feature_info`, `reset_classifier`); two training options outside `SepViTConfig`, which stays
exactly vit-pytorch's keyword arguments: `drop_path_rate` (stochastic depth) and `remat`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sepvit_jax.attention import DSSA
from sepvit_jax.core.backbone import (
    check_drop_path_rate,
    feature_info,
    select_stages,
    stochastic_depth_rates,
)
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.layers import (
    PEG,
    ChanLayerNorm,
    FeedForward,
    OverlappingPatchEmbed,
    drop_path_layer,
    torch_layer_norm,
    torch_linear,
)


class TransformerBlock(nnx.Module):
    """x + drop_path(DSSA(x)), then x + drop_path(FeedForward(x)).

    `drop_path` (stochastic depth, `layers.drop_path_layer`) is None unless the model was built
    with a `drop_path_rate`; the SepViT constructor sets it once every parameter exists.
    """

    def __init__(self, attn: DSSA, ff: FeedForward):
        self.attn = attn
        self.ff = ff
        self.drop_path = nnx.data(None)  # data: may later hold a layer with RNG state

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self._branch(self.attn(x)) + x  # parity: branch + x, the order torch adds in
        return self._branch(self.ff(x)) + x

    def _branch(self, y: jax.Array) -> jax.Array:
        return y if self.drop_path is None else self.drop_path(y)


def _call_block(block: TransformerBlock, x: jax.Array) -> jax.Array:
    return block(x)


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
        remat: bool = False,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.remat = remat
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
            # remat: keep only each block's input for the backward pass and recompute the rest
            # (memory for compute). nnx.remat replays the block's RNG state, so dropout and drop
            # path draw the same masks in the recomputation.
            x = nnx.remat(_call_block)(block, x) if self.remat else block(x)
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

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        pooled = x.astype(jnp.promote_types(x.dtype, jnp.float32)).mean(axis=(1, 2))
        features = self.norm(pooled.astype(x.dtype))
        return features if pre_logits else self.fc(features)


class SepViT(nnx.Module):
    """The SepViT classifier on NHWC images.

    Args:
      num_classes, dim, depth, heads, window_size, dim_head, ff_mult, channels, dropout: the
        vit-pytorch keyword arguments, validated by `SepViTConfig`.
      rngs: `nnx.Rngs` for parameter init (stream `params`) and dropout (stream `dropout`).
      dtype: compute dtype (e.g. jnp.bfloat16); norms and softmax still run in float32.
      param_dtype: dtype of the parameters.
      drop_path_rate: stochastic depth (timm's schedule): block k of all K blocks, counted over
        every stage in order, drops each of its two residual branches per sample with
        probability `drop_path_rate * k / (K - 1)`. Draws from the `dropout` stream. At 0 (the
        default) the model is exactly the one without it: same function, parameters and state.
      remat: recompute each transformer block in the backward pass instead of storing its
        activations (`nnx.remat`); same values and gradients, less memory.

    `model.eval()` turns dropout and drop path off, `model.train()` on (the default, as in torch).
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
        drop_path_rate: float = 0.0,
        remat: bool = False,
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
        check_drop_path_rate(drop_path_rate)
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
                        remat=remat,
                        **dtypes,
                    ),
                )
                for i in range(cfg.num_stages)
            ]
        )
        self.mlp_head = MlpHead(widths[-1], num_classes, rngs=rngs, **dtypes)
        # Last: forking RNG streams for drop path advances `rngs`, and doing it after every
        # parameter exists keeps a seed's initial weights the same with or without it.
        rates = stochastic_depth_rates(cfg.depth, drop_path_rate)
        for stage, stage_rates in zip(self.layers, rates, strict=True):
            for block, rate in zip(stage.transformer.layers, stage_rates, strict=True):
                block.drop_path = drop_path_layer(rate, rngs)

    @classmethod
    def from_config(
        cls,
        config: SepViTConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        drop_path_rate: float = 0.0,
        remat: bool = False,
    ) -> SepViT:
        return cls(
            **config.to_dict(),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            drop_path_rate=drop_path_rate,
            remat=remat,
        )

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

    # ---- backbone API (timm's names and result shapes) ---------------------------------------

    @property
    def feature_info(self) -> list[dict]:
        """Per stage: channels, total stride and module path (`layers.{i}`, as in torch)."""
        return feature_info(self.config)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Every stage's output map, NHWC: a multi-scale backbone for detection/segmentation."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The last stage's map (B, H/2**(S+1), W/2**(S+1), C), what `forward_head` takes."""
        return self.forward_intermediates(x, 1, intermediates_only=True)[0]

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Mean pool and LayerNorm of a `forward_features` map, then the classifier (logits).

        pre_logits: stop before the classifier: the (B, C) pooled, normalised features.
        """
        return self.mlp_head(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: jax.Array,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NHWC",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """Stage output maps, as timm's `forward_intermediates`.

        Args:
          x: (B, H, W, C) images.
          indices: the stages to return: None all, an int n the last n, a sequence of stage
            indices (negative count from the end). Maps come in stage order, once each.
          norm: every returned map normalised over channels. Stages but the last end in their
            own ChanLayerNorm (the map the next stage reads), so they are unchanged; the last
            stage, which has none, gets the head's LayerNorm (`mlp_head.norm`) at every
            position, as timm's hierarchical models apply their final norm to the last
            intermediate. (The classifier pools first and normalises after.)
          output_fmt: layout of the returned maps, "NHWC" (default) or "NCHW".
          intermediates_only: return only the list of maps.
          stop_early: run no stage past the last requested one. Only with intermediates_only:
            the final features need every stage.

        Returns:
          The maps, or `(final, maps)` with `final` = `forward_features(x)` (NHWC, always).
        """
        num_stages = self.config.num_stages
        take = select_stages(num_stages, indices)
        layout = _output_layout(output_fmt)
        self.check_input(x)
        end = take[-1] + 1 if stop_early and intermediates_only else num_stages
        maps = []
        for i in range(end):
            x = self.layers[i](x)
            if i in take:
                y = self.mlp_head.norm(x) if norm and i == num_stages - 1 else x
                maps.append(layout(y))
        return maps if intermediates_only else (x, maps)

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs) -> None:
        """A new, freshly initialised classifier for `num_classes`; `config` follows."""
        config = self.config.replace(num_classes=num_classes)  # validates num_classes first
        old = self.mlp_head.fc
        self.mlp_head.fc = torch_linear(
            old.in_features, num_classes, rngs=rngs, dtype=old.dtype, param_dtype=old.param_dtype
        )
        self.config = config

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


def _output_layout(output_fmt: str):
    if output_fmt == "NHWC":
        return lambda y: y
    if output_fmt == "NCHW":
        return lambda y: jnp.transpose(y, (0, 3, 1, 2))
    raise ValueError(f'output_fmt must be "NHWC" or "NCHW", got {output_fmt!r}')
