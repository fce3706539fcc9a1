"""SepViT in PyTorch: the reference model, state_dict-compatible with vit-pytorch's `SepViT`.

Layout NCHW. Module names and parameter shapes follow vit-pytorch exactly, so an upstream
checkpoint loads with `strict=True`; every tensor name and shape is a row of the weight table,
`sepvit_jax.core.table`. Unlike upstream, `window_size` (int or per-stage tuple) and `dim_head` are
honoured: vit-pytorch never passes them on to its blocks, so every upstream model is really
window size 7, dim_head 32, whatever it was constructed with.

Backbone API after timm's (`forward_features`, `forward_head`, `forward_intermediates`,
`feature_info`, `reset_classifier`) and stochastic depth (`drop_path_rate`), the same as
`sepvit_jax.SepViT`'s; neither changes the state_dict.

Axis legend used in the einops patterns: b batch, c/d channels, x/y window grid, w1/w2 position
inside a window, h heads, n windows, i/j query/key positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from einops.layers.torch import Rearrange, Reduce
from torch import nn

from sepvit_jax.core.backbone import (
    check_drop_path_rate,
    feature_info,
    select_stages,
    stochastic_depth_rates,
)
from sepvit_jax.core.config import SepViTConfig


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch: zero whole samples with probability `rate`.

    Kept samples are scaled by 1/(1 - rate), so the expectation is unchanged; identity in eval
    mode and at rate 0.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x / keep * mask


class ChanLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW map (biased variance, eps inside the sqrt)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class OverlappingPatchEmbed(nn.Module):
    """Strided conv with kernel 2*stride-1 and symmetric padding kernel//2."""

    def __init__(self, dim_in: int, dim_out: int, stride: int = 2):
        super().__init__()
        kernel_size = stride * 2 - 1
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, stride=stride, padding=kernel_size // 2)

    def forward(self, x):
        return self.conv(x)


class PEG(nn.Module):
    """Positional encoding generator: residual depthwise 3x3 conv."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x):
        return self.proj(x) + x


class FeedForward(nn.Module):
    """Pre-norm MLP of 1x1 convs; indices 0, 1, 4 of `net` carry weights (upstream names)."""

    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(
            ChanLayerNorm(dim),
            nn.Conv2d(dim, inner_dim, 1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(inner_dim, dim, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class DSSA(nn.Module):
    """Depthwise-separable self-attention: attention inside windows, then among windows.

    Each window is prefixed with a learned window token. Attention within a window mixes its
    ws*ws tokens; the window tokens' outputs then give per-head queries and keys for an n x n
    attention over windows, which mixes whole window feature maps.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, window_size: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.window_size = window_size
        inner_dim = heads * dim_head

        self.norm = ChanLayerNorm(dim)
        self.attend = nn.Sequential(nn.Softmax(dim=-1), nn.Dropout(dropout))
        self.to_qkv = nn.Conv1d(dim, inner_dim * 3, 1, bias=False)
        self.window_tokens = nn.Parameter(torch.randn(dim))
        self.window_tokens_to_qk = nn.Sequential(
            nn.LayerNorm(dim_head),
            nn.GELU(),
            Rearrange("b h n c -> b (h c) n"),
            nn.Conv1d(inner_dim, inner_dim * 2, 1),
            Rearrange("b (h c) n -> b h n c", h=heads),
        )
        self.window_attend = nn.Sequential(nn.Softmax(dim=-1), nn.Dropout(dropout))
        self.to_out = nn.Sequential(nn.Conv2d(inner_dim, dim, 1), nn.Dropout(dropout))

    def forward(self, x):
        batch, _, height, width = x.shape
        ws, heads = self.window_size, self.heads
        num_x, num_y = height // ws, width // ws

        x = self.norm(x)
        windows = rearrange(x, "b c (x w1) (y w2) -> (b x y) c (w1 w2)", w1=ws, w2=ws)
        tokens = self.window_tokens.view(1, -1, 1).expand(windows.shape[0], -1, 1)
        windows = torch.cat((tokens, windows), dim=-1)

        q, k, v = self.to_qkv(windows).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h d) n -> b h n d", h=heads) for t in (q, k, v))
        attn = self.attend(torch.einsum("bhid,bhjd->bhij", q * self.scale, k))
        out = attn @ v
        window_out, fmaps = out[:, :, 0], out[:, :, 1:]

        if num_x * num_y > 1:
            window_out = rearrange(window_out, "(b n) h d -> b h n d", b=batch)
            fmaps = rearrange(fmaps, "(b n) h t d -> b h n (t d)", b=batch)
            w_q, w_k = self.window_tokens_to_qk(window_out).chunk(2, dim=-1)
            window_attn = self.window_attend(torch.einsum("bhid,bhjd->bhij", w_q * self.scale, w_k))
            fmaps = torch.einsum("bhij,bhjm->bhim", window_attn, fmaps)
            fmaps = rearrange(fmaps, "b h n (t d) -> (b n) h t d", d=self.dim_head)

        fmap = rearrange(
            fmaps,
            "(b x y) h (w1 w2) d -> b (h d) (x w1) (y w2)",
            x=num_x,
            y=num_y,
            w1=ws,
            w2=ws,
        )
        return self.to_out(fmap)


