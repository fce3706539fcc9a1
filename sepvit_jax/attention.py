"""DSSA, SepViT's depthwise-separable self-attention, in Flax NNX (NHWC).

Axis legend (also the einops names): b batch, x/y window grid and w1/w2 position inside a
window (H = x*w1, W = y*w2, w1 = w2 = ws), n = x*y windows, h heads, d = dim_head, t = w1*w2
tokens of a window (+1 with the window token), i/j query/key.

1. Depthwise: inside each window, attention over its t tokens plus one learned window token
   (the same vector for every window, prepended as token 0).
2. Pointwise: the window tokens' outputs, normalised, GELU'd and head-mixed by a 1x1 conv, give
   each head n window queries and keys; the n x n softmax mixes whole window feature maps.
With one window the second step is skipped, as upstream does (its weights then get no gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from sepvit_jax.kernels import gelu, softmax
from sepvit_jax.layers import ChanLayerNorm, dropout_layer, torch_layer_norm, torch_linear


class WindowTokensToQK(nnx.Module):
    """Window-token outputs (B, n, h, d) -> window queries and keys, each (B, n, h, d).

    torch names: `window_tokens_to_qk.0` = norm (LayerNorm over d, shared by all heads),
    `window_tokens_to_qk.3` = proj (1x1 Conv1d over the h*d channels, head-major).
    """

    def __init__(self, heads: int, dim_head: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.heads, self.dim_head = heads, dim_head
        self.norm = torch_layer_norm(dim_head, rngs=rngs, **dtypes)
        self.proj = torch_linear(heads * dim_head, 2 * heads * dim_head, rngs=rngs, **dtypes)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, n = tokens.shape[:2]
        x = gelu(self.norm(tokens))  # parity: exact (erf) GELU, as torch
        x = self.proj(x.reshape(batch, n, self.heads * self.dim_head))
        # parity: output channels regroup as (h, 2*d): per head, d queries then d keys.
        x = x.reshape(batch, n, self.heads, 2, self.dim_head)
        return x[..., 0, :], x[..., 1, :]


class DSSA(nnx.Module):
    """Depthwise-separable self-attention on a (B, H, W, dim) map; H, W multiples of window_size.

    Args:
      dim: channels of the feature map.
      heads: attention heads.
      dim_head: width of each head.
      window_size: side of the square windows.
      dropout: dropout rate of both attention maps and of the output.
      rngs: parameter initialisation (and dropout) keys.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        window_size: int,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.heads, self.dim_head, self.window_size = heads, dim_head, window_size
        self.dtype = dtype
        inner = heads * dim_head
        self.norm = ChanLayerNorm(dim, **dtypes)
        self.to_qkv = torch_linear(dim, 3 * inner, use_bias=False, rngs=rngs, **dtypes)
        self.window_tokens = nnx.Param(jax.random.normal(rngs.params(), (dim,), param_dtype))
        self.window_tokens_to_qk = WindowTokensToQK(heads, dim_head, rngs=rngs, **dtypes)
        self.to_out = torch_linear(inner, dim, rngs=rngs, **dtypes)
        self.attn_dropout = dropout_layer(dropout, rngs)
        self.window_attn_dropout = dropout_layer(dropout, rngs)
        self.out_dropout = dropout_layer(dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        ws, h, d = self.window_size, self.heads, self.dim_head
        windows = dict(w1=ws, w2=ws, h=h, d=d)
        n = (height // ws) * (width // ws)
        scale = d**-0.5

        # Project every position once, then cut into windows; channel = head * d + feature.
        qkv = rearrange(
            self.to_qkv(self.norm(x)),
            "b (x w1) (y w2) (qkv h d) -> qkv b (x y) h (w1 w2) d",
            qkv=3,
            **windows,
        )
        # The window token is the same for every window: project it once and broadcast.
        token_qkv = self.to_qkv(self.window_tokens[...].astype(qkv.dtype))
        token_qkv = rearrange(token_qkv, "(qkv h d) -> qkv 1 1 h 1 d", qkv=3, h=h)
        token_qkv = jnp.broadcast_to(token_qkv, (3, batch, n, h, 1, d))
        q, k, v = jnp.concatenate([token_qkv, qkv], axis=-2)

        logits = jnp.einsum("bnhid,bnhjd->bnhij", q * scale, k)
        attn = self.attn_dropout(softmax(logits, v.dtype))
        out = jnp.einsum("bnhij,bnhjd->bnhid", attn, v)
        window_out, fmaps = out[..., 0, :], out[..., 1:, :]  # (b, n, h, d), (b, n, h, t, d)

        if n > 1:
            w_q, w_k = self.window_tokens_to_qk(window_out)
            w_logits = jnp.einsum("bihd,bjhd->bhij", w_q * scale, w_k)
            w_attn = self.window_attn_dropout(softmax(w_logits, fmaps.dtype))
            fmaps = jnp.einsum("bhij,bjhtd->bihtd", w_attn, fmaps)

        # Fold the windows back into the map.
        fmap = rearrange(
            fmaps, "b (x y) h (w1 w2) d -> b (x w1) (y w2) (h d)", x=height // ws, **windows
        )
        return self.out_dropout(self.to_out(fmap))
