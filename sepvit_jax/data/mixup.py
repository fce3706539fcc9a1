"""Mixup / CutMix on a batch, with label smoothing folded in (timm's ``Mixup``, "batch" mode).

Images are ``(B, H, W, C)`` (NHWC, normalised float32); labels ``(B,)`` int; the soft targets are
``(B, num_classes)`` float32. One lambda is drawn per batch and every example is mixed with its
mirror in the batch (example ``i`` with ``B - 1 - i``), so an odd batch mixes its middle example
with itself. Per batch, either mixup (pixel blend) or cutmix (pasted box) is used:

    mixup:  x' = lam * x + (1 - lam) * x[::-1]
    cutmix: x' = x with a box taken from x[::-1]; lam := 1 - box area / image area
    target  = lam * smooth(y) + (1 - lam) * smooth(y[::-1])

where ``smooth`` puts ``1 - s + s / K`` on the label and ``s / K`` elsewhere (``s`` the label
smoothing, ``K`` the class count). ``mix_batch`` runs on the host with NumPy; ``mix_batch_jax``
does the same with ``jax.random`` inside a jitted step. JAX is imported only by the latter, so the
Grain workers that import this package stay light.
"""

from __future__ import annotations

import math

import numpy as np


def _check_alphas(mixup_alpha: float, cutmix_alpha: float) -> None:
    if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
        raise ValueError(
            f"need mixup_alpha > 0 or cutmix_alpha > 0 (both >= 0), "
            f"got {mixup_alpha=} {cutmix_alpha=}"
        )


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """(B, num_classes) float32 one-hot rows with label smoothing.

    Args:
        labels: (B,) integer class ids.
        num_classes: K.
        smoothing: s; the label gets ``1 - s + s / K``, every other class ``s / K``.
    """
    off = smoothing / num_classes
    out = np.full((len(labels), num_classes), off, np.float32)
    out[np.arange(len(labels)), np.asarray(labels)] = 1.0 - smoothing + off
    return out


def cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """A cutmix box for ``lam`` and lambda corrected to the box's true (clipped) area.

    The box has sides ``int(side * sqrt(1 - lam))``, a centre uniform over the image, and is
    clipped to the image, so its area can be less than ``1 - lam``: the returned lambda is
    ``1 - area / (height * width)``.

    Args:
        height: image height H.
        width: image width W.
        lam: the drawn lambda, in [0, 1].
        rng: the generator the centre is drawn from.

    Returns:
        ((top, bottom, left, right), corrected lambda); rows top:bottom, columns left:right.
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    # Half-sides are floored on both sides of the centre, as timm does (odd cuts lose a pixel).
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return (top, bottom, left, right), lam


def _sample_params(rng, mixup_alpha, cutmix_alpha, switch_prob, prob) -> tuple[float, bool]:
    """(lam, use_cutmix) for one batch; lam 1.0 means the batch is left as it is."""
    if rng.random() >= prob:
        return 1.0, False
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < switch_prob)
    else:
        use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    return float(rng.beta(alpha, alpha)), use_cutmix


def mix_batch(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    prob: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or cutmix of a whole batch with its reverse, on the host.

    Args:
        images: (B, H, W, C) normalised images; not modified.
        labels: (B,) integer class ids.
        num_classes: K, the width of the soft targets.
        rng: the generator of this batch.
        mixup_alpha: Beta(alpha, alpha) of the mixup lambda; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) of the cutmix lambda; 0 disables cutmix.
        switch_prob: chance of cutmix rather than mixup when both are enabled.
        label_smoothing: s of the soft targets.
        prob: chance that the batch is mixed at all (otherwise only smoothed).

    Returns:
        (mixed images, (B, K) float32 soft targets); each target row sums to 1. The images are
        ``images`` itself when the batch is not mixed (``prob`` < 1), else a new array.
    """
    _check_alphas(mixup_alpha, cutmix_alpha)
    lam, use_cutmix = _sample_params(rng, mixup_alpha, cutmix_alpha, switch_prob, prob)
    flipped = images[::-1]
    if lam == 1.0:
        mixed = images
    elif use_cutmix:
        (top, bottom, left, right), lam = cutmix_box(images.shape[1], images.shape[2], lam, rng)
        mixed = images.copy()
        mixed[:, top:bottom, left:right] = flipped[:, top:bottom, left:right]
    else:
        lam_x = images.dtype.type(lam)
        mixed = lam_x * images + (images.dtype.type(1) - lam_x) * flipped
    y = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = np.float32(lam) * y + np.float32(1.0 - lam) * y[::-1]
    return mixed, targets


def _jax_cutmix(images, lam, key):
    """(images with the box pasted from the reversed batch, corrected lam), traced."""
    import jax
    import jax.numpy as jnp

    _, height, width, _ = images.shape
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(key)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    top, bottom = jnp.maximum(cy - cut_h // 2, 0), jnp.minimum(cy + cut_h // 2, height)
    left, right = jnp.maximum(cx - cut_w // 2, 0), jnp.minimum(cx + cut_w // 2, width)
    # A mask instead of a dynamic slice: the box size is data-dependent and shapes must be static.
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_box = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None]
    mixed = jnp.where(in_box[None, :, :, None], images[::-1], images)
    area = (bottom - top) * (right - left)
    return mixed, 1.0 - area.astype(jnp.float32) / (height * width)


def _jax_mixup(images, lam, key):
    del key  # same signature as _jax_cutmix, for lax.cond
    lam_x = lam.astype(images.dtype)
    return lam_x * images + (1 - lam_x) * images[::-1], lam


def mix_batch_jax(
    images,
    labels,
    key,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    prob: float = 1.0,
):
    """``mix_batch`` in JAX, for use inside a jitted step (same semantics, other random draws).

    Jit it with ``num_classes`` and the two alphas static (a zero alpha removes that method at
    trace time); ``switch_prob``, ``label_smoothing`` and ``prob`` may be static or traced. With
    both methods on, the per-step choice is a ``lax.cond``, so only one of them executes.

    Args:
        images: (B, H, W, C) normalised images.
        labels: (B,) integer class ids.
        key: a ``jax.random`` key for this batch.
        num_classes: K, the width of the soft targets.
        mixup_alpha: Beta(alpha, alpha) of the mixup lambda; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) of the cutmix lambda; 0 disables cutmix.
        switch_prob: chance of cutmix rather than mixup when both are enabled.
        label_smoothing: s of the soft targets.
        prob: chance that the batch is mixed at all.

    Returns:
        (mixed images, (B, K) float32 soft targets).
    """
    import jax
    import jax.numpy as jnp

    _check_alphas(mixup_alpha, cutmix_alpha)
    key_apply, key_switch, key_lam, key_box = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
    lam = jax.random.beta(key_lam, alpha, alpha)
    # A batch left unmixed gets lam = 1, which both methods turn into the identity: mixup gives
    # 1 * x + 0 * x_flipped == x (finite x), cutmix pastes an empty box.
    apply = jax.random.uniform(key_apply) < prob
    lam = jnp.where(apply, lam, 1.0)
    if cutmix_alpha == 0:  # one method disabled: the choice is static
        mixed, lam = _jax_mixup(images, lam, key_box)
    elif mixup_alpha == 0:
        mixed, lam = _jax_cutmix(images, lam, key_box)
    else:
        mixed, lam = jax.lax.cond(use_cutmix, _jax_cutmix, _jax_mixup, images, lam, key_box)
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    off = label_smoothing / num_classes
    y = y * (1.0 - label_smoothing) + off
    targets = lam * y + (1.0 - lam) * y[::-1]
    return mixed, targets
