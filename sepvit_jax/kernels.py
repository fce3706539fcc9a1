"""The numerical kernels of SepViT, each in two forms: plain JAX, and with a hand-written
backward pass (`jax.custom_vjp`) that keeps less memory.

Exact (erf) GELU, layer norm over the last axis, the stride-1 depthwise conv of the PEG, and the
attention softmax. Each computes its statistics in at least float32 (`stats_dtype`) and returns
the compute dtype. Arrays are NHWC where a layout matters.

By default the model uses the plain forms, so every JAX transformation works on it (`jax.jvp`,
`jax.jacfwd`, `jax.linearize`, `jax.hessian`: JAX cannot differentiate a `custom_vjp` in forward
mode). Inside `lean_backward()` (the training step traces the model there) the same forwards run
with the hand-written backward passes: identical values, less memory kept for the backward.

Why hand-written backward passes (speed and memory on XLA:CPU): XLA:CPU's default scheduler runs
each op as soon as its inputs exist, so whatever a backward pass derives from forward values alone
is computed during the forward and held until the backward (`jax.checkpoint` does not change that:
same temp memory, measured). Every byte of an executable's temp memory is a freshly faulted page
on every call (~0.4 ms per MB on the 2-core benchmark VM), so these kernels keep only their inputs
and derive the rest from the cotangent. Measured on sepvit_tiny, batch 8, one AdamW step (XLA:CPU,
2 threads), interleaved A/B runs:

    autodiff of plain ops           temp memory 1511 MB   step 1.26 s
    + gelu                                      1373 MB
    + layer norm                                1101 MB        1.22 -> 1.09 s
    + depthwise conv                             963 MB        1.30 -> 1.05 s
    + softmax                                    851 MB        1.23 -> 0.99 s

Smaller measurements, on the kernels alone:
- gelu as `0.5 * (1 + erf(x / sqrt 2))` rather than `jax.nn.gelu(approximate=False)`, whose
  `erfc` has two branches and an `exp`: 60 -> 47 ms CPU time forward, 175 -> 141 ms
  forward+backward for a 25088x96 -> 384 -> 96 MLP.
- the depthwise conv as nine shifted multiply-adds: XLA:CPU lowers a grouped conv with one
  channel per group through a slow generic loop (~50x slower at 56x56x96).
- its kernel gradient as one variadic reduction over x and dy for all k*k taps and the bias
  (k*k separate reductions: 5x longer, 21 -> 4.4 ms at 8x56x56x96).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax.numpy as jnp

_switch = threading.local()


@contextlib.contextmanager
def lean_backward():
    """Models traced inside use the kernels with hand-written backward passes (reverse mode
    only). Thread-local: programs traced in other threads are unaffected."""
    previous = getattr(_switch, "lean", False)
    _switch.lean = True
    try:
        yield
    finally:
        _switch.lean = previous


def _lean() -> bool:
    return getattr(_switch, "lean", False)


def stats_dtype(dtype) -> jnp.dtype:
    """Norm statistics and softmax run in at least float32 (bfloat16 stats are too coarse)."""
    return jnp.promote_types(dtype, jnp.float32)


def after(residuals, cotangent):
    """Tie the residuals to the cotangent: keeps XLA from merging the backward's recomputation
    with the forward's identical ops (CSE), which would keep the forward's copies alive."""
    return jax.lax.optimization_barrier((residuals, cotangent))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_cdf(x32: jax.Array) -> jax.Array:
    return 0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, `x * Phi(x)`, computed in at least float32 and returned in x's dtype.

    parity: torch's `nn.GELU()` is this erf form, not Flax's default tanh approximation.
    The lean backward keeps only `x`.
    """
    return _lean_gelu(x) if _lean() else _gelu(x)


def _gelu(x: jax.Array) -> jax.Array:
    x32 = x.astype(stats_dtype(x.dtype))
    return (x32 * _gelu_cdf(x32)).astype(x.dtype)


_lean_gelu = jax.custom_vjp(_gelu)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, dy):
    x, dy = after(x, dy)
    x32 = x.astype(stats_dtype(x.dtype))
    slope = _gelu_cdf(x32) + x32 * (_INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32))
    return ((dy.astype(slope.dtype) * slope).astype(x.dtype),)


_lean_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def layer_norm(x, scale, bias, eps: float, dtype) -> jax.Array:
    """Normalise over the last axis in float32 (or wider) and return `dtype`.

    The lean backward keeps `x` and the per-position mean and 1/std, not the four
    activation-sized intermediates autodiff would keep.
    """
    if _lean():
        return _lean_layer_norm(x, scale, bias, eps, dtype)
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lean_layer_norm(x, scale, bias, eps: float, dtype) -> jax.Array:
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


_lean_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """Stride-1 depthwise conv with symmetric `k // 2` zero padding; kernel (k, k, 1, C).

    The lean backward keeps `x` only; autodiff of the shifted sum keeps all k*k shifted copies.
    """
    if _lean():
        return _lean_depthwise_conv(x, kernel, bias, dtype)
    return _depthwise_conv(x, kernel, bias, dtype)


def _depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
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


_lean_depthwise_conv = functools.partial(jax.custom_vjp, nondiff_argnums=(3,))(_depthwise_conv)


def _depthwise_conv_fwd(x, kernel, bias, dtype):
    return _depthwise_conv(x, kernel, bias, dtype), (x, kernel, bias)


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
    # One variadic reduction computes all k*k taps and the bias gradient in a single pass over
    # x and dy, over rows of [W, C] first, then over the short W axis.
    products = tuple((x32 * taps[k - 1 - i, k - 1 - j]).astype(acc) for i, j in taps)
    zeros = tuple(jnp.zeros((), acc) for _ in range(len(products) + 1))
    partial = jnp.stack(jax.lax.reduce((*products, dy.astype(acc)), zeros, _add_all, (0, 1)))
    partial = partial.sum(axis=1)
    dkernel, dbias = partial[:-1].reshape(k, k, 1, -1), partial[-1]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_lean_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def softmax(logits: jax.Array, dtype) -> jax.Array:
    """Softmax over the last axis in at least float32, returned in `dtype`.

    The lean backward keeps only the probabilities (which attn @ v keeps anyway), not the
    exponentials and normalisers autodiff would keep.
    """
    return _lean_softmax(logits, dtype) if _lean() else _softmax(logits, dtype)


def _softmax(logits: jax.Array, dtype) -> jax.Array:
    return jax.nn.softmax(logits.astype(stats_dtype(logits.dtype)), axis=-1).astype(dtype)


_lean_softmax = functools.partial(jax.custom_vjp, nondiff_argnums=(1,))(_softmax)


def _softmax_fwd(logits, dtype):
    probs = _softmax(logits, dtype)
    return probs, (probs, jnp.zeros((0,), logits.dtype))


def _softmax_bwd(dtype, residuals, dprobs):
    (probs, like), dprobs = after(residuals, dprobs)
    compute = stats_dtype(probs.dtype)
    p, dp = probs.astype(compute), dprobs.astype(compute)
    return ((p * (dp - (p * dp).sum(axis=-1, keepdims=True))).astype(like.dtype),)


_lean_softmax.defvjp(_softmax_fwd, _softmax_bwd)
