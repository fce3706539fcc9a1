"""SepViT's small building blocks in Flax NNX: norms, patch embedding, PEG, feed-forward.

Layout NHWC `(batch, height, width, channels)`. Each module mirrors one PyTorch module of
`sepvit_torch.model` (itself vit-pytorch's); the `# parity:` comments mark choices made only to
compute the same function as PyTorch. Parameters are initialised the way PyTorch initialises
them, so training from scratch behaves like the reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

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


# ---- kernels with hand-written gradients ---------------------------------------------------
# speed: XLA:CPU's default scheduler runs each op as soon as its inputs exist, so whatever a
# backward pass derives from forward values alone is computed during the forward and held until
# the backward (jax.checkpoint does not change that: same temp memory, measured). Every byte of
# an executable's temp memory is a freshly faulted page on every call (~0.4 ms per MB on the
# 2-core benchmark VM), so these kernels keep only their inputs and derive the rest from the
# cotangent. sepvit_tiny, batch 8, one AdamW step (XLA:CPU, 2 threads), interleaved A/B runs:
# temp memory 1511 -> 851 MB, step 1.26 -> 1.00 s (gelu: 1373 MB; + layer norm: 1101 MB,
# 1.22 -> 1.09 s; + depthwise conv: 963 MB, 1.30 -> 1.05 s; + softmax: 851 MB, 1.23 -> 0.99 s).


def after(residuals, cotangent):
    """Tie the residuals to the cotangent: keeps XLA from merging the backward's recomputation
    with the forward's identical ops (CSE), which would keep the forward's copies alive."""
    return jax.lax.optimization_barrier((residuals, cotangent))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_cdf(x32: jax.Array) -> jax.Array:
    return 0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, `x * Phi(x)`, computed in at least float32 and returned in x's dtype.

    parity: torch's `nn.GELU()` is this erf form, not Flax's default tanh approximation.
    speed: `0.5 * (1 + erf(x / sqrt 2))` rather than `jax.nn.gelu(approximate=False)`, whose
    `erfc` has two branches and an `exp` (XLA:CPU: 60 -> 47 ms CPU time forward, 175 -> 141 ms
    forward+backward for a 25088x96 -> 384 -> 96 MLP); the backward keeps only `x`.
    """
    x32 = x.astype(stats_dtype(x.dtype))
    return (x32 * _gelu_cdf(x32)).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    x, dy = after(x, dy)
    x32 = x.astype(stats_dtype(x.dtype))
    slope = _gelu_cdf(x32) + x32 * (_INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32))
    return ((dy.astype(slope.dtype) * slope).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def stats_dtype(dtype) -> jnp.dtype:
    """Norm statistics and softmax run in at least float32 (bfloat16 stats are too coarse)."""
    return jnp.promote_types(dtype, jnp.float32)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, dtype) -> jax.Array:
    """Normalise over the last axis in float32 (or wider) and return `dtype`.

    speed: the backward keeps `x` and the per-position mean and 1/std, not the four
    activation-sized intermediates autodiff would keep.
    """
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    compute = stats_dtype(x.dtype)
    x32 = x.astype(compute)
    mean = x32.mean(axis=-1, keepdims=True)
    centered = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
    y = centered * rstd * scale.astype(compute) + bias.astype(compute)
    return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, dtype, residuals, dy):
    (x, mean, rstd, scale, bias), dy = after(residuals, dy)
    compute = mean.dtype
    xhat = (x.astype(compute) - mean) * rstd
    dy = dy.astype(compute)
    dxhat = dy * scale.astype(compute)
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    axes = tuple(range(x.ndim - 1))
    dscale = (dy * xhat).sum(axis=axes)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dy.sum(axis=axes).astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """Stride-1 depthwise conv with symmetric `k // 2` zero padding; kernel (k, k, 1, C).

    speed: the backward keeps `x` only; autodiff of the shifted sum kept all k*k shifted copies.
    """
    x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
    out = bias
    for (i, j), shifted in _shifted_windows(x, kernel.shape[0]):
        out = out + shifted * kernel[i, j, 0]
    return out


def _shifted_windows(x: jax.Array, k: int):
    """((i, j), x shifted by (i - k//2, j - k//2) with zero fill) for every kernel tap."""
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    for i in range(k):
        for j in range(k):
            yield (i, j), padded[:, i : i + height, j : j + width, :]


def _add_all(a: tuple, b: tuple) -> tuple:
    return tuple(p + q for p, q in zip(a, b, strict=True))


def _depthwise_conv_fwd(x, kernel, bias, dtype):
    return depthwise_conv(x, kernel, bias, dtype), (x, kernel, bias)


def _depthwise_conv_bwd(dtype, residuals, dy):
    (x, kernel, bias), dy = after(residuals, dy)
    k = kernel.shape[0]
    acc = stats_dtype(dtype)
    dy, x32 = dy.astype(dtype), x.astype(dtype)
    # Both gradients read only shifted copies of dy (never of x, whose shifted copies the forward
    # also makes: XLA would merge the two and keep them alive from forward to backward):
    # dx is dy convolved with the kernel flipped in space, and tap (i, j) of the kernel gradient
    # is sum(x * dy shifted by (k//2 - i, k//2 - j)).
    taps = dict(_shifted_windows(dy, k))
    weights = kernel.astype(dtype)
    dx = sum(taps[i, j] * weights[k - 1 - i, k - 1 - j, 0] for i, j in taps)
    # speed: one variadic reduction computes all k*k taps and the bias gradient in a single pass
    # over x and dy (k*k separate reductions: 5x longer, 21 -> 4.4 ms at 8x56x56x96), over rows
    # of [W, C] first, then over the short W axis.
    products = tuple((x32 * taps[k - 1 - i, k - 1 - j]).astype(acc) for i, j in taps)
    zeros = tuple(jnp.zeros((), acc) for _ in range(len(products) + 1))
    partial = jnp.stack(jax.lax.reduce((*products, dy.astype(acc)), zeros, _add_all, (0, 1)))
    partial = partial.sum(axis=1)
    dkernel, dbias = partial[:-1].reshape(k, k, 1, -1), partial[-1]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def dropout_layer(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # Only a layer that can drop anything holds an RNG stream, so rate-0 models carry no RNG state.
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


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
