"""The Grain pipelines: sharded, shuffled, checkpointable training batches and padded eval passes.

See the package docstring for how the global batch is split among processes.
"""

from __future__ import annotations

import grain
from absl import flags

from sepvit_jax.data import digits, imagefolder, synthetic
from sepvit_jax.data.config import (
    DataConfig,
    DataError,
    DatasetInfo,
    check_config,
    check_matches,
    local_batch,
    rand_augment,
    seeds,
)
from sepvit_jax.data.repeated import RepeatedAugmentation


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Returns the static description of the dataset `cfg` names.

    Args:
      cfg: the data configuration.

    Raises:
      DataError: for an invalid configuration or (imagefolder) a malformed tree.
    """
    check_config(cfg)
    if cfg.name == "digits":
        train_idx, eval_idx = digits.split_indices()
        info = DatasetInfo(
            num_classes=10,
            channels=1,
            image_size=cfg.image_size,
            num_train=len(train_idx),
            num_eval=len(eval_idx),
            class_names=[str(c) for c in range(10)],
        )
        return check_matches(cfg, info)
    if cfg.name == "synthetic":
        num_classes = cfg.num_classes or 10
        return DatasetInfo(
            num_classes=num_classes,
            channels=cfg.channels or 3,
            image_size=cfg.image_size,
            num_train=synthetic.NUM_TRAIN,
            num_eval=synthetic.NUM_EVAL,
            class_names=[f"class_{c}" for c in range(num_classes)],
        )
    tree = imagefolder.scan(str(cfg.data_dir))
    info = DatasetInfo(
        num_classes=len(tree.classes),
        channels=3,
        image_size=cfg.image_size,
        num_train=len(tree.train.files),
        num_eval=len(tree.val.files),
        class_names=list(tree.classes),
    )
    return check_matches(cfg, info)


def steps_per_epoch(cfg: DataConfig, global_batch_size: int) -> int:
    """Training steps in one epoch: ``num_train // global_batch_size`` (the remainder is dropped).

    Args:
      cfg: the data configuration.
      global_batch_size: examples per step summed over all processes.

    Raises:
      DataError: if the batch is not positive or larger than the training set.
    """
    local_batch(global_batch_size, 0, 1, "global_batch_size")
    num_train = dataset_info(cfg).num_train
    if global_batch_size > num_train:
        raise DataError(
            f"global_batch_size={global_batch_size} is larger than the {num_train} training "
            f"examples of {cfg.name}"
        )
    return num_train // global_batch_size


def _element_gather(cfg: DataConfig, split: str, num_examples: int, with_mask: bool):
    """Batch-level map for the in-memory datasets (None for imagefolder)."""
    if cfg.name == "digits":
        return digits.Gather(cfg.image_size, split, num_examples, with_mask)
    if cfg.name == "synthetic":
        info = dataset_info(cfg)
        return synthetic.Gather(
            cfg.seed,
            split,
            cfg.image_size,
            info.channels,
            info.num_classes,
            num_examples,
            with_mask,
        )
    return None


def _ensure_absl_flags_parsed() -> None:
    # Grain's multiprocess prefetch reads absl flags (its --grain_* options) and fails with
    # UnparsedFlagAccessError unless the program parsed them, i.e. unless it runs under
    # absl.app. Marking them parsed keeps every flag at its default; an absl.app program has
    # already parsed them and is unaffected.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(cfg: DataConfig, ds: grain.MapDataset) -> grain.IterDataset:
    """MapDataset of batches -> IterDataset, read in-process or by worker processes."""
    if cfg.name == "imagefolder":
        # Decoding is real work: overlap it with training. Within a worker one thread suffices
        # (parallelism comes from the workers); in-process, `prefetch` threads each build a batch.
        threads = 1 if cfg.num_workers else cfg.prefetch
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=cfg.prefetch)
    else:
        # In-memory gathers take microseconds: a thread pool would cost more than it saves.
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    it_ds = ds.to_iter_dataset(read)
    if cfg.num_workers > 0:
        # Batching happens before to_iter_dataset, so each worker builds whole batches (worker w
        # takes batches w, w+W, ...) and their round-robin interleave restores the exact order:
        # the batches are the same for every num_workers.
        _ensure_absl_flags_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch
        )
        it_ds = it_ds.mp_prefetch(options)
    return it_ds


def _epoch_indices(
    cfg: DataConfig, num_train: int, steps: int, global_batch_size: int, shuffle_seed: int
) -> grain.MapDataset:
    """The example index of every position of an epoch, ``steps * global_batch_size`` long."""
    # Shuffled; Grain reshuffles every epoch (index // length) itself.
    ds = grain.MapDataset.range(num_train).shuffle(seed=shuffle_seed)
    if cfg.repeated_aug > 1:
        return RepeatedAugmentation(
            ds, steps=steps, global_batch=global_batch_size, repeats=cfg.repeated_aug
        )
    return ds[: steps * global_batch_size]  # drop the remainder of every epoch


def train_iterator(
    cfg: DataConfig, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Infinite iterator over this process's share of the training batches.

    Each epoch is a fresh deterministic shuffle (from ``cfg.seed``) cut into
    ``steps_per_epoch`` global batches (the remainder is dropped, so batches never straddle
    epochs). Process ``p`` yields rows ``[p*b, (p+1)*b)`` of every global batch, where
    ``b = global_batch_size // process_count``; concatenating all processes' batches of a step
    in process order gives exactly the single-process global batch. Random augmentation is
    seeded per example and epoch, so it too is independent of ``process_count`` and
    ``num_workers``. Augmentation (``randaugment``, ``random_erasing``) draws from the same
    per-example rng after the crop and flip; with ``repeated_aug=K`` each epoch shows
    ``ceil(steps * global_batch_size / K)`` images ``K`` times each, the copies spread over the
    global batch (see `sepvit_jax.data.repeated`) and augmented differently.

    Args:
      cfg: the data configuration.
      global_batch_size: examples per step summed over all processes.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      A Grain ``DatasetIterator`` of ``dict(image=(b, H, W, C) float32, label=(b,) int32)``.
      Its ``get_state()`` (a small JSON-able dict) and ``set_state()`` restore the exact
      position, so it can be checkpointed, e.g. with ``grain.checkpoint.CheckpointHandler``.
      The state's layout depends on ``num_workers``: restore with the same value. With
      ``num_workers > 0`` the arrays are Grain ``SharedMemoryArray`` (ndarray subclasses) and
      the iterator should be ``close()``d after use to stop its worker processes.

    Raises:
      DataError: if the batch does not divide among the processes or exceeds the dataset.
    """
    b = local_batch(global_batch_size, process_index, process_count, "global_batch_size")
    steps = steps_per_epoch(cfg, global_batch_size)
    info = dataset_info(cfg)
    shuffle_seed, augment_seed = seeds(cfg.seed)
    ds = _epoch_indices(cfg, info.num_train, steps, global_batch_size, shuffle_seed)
    gather = _element_gather(cfg, "train", info.num_train, with_mask=False)
    if gather is None:
        readers = max(1, cfg.num_workers) * process_count
        loader = imagefolder.Loader(
            str(cfg.data_dir), "train", cfg.image_size, cfg.max_bad_fraction, readers
        )
        example = imagefolder.TrainExample(loader, rand_augment(cfg), cfg.random_erasing)
        # Applied before sharding: the rng is keyed on the global (epoch, position) index.
        ds = ds.random_map(example, seed=augment_seed)
    ds = ds.batch(b, drop_remainder=True)  # `process_count` consecutive blocks form one step
    ds = ds[process_index::process_count]
    ds = ds.repeat()
    if gather is not None:
        ds = ds.map(gather)
    return iter(_finish(cfg, ds))


