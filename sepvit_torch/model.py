"""SepViT in PyTorch: the reference model, state_dict-compatible with vit-pytorch's `SepViT`.

Layout NCHW. Module names and parameter shapes follow vit-pytorch exactly, so an upstream
checkpoint loads with `strict=True`; every tensor name and shape is a row of the weight table,
`sepvit_jax.core.table`. Unlike upstream, `window_size` (int or per-stage tuple) and `dim_head` are
honoured: vit-pytorch never passes them on to its blocks, so every upstream model is really
window size 7, dim_head 32, whatever it was constructed with.

Axis legend used in the einops patterns: b batch, c/d channels, x/y window grid, w1/w2 position
inside a window, h heads, n windows, i/j query/key positions.
"""

from __future__ import annotations

import torch
from einops import rearrange
from einops.layers.torch import Rearrange, Reduce
from torch import nn

from sepvit_jax.core.config import SepViTConfig


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
    """`depth` blocks of (DSSA, FeedForward) with residuals, then an optional ChanLayerNorm."""

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
    ):
        super().__init__()
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
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class SepViT(nn.Module):
    """SepViT classifier on NCHW images; the keyword arguments are those of `SepViTConfig`.

    Args:
      num_classes, dim, depth, heads, window_size, dim_head, ff_mult, channels, dropout: see
        `sepvit_jax.core.config.SepViTConfig`.
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
        cfg = self.config
        dims = (channels, *cfg.stage_dims)
        last = cfg.num_stages - 1
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
    def from_config(cls, config: SepViTConfig) -> SepViT:
        return cls(**config.to_dict())

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

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output feature map (NCHW), e.g. for a detection/segmentation neck."""
        self._check_input(x)
        features = []
        for patch_embed, peg, transformer in self.layers:
            x = transformer(peg(patch_embed(x)))
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.forward_features(x)[-1])
