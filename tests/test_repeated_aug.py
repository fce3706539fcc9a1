"""Repeated augmentation (DataConfig.repeated_aug): DeiT's RASampler as Grain index arithmetic."""

from __future__ import annotations

import collections

import grain
import numpy as np
import pytest
from PIL import Image

from sepvit_jax import data
from sepvit_jax.data import DataConfig
from sepvit_jax.data.repeated import RepeatedAugmentation, slot_of_row


def take(it, n):
    return [next(it) for _ in range(n)]


def concat(batches):
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


@pytest.mark.parametrize(("global_batch", "repeats"), [(8, 2), (12, 3), (10, 3), (4, 5), (7, 1)])
def test_rows_of_a_step_are_its_slots_ordered_by_copy(global_batch, repeats):
    for step in range(4):
        slots = [slot_of_row(step, r, global_batch, repeats) for r in range(global_batch)]
        start = step * global_batch
        assert sorted(slots) == list(range(start, start + global_batch))
        keys = [(s % repeats, s) for s in slots]
        assert keys == sorted(keys)
    with pytest.raises(IndexError, match="row 8 is not in a global batch of 8"):
        slot_of_row(0, 8, 8, 2)


def test_each_epoch_shows_its_images_k_times_and_reshuffles():
    n, g, k = 45, 8, 3  # 5 steps, 40 positions: 14 images, the last of them once
    order = grain.MapDataset.range(n).shuffle(seed=11)
    ds = RepeatedAugmentation(order, steps=n // g, global_batch=g, repeats=k)
    assert len(ds) == 40
    epochs = [[ds[e * 40 + i] for i in range(40)] for e in range(3)]
    for e, seen in enumerate(epochs):
        # The first 14 images of this epoch's shuffle: 13 three times, the 14th once.
        first = [order[e * n + j] for j in range(14)]
        counts = collections.Counter(seen)
        assert counts == {**dict.fromkeys(first[:13], 3), first[13]: 1}
        # Within a step an image's copies are the step's copy-0 block, copy-1 block, ...
        step0 = seen[:g]
        assert step0 == [first[0], first[1], first[2], first[0], first[1], first[2], first[0]] + [
            first[1]
        ]
    assert len({frozenset(seen) for seen in epochs}) == 3  # a fresh subset every epoch
    again = RepeatedAugmentation(grain.MapDataset.range(n).shuffle(seed=11), steps=5,
                                 global_batch=g, repeats=k)  # fmt: skip
    assert [again[i] for i in range(3 * 40)] == sum(epochs, [])
    with pytest.raises(ValueError, match="6 steps of 8 exceed the 45 examples"):
        RepeatedAugmentation(order, steps=6, global_batch=8, repeats=2)


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory):
    """12 training JPEGs (~64 px), each its own class, so a label names the image."""
    root = tmp_path_factory.mktemp("ra")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in range(12):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True)
            y, x = np.mgrid[0:60, 0:68]
            rgb = (rng.integers(0, 256, 3) + 3 * x[..., None] + 2 * y[..., None]) % 256
            Image.fromarray(rgb.astype(np.uint8)).save(d / "0.jpg", quality=90)
    return root


@pytest.mark.parametrize("repeats", [2, 3])
def test_two_processes_cover_each_image_k_times_with_different_augmentations(
    one_image_per_class, repeats
):
    cfg = DataConfig(
        name="imagefolder",
        data_dir=str(one_image_per_class),
        image_size=16,
        repeated_aug=repeats,
        randaugment="rand-m9-mstd0.5-inc1",
        random_erasing=0.25,
    )
    g, steps = 4, 3  # 12 images // 4: 3 steps, 12 positions per epoch
    assert data.steps_per_epoch(cfg, g) == steps
    shards = [
        take(
            data.train_iterator(cfg, global_batch_size=g, process_index=p, process_count=2),
            2 * steps,
        )  # fmt: skip
        for p in range(2)
    ]
    single = take(data.train_iterator(cfg, global_batch_size=g), 2 * steps)
    chosen = []
    for epoch in range(2):
        rows = range(epoch * steps, (epoch + 1) * steps)
        both = concat([shards[p][s] for s in rows for p in range(2)])
        counts = collections.Counter(both["label"].tolist())
        assert sorted(counts.values()) == [repeats] * (12 // repeats)
        chosen.append(set(counts))
        for label in counts:  # the copies of an image are differently augmented
            copies = both["image"][both["label"] == label].reshape(repeats, -1)
            assert len(np.unique(copies, axis=0)) == repeats
        # The union is the single-process epoch, row for row.
        whole = concat([concat([shards[0][s], shards[1][s]]) for s in rows])
        flat = concat([single[s] for s in rows])
        np.testing.assert_array_equal(whole["image"], flat["image"])
        np.testing.assert_array_equal(whole["label"], flat["label"])
    assert chosen[0] != chosen[1]  # each epoch draws its own images
    if repeats == 2:  # two processes, two copies: one copy of every image on each process
        for s in range(2 * steps):
            labels = [shards[p][s]["label"].tolist() for p in range(2)]
            assert labels[0] == labels[1] and len(set(labels[0])) == g // 2