def eval_batches(
    cfg: DataConfig, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """One deterministic pass over the held-out set, padded to full batches.

    ``batch_size`` is global, like the training batch: there are
    ``ceil(num_eval / batch_size)`` steps on every process, and process ``p`` yields rows
    ``[p*b, (p+1)*b)`` of each global batch (``b = batch_size // process_count``). Over all
    processes every example appears exactly once with ``mask=True``; the padding of the last
    batch (and, for imagefolder, undecodable files) has ``mask=False`` and zero images.

    Args:
      cfg: the data configuration.
      batch_size: examples per step summed over all processes.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      A re-iterable Grain ``IterDataset`` of
      ``dict(image=(b, H, W, C) float32, label=(b,) int32, mask=(b,) bool)``.

    Raises:
      DataError: if the batch does not divide among the processes.
    """
    b = local_batch(batch_size, process_index, process_count, "batch_size")
    info = dataset_info(cfg)
    num_steps = -(-info.num_eval // batch_size)
    # Positions >= num_eval are padding; the loaders turn them into mask=False rows.
    ds = grain.MapDataset.range(num_steps * batch_size)
    gather = _element_gather(cfg, "eval", info.num_eval, with_mask=True)
    if gather is None:
        readers = max(1, cfg.num_workers) * process_count
        loader = imagefolder.Loader(
            str(cfg.data_dir), "val", cfg.image_size, cfg.max_bad_fraction, readers
        )
        ds = ds.map(imagefolder.EvalExample(loader))
    ds = ds.batch(b)[process_index::process_count]
    if gather is not None:
        ds = ds.map(gather)
    return _finish(cfg, ds)
