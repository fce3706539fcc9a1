"""Mixup / CutMix inside the jitted train step (`sepvit_jax.data.mixup.mix_batch_jax`).

The batch `image (B, H, W, C)`, `label (B,)` becomes `image` mixed with its reverse and
`target (B, K)`, soft targets with label smoothing folded in. Each step's draws come from a key
folded from (seed, step counter of the train state), so a resumed run mixes exactly as an
uninterrupted one, whatever the process count.

Why in the step rather than on the host (measured, see the training README section): the mix
pairs example i with example B - 1 - i of the *global* batch, which no single process holds in
a multi-host run; inside the step it is one fused elementwise pass over a batch already in
device memory, where NumPy on the host makes two or three passes over host memory per step
(sepvit_tiny batch 128 at 224 px: 77 MB of float32 images) on the cores that also decode images.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sepvit_jax.data.mixup import mix_batch_jax

# Folded into the seed's key, so that the mixing draws are unrelated to the initialisation's.
_STREAM = 0x6D1C


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup/cutmix of the training batches.

    Args:
      mixup: Beta(mixup, mixup) of the mixup lambda (0: no mixup).
      cutmix: Beta(cutmix, cutmix) of the cutmix lambda (0: no cutmix).
      switch_prob: chance of cutmix rather than mixup for a batch when both are on.
      seed: the run's seed.
    """

    mixup: float = 0.0
    cutmix: float = 0.0
    switch_prob: float = 0.5
    seed: int = 0

    @property
    def on(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, batch: dict, step, num_classes: int, smoothing: float) -> dict:
        """{"image": mixed images, "target": (B, K) soft targets}: traced, inside the step."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _STREAM), step)
        images, targets = mix_batch_jax(
            batch["image"],
            batch["label"],
            key,
            num_classes,
            mixup_alpha=self.mixup,
            cutmix_alpha=self.cutmix,
            switch_prob=self.switch_prob,
            label_smoothing=smoothing,
        )
        return {"image": images, "target": targets.astype(jnp.float32)}
