"""SepViT's small building blocks in Flax NNX: norms, patch embedding, PEG, feed-forward.

Layout NHWC `(batch, height, width, channels)`. Each module mirrors one PyTorch module of
`sepvit_torch.model` (itself vit-pytorch's); the `# parity:` comments mark choices made only to
compute the same function as PyTorch. Parameters are initialised the way PyTorch initialises
them, so training from scratch behaves like the reference. The arithmetic with hand-written
gradients (GELU, layer norm, the depthwise conv) is in `sepvit_jax.kernels`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sepvit_jax.kernels import depthwise_conv, gelu, layer_norm

# parity: torch's default Conv/Linear init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)),
# which is variance scaling 1/3 with a uniform distribution.
torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch's default bias init: U(+-1/sqrt(fan_in)) of the layer's input fan-in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nnx.Linear:
    """A Dense layer on the last axis, initialised like torch's Linear / 1x1 Conv."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class ChanLayerNorm(nnx.Module):
    """LayerNorm over the channel (last) axis with parameters `g` and `b`.

    parity: biased variance, eps 1e-5 inside the square root, computed as the two-pass
    `mean((x - mean)**2)` like torch (not E[x^2] - E[x]^2), in at least float32.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.g = nnx.Param(jnp.ones((dim,), param_dtype))
        self.b = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.g[...], self.b[...], self.eps, self.dtype)


def torch_layer_norm(dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """nnx.LayerNorm configured like torch.nn.LayerNorm."""
    return nnx.LayerNorm(
        dim,
        epsilon=1e-5,  # parity: torch's default; Flax's is 1e-6
        use_fast_variance=False,  # parity: two-pass variance like torch
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def conv2d(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nnx.Conv:
    """An NHWC conv with torch's symmetric `kernel_size // 2` padding and torch's init."""
    pad = kernel_size // 2
    fan_in = in_features // groups * kernel_size * kernel_size
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        # parity: explicit symmetric padding; XLA's "SAME" pads asymmetrically when stride > 1.
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class OverlappingPatchEmbed(nnx.Module):
    """Strided conv, kernel 2*stride-1, padding kernel//2: (B,H,W,Cin) -> (B,H/s,W/s,Cout)."""

    def __init__(self, dim_in: int, dim_out: int, *, stride: int, rngs: nnx.Rngs, **dtypes):
        self.conv = conv2d(dim_in, dim_out, 2 * stride - 1, stride=stride, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class PEG(nnx.Module):
    """Positional encoding generator: x + depthwise 3x3 conv(x)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, **dtypes):
        self.proj = conv2d(dim, dim, 3, groups=dim, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        # speed: `self.proj(x)` as nine shifted multiply-adds. XLA:CPU lowers a grouped conv
        # with one channel per group through a slow generic loop (~50x slower at 56x56x96);
        # the shifted sum fuses into one elementwise loop on every backend.
        return depthwise_conv(x, self.proj.kernel[...], self.proj.bias[...], self.proj.dtype) + x


def dropout_layer(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # Only a layer that can drop anything holds an RNG stream, so rate-0 models carry no RNG state.
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def drop_path_layer(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    """Stochastic depth for a residual branch on a (B, H, W, C) map, or None when `rate` is 0.

    One keep/drop draw per sample (the mask is broadcast over H, W and C), kept samples scaled
    by 1/(1 - rate): nnx.Dropout with `broadcast_dims`, so `model.train()`/`model.eval()` switch
    it like dropout and it draws from the same "dropout" RNG stream. None at rate 0, so that a
    model without stochastic depth holds no extra RNG state.
    """
    return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs) if rate > 0 else None


class FeedForward(nnx.Module):
    """Pre-norm MLP of 1x1 convs (Dense on channels): norm -> fc1 -> GELU -> fc2, with dropout.

    torch names: `net.0` = norm, `net.1` = fc1, `net.4` = fc2.
    """

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        *,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = ChanLayerNorm(dim, **dtypes)
        self.fc1 = torch_linear(dim, inner_dim, rngs=rngs, **dtypes)
        self.fc2 = torch_linear(inner_dim, dim, rngs=rngs, **dtypes)
        self.dropout = dropout_layer(dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.fc1(self.norm(x))
        x = self.dropout(gelu(x))  # parity: exact (erf) GELU, as torch
        return self.dropout(self.fc2(x))
