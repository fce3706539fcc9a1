"""The optimiser and the loss of SepViT training: AdamW, warm-up + cosine, clipping, smoothing,
the parameters' exponential moving average."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, clipped by global norm.

    Args:
      lr: peak learning rate (reached after `warmup_steps`).
      warmup_steps: linear warm-up from `warmup_init_lr`.
      total_steps: length of the schedule (cosine decay to `min_lr`, or `lr * min_lr_ratio`).
      weight_decay: decoupled decay, only on weight matrices/kernels (not on norms, biases or
        window tokens).
      clip_norm: global gradient-norm clip (0: none).
      label_smoothing: mass spread uniformly over the classes in the training loss.
      b1, b2: Adam moment decays.
      min_lr_ratio: final learning rate as a fraction of `lr` (when `min_lr` is None).
      grad_accum: micro-batches per step (gradients averaged before one update).
      warmup_init_lr: the learning rate of step 0 (DeiT's recipes warm up from 1e-6).
      min_lr: the final learning rate; None: `lr * min_lr_ratio`.
      ema_decay: the parameters' exponential moving average keeps `ema_decay` of itself each
        step (0: no average kept).
    """

    lr: float = 2e-3
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    warmup_init_lr: float = 0.0
    min_lr: float | None = None
    ema_decay: float = 0.0


def decay_mask(params) -> Any:
    """True for the arrays weight decay applies to: the kernels of convs and dense layers.

    Not norms (`g`, `b`, `scale`, `bias`), biases, nor the window tokens, which are embeddings.
    Decided by the parameter's own name, the last entry of its path.
    """

    def rule(path, _) -> bool:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]  # nnx.Variable's own pytree entry
        return names[-1] == "kernel"

    return jax.tree.map_with_path(rule, params)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.warmup_init_lr,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio if cfg.min_lr is None else cfg.min_lr,
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (float32) against optionally smoothed one-hot labels."""
    targets = jax.nn.one_hot(labels, num_classes)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return soft_cross_entropy(logits, targets)


def soft_cross_entropy(logits, targets) -> jax.Array:
    """Per-example softmax cross-entropy (float32) against (B, K) target distributions."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def ema_update(average, params, decay: float):
    """One step of the exponential moving average: `decay * average + (1 - decay) * params`.

    Written as `average + (1 - decay) * (params - average)`, timm's ModelEmaV2 update in one
    fused pass; the average starts as the initial parameters (no bias correction, as timm).
    """
    return jax.tree.map(lambda a, p: a + (1.0 - decay) * (p - a), average, params)