class Transformer(nn.Module):
    """`depth` blocks of (DSSA, FeedForward) with residuals, then an optional ChanLayerNorm.

    `drop_path_rates`: per block, the stochastic-depth rate of both its residual branches
    (default none); they hold no parameters, so the state_dict is the same.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        window_size: int,
        ff_mult: float,
        dropout: float,
        norm_output: bool,
        drop_path_rates: Sequence[float] | None = None,
    ):
        super().__init__()
        self.drop_path_rates = tuple(drop_path_rates or (0.0,) * depth)
        if len(self.drop_path_rates) != depth:
            raise ValueError(f"{len(self.drop_path_rates)} drop_path_rates for {depth} blocks")
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    DSSA(dim, heads, dim_head, window_size, dropout),
                    FeedForward(dim, ff_mult, dropout),
                ]
            )
            for _ in range(depth)
        )
        self.norm = ChanLayerNorm(dim) if norm_output else nn.Identity()

    def forward(self, x):
        for (attn, ff), rate in zip(self.layers, self.drop_path_rates, strict=True):
            x = drop_path(attn(x), rate, self.training) + x
            x = drop_path(ff(x), rate, self.training) + x
        return self.norm(x)


class SepViT(nn.Module):
    """SepViT classifier on NCHW images; the keyword arguments are those of `SepViTConfig`.

    Args:
      num_classes, dim, depth, heads, window_size, dim_head, ff_mult, channels, dropout: see
        `sepvit_jax.core.config.SepViTConfig`.
      drop_path_rate: stochastic depth (timm's schedule): block k of all K blocks, counted over
        every stage in order, drops each of its two residual branches per sample with
        probability `drop_path_rate * k / (K - 1)` in training mode. Not part of the config;
        at 0 (the default) the model is exactly the one without it.
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
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
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
        dims = (channels, *cfg.stage_dims)
        last = cfg.num_stages - 1
        rates = stochastic_depth_rates(cfg.depth, drop_path_rate)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    OverlappingPatchEmbed(dims[i], dims[i + 1], stride=4 if i == 0 else 2),
                    PEG(dims[i + 1]),
                    Transformer(
                        dims[i + 1],
                        cfg.depth[i],
                        cfg.stage_heads[i],
                        dim_head,
                        cfg.stage_window_sizes[i],
                        ff_mult,
                        dropout,
                        norm_output=i != last,
                        drop_path_rates=rates[i],
                    ),
                ]
            )
            for i in range(cfg.num_stages)
        )
        self.mlp_head = nn.Sequential(
            Reduce("b d h w -> b d", "mean"),
            nn.LayerNorm(dims[-1]),
            nn.Linear(dims[-1], num_classes),
        )

    @classmethod
    def from_config(cls, config: SepViTConfig, *, drop_path_rate: float = 0.0) -> SepViT:
        return cls(**config.to_dict(), drop_path_rate=drop_path_rate)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4-D NCHW image batch, got shape {tuple(x.shape)} ({x.ndim}-D)"
            )
        if x.shape[1] != self.config.channels:
            raise ValueError(
                f"expected {self.config.channels} input channels (NCHW axis 1), "
                f"got shape {tuple(x.shape)}"
            )
        self.config.check_image_size(x.shape[2], x.shape[3])

    # ---- backbone API (timm's names and result shapes) ---------------------------------------

    @property
    def feature_info(self) -> list[dict]:
        """Per stage: channels, total stride and module name (`layers.{i}`)."""
        return feature_info(self.config)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output feature map (NCHW), e.g. for a detection/segmentation neck."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (NCHW), what `forward_head` takes."""
        return self.forward_intermediates(x, 1, intermediates_only=True)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean pool and LayerNorm of a `forward_features` map, then the classifier (logits).

        pre_logits: stop before the classifier: the (B, C) pooled, normalised features.
        """
        features = self.mlp_head[1](self.mlp_head[0](x))
        return features if pre_logits else self.mlp_head[2](features)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage output maps, as timm's `forward_intermediates`; see `sepvit_jax.SepViT`'s.

        indices: None all stages, an int n the last n, a sequence of (possibly negative) stage
        indices; maps in stage order. norm: the last stage's map through the head's LayerNorm
        (`mlp_head.1`) at every position (the others end in their own ChanLayerNorm already).
        output_fmt: "NCHW" (default) or "NHWC". stop_early: with intermediates_only, run no
        stage past the last requested one. Returns the maps, or `(final, maps)` with `final` =
        `forward_features(x)` (NCHW, always).
        """
        num_stages = self.config.num_stages
        take = select_stages(num_stages, indices)
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f'output_fmt must be "NHWC" or "NCHW", got {output_fmt!r}')
        self._check_input(x)
        end = take[-1] + 1 if stop_early and intermediates_only else num_stages
        maps = []
        for i in range(end):
            patch_embed, peg, transformer = self.layers[i]
            x = transformer(peg(patch_embed(x)))
            if i in take:
                y = x.permute(0, 2, 3, 1)  # NHWC: LayerNorm normalises the last axis
                if norm and i == num_stages - 1:
                    y = self.mlp_head[1](y)
                maps.append(y if output_fmt == "NHWC" else y.permute(0, 3, 1, 2))
        return maps if intermediates_only else (x, maps)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for `num_classes`; `config` follows."""
        config = self.config.replace(num_classes=num_classes)  # validates num_classes first
        old = self.mlp_head[2]
        self.mlp_head[2] = nn.Linear(
            old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype
        )
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
