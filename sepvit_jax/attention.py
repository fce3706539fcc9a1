"""DSSA, SepViT's depthwise-separable self-attention, in Flax NNX (NHWC).

Axis legend: B batch, H/W feature map, X/Y window grid (H = X*ws, W = Y*ws), n = X*Y windows,
h heads, d = dim_head, t = ws*ws tokens of a window (+1 with the window token), i/j query/key.

1. Depthwise: inside each window, attention over its t tokens plus one learned window token
   (the same vector for every window, prepended as token 0).
2. Pointwise: the window tokens' outputs, normalised, GELU'd and head-mixed by a 1x1 conv, give
   each head n window queries and keys; the n x n softmax mixes whole window feature maps.
With one window the second step is skipped, as upstream does (its weights then get no gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sepvit_jax.layers import (
    ChanLayerNorm,
    after,
    dropout_layer,
    gelu,
    stats_dtype,
    torch_layer_norm,
    torch_linear,
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(logits: jax.Array, dtype) -> jax.Array:
    """Softmax over the last axis in at least float32, returned in `dtype`.

    speed: the backward keeps only the probabilities (which attn @ v keeps anyway), not the
    exponentials and normalisers autodiff would keep (see `sepvit_jax.layers`, custom VJPs).
    """
    return jax.nn.softmax(logits.astype(stats_dtype(logits.dtype)), axis=-1).astype(dtype)


def _softmax_fwd(logits, dtype):
    probs = softmax(logits, dtype)
    return probs, (probs, jnp.zeros((0,), logits.dtype))


def _softmax_bwd(dtype, residuals, dprobs):
    (probs, like), dprobs = after(residuals, dprobs)
    compute = stats_dtype(probs.dtype)
    p, dp = probs.astype(compute), dprobs.astype(compute)
    return ((p * (dp - (p * dp).sum(axis=-1, keepdims=True))).astype(like.dtype),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


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
        nx, ny = height // ws, width // ws
        n, t = nx * ny, ws * ws
        scale = d**-0.5

        # Project every position once, then cut into windows: (3, B, n, h, t, d).
        qkv = self.to_qkv(self.norm(x)).reshape(batch, nx, ws, ny, ws, 3, h, d)
        qkv = qkv.transpose(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, batch, n, h, t, d)
        # The window token is the same for every window: project it once and broadcast.
        token_qkv = self.to_qkv(self.window_tokens[...].astype(qkv.dtype)).reshape(3, 1, 1, h, 1, d)
        token_qkv = jnp.broadcast_to(token_qkv, (3, batch, n, h, 1, d))
        q, k, v = jnp.concatenate([token_qkv, qkv], axis=-2)

        logits = jnp.einsum("bnhid,bnhjd->bnhij", q * scale, k)
        attn = self.attn_dropout(softmax(logits, v.dtype))
        out = jnp.einsum("bnhij,bnhjd->bnhid", attn, v)
        window_out, fmaps = out[..., 0, :], out[..., 1:, :]  # (B,n,h,d), (B,n,h,t,d)

        if n > 1:
            w_q, w_k = self.window_tokens_to_qk(window_out)
            w_logits = jnp.einsum("bihd,bjhd->bhij", w_q * scale, w_k)
            w_attn = self.window_attn_dropout(softmax(w_logits, fmaps.dtype))
            fmaps = jnp.einsum("bhij,bjhtd->bihtd", w_attn, fmaps)

        # Fold the windows back into the map; channel = head * d + feature.
        fmap = fmaps.reshape(batch, nx, ny, h, ws, ws, d).transpose(0, 1, 4, 2, 5, 3, 6)
        return self.out_dropout(self.to_out(fmap.reshape(batch, height, width, h * d)))
