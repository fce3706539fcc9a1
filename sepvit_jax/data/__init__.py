"""Input pipelines for SepViT training and evaluation, built on Grain's dataset API.

Every batch is a dict of NumPy arrays in NHWC layout:

    image: (b, H, W, C) float32, normalised
    label: (b,) int32
    mask:  (b,) bool          (evaluation batches only; False marks padding)

Three datasets:

* ``digits`` (default): scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
  download), upsampled to ``image_size`` once and held in memory. A fixed, stratified held-out
  split of 360 images is used for evaluation; the other 1,437 train.
* ``imagefolder``: an ImageNet-style tree ``DIR/{train,val}/CLASS/*.jpg`` decoded with Pillow,
  with random-resized-crop + flip for training and resize + center crop for evaluation. Its
  training split can add DeiT's recipe: RandAugment (``DataConfig.randaugment``), random erasing
  (``random_erasing``) and repeated augmentation (``repeated_aug``); all draws of an example come
  from one rng keyed on (seed, global position), so resumed runs see the same pixels. These
  settings are errors for the other two datasets.
* ``synthetic``: random images generated lazily per index, for benchmarking without input cost.

Sharding across JAX processes (multi-host). Each global training step consumes a global batch of
``G`` examples from a per-epoch shuffled order. The global batch is cut into ``process_count``
contiguous blocks of ``b = G // process_count`` and process ``p`` reads only block ``p``, so the
concatenation of the local batches in process-index order is exactly the batch a single process
would produce with ``process_count=1``. In Grain terms: shuffle -> slice to whole batches ->
``batch(b)`` (one "micro-batch" per block) -> ``[p::process_count]`` -> ``repeat()``. Everything
before the final map is index arithmetic, so a process only ever decodes its own examples.

This package's own modules never import JAX at module level (Grain itself does, through its
profiler, when it is imported).
"""

from sepvit_jax.data.config import DATASETS, DataConfig, DataError, DatasetInfo
from sepvit_jax.data.imagefolder import unreadable_images
from sepvit_jax.data.pipeline import dataset_info, eval_batches, steps_per_epoch, train_iterator

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "eval_batches",
    "steps_per_epoch",
    "train_iterator",
    "unreadable_images",
]
