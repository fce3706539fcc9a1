"""Tests of sepvit_jax.data: the digits, imagefolder and synthetic Grain pipelines."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from sepvit_jax import data
from sepvit_jax.data import DataConfig, DataError, digits, imagefolder
from tests.helpers import assert_batches_equal, take

DIGITS = DataConfig()


def concat(batches):
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


# ---- digits ----------------------------------------------------------------------------------


def test_digits_are_sklearns_load_digits():
    from sklearn.datasets import load_digits

    images, labels = digits.raw()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)


def test_digits_info_and_batch_shapes():
    info = data.dataset_info(DIGITS)
    assert (info.num_classes, info.channels, info.image_size) == (10, 1, 56)
    assert (info.num_train, info.num_eval) == (1437, 360)
    assert info.class_names == [str(c) for c in range(10)]
    batch = next(data.train_iterator(DIGITS, global_batch_size=32))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 56, 56, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    assert np.isfinite(batch["image"]).all()

    small = DataConfig(image_size=24)
    assert next(data.train_iterator(small, global_batch_size=8))["image"].shape == (8, 24, 24, 1)


def test_digits_split_fixed_stratified_disjoint():
    train_idx, eval_idx = digits.split_indices()
    assert len(eval_idx) == 360 and len(train_idx) == 1437
    assert not set(train_idx) & set(eval_idx)
    assert sorted({*train_idx, *eval_idx}) == list(range(1797))
    _, labels = digits.raw()
    np.testing.assert_array_equal(np.bincount(labels[eval_idx], minlength=10), [36] * 10)

    # The held-out set does not depend on the training seed.
    a = concat(list(data.eval_batches(DIGITS, batch_size=120)))
    b = concat(list(data.eval_batches(DataConfig(seed=123), batch_size=120)))
    assert_batches_equal([a], [b])
    assert a["mask"].all() and len(a["label"]) == 360
    np.testing.assert_array_equal(a["label"], labels[eval_idx])


def test_digits_normalisation():
    arrays = digits.arrays(56)
    train_x, eval_x = arrays["train"][0], arrays["eval"][0]
    assert abs(float(train_x.mean())) < 1e-4
    assert abs(float(train_x.std()) - 1.0) < 1e-4
    assert abs(float(eval_x.mean())) < 0.1 and 0.9 < float(eval_x.std()) < 1.1
    # Upsampling preserves the image: block means at the 8x8 grid follow the raw pixels.
    raw, _ = digits.raw()
    train_idx, _ = digits.split_indices()
    blocks = train_x[:50, :, :, 0].reshape(50, 8, 7, 8, 7).mean(axis=(2, 4))
    corr = np.corrcoef(blocks.ravel(), raw[train_idx[:50]].ravel())[0, 1]
    assert corr > 0.95


def test_digits_deterministic_and_reshuffled_each_epoch():
    g = 128
    steps = data.steps_per_epoch(DIGITS, g)
    assert steps == 1437 // 128
    a = take(data.train_iterator(DIGITS, global_batch_size=g), 2 * steps)
    b = take(data.train_iterator(DIGITS, global_batch_size=g), 2 * steps)
    assert_batches_equal(a, b)
    other = next(data.train_iterator(DataConfig(seed=1), global_batch_size=g))
    assert not np.array_equal(other["label"], a[0]["label"])
    # Epoch 1 is a different order of (nearly) the same examples as epoch 0.
    epoch0, epoch1 = concat(a[:steps]), concat(a[steps:])
    assert not np.array_equal(epoch0["label"], epoch1["label"])
    # Within an epoch no example repeats (drop_remainder leaves 1437 % 128 out).
    flat = epoch0["image"].reshape(len(epoch0["image"]), -1)
    assert len(np.unique(flat, axis=0)) >= len(flat) - 5  # a handful of real duplicate digits
    all_train = digits.arrays(56)["train"][0].reshape(1437, -1)
    assert len(np.unique(np.concatenate([flat, all_train]), axis=0)) == len(
        np.unique(all_train, axis=0)
    )


def test_digits_iterator_state_restores_exact_position():
    k, m = 7, 20  # m crosses two epoch boundaries (11 steps per epoch)
    it = data.train_iterator(DIGITS, global_batch_size=128)
    take(it, k)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON (grain.checkpoint.CheckpointHandler)
    expected = take(it, m)
    fresh = data.train_iterator(DIGITS, global_batch_size=128)
    fresh.set_state(json.loads(json.dumps(state)))
    assert_batches_equal(take(fresh, m), expected)


@pytest.mark.parametrize("process_count", [2, 4])
def test_digits_process_shards_union_is_global_batch(process_count):
    g, steps = 64, 25  # crosses an epoch boundary (22 steps per epoch)
    single = take(data.train_iterator(DIGITS, global_batch_size=g), steps)
    shards = [
        take(
            data.train_iterator(
                DIGITS, global_batch_size=g, process_index=p, process_count=process_count
            ),
            steps,
        )
        for p in range(process_count)
    ]
    for step in range(steps):
        local = [shards[p][step] for p in range(process_count)]
        assert all(x["image"].shape[0] == g // process_count for x in local)
        assert_batches_equal([concat(local)], [single[step]])


def test_batch_not_divisible_or_too_large():
    with pytest.raises(DataError, match="not divisible by process_count=3"):
        data.train_iterator(DIGITS, global_batch_size=10, process_count=3)
    with pytest.raises(DataError, match="not divisible"):
        data.eval_batches(DIGITS, batch_size=10, process_count=4)
    with pytest.raises(DataError, match="larger than the 1437"):
        data.steps_per_epoch(DIGITS, 2000)
    with pytest.raises(DataError, match="process_index"):
        data.train_iterator(DIGITS, global_batch_size=8, process_index=2, process_count=2)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_digits_eval_covers_every_example_once(process_count):
    batch_size = 96  # 360 = 3 * 96 + 72 -> 4 steps, the last padded
    per_process = [
        list(
            data.eval_batches(
                DIGITS, batch_size=batch_size, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    assert all(len(batches) == 4 for batches in per_process)  # same step count everywhere
    b = batch_size // process_count
    for batches in per_process:
        for x in batches:
            assert x["image"].shape == (b, 56, 56, 1) and x["image"].dtype == np.float32
            assert x["label"].dtype == np.int32 and x["mask"].dtype == np.bool_
            assert (x["image"][~x["mask"]] == 0).all()
    steps = [concat([per_process[p][s] for p in range(process_count)]) for s in range(4)]
    whole = concat(steps)
    assert whole["mask"].sum() == 360
    assert not whole["mask"][360:].any() and whole["mask"][:360].all()
    images, labels = digits.arrays(56)["eval"]
    np.testing.assert_array_equal(whole["image"][:360], images)
    np.testing.assert_array_equal(whole["label"][:360], labels)


def test_config_errors():
    with pytest.raises(DataError, match="unknown dataset name 'mnist'"):
        data.dataset_info(DataConfig(name="mnist"))
    with pytest.raises(DataError, match="num_classes=5 but the digits dataset has"):
        data.dataset_info(DataConfig(num_classes=5))
    with pytest.raises(DataError, match="image_size"):
        data.dataset_info(DataConfig(image_size=0))
    with pytest.raises(DataError, match="needs DataConfig.data_dir"):
        data.dataset_info(DataConfig(name="imagefolder"))


# ---- imagefolder -----------------------------------------------------------------------------

CLASSES = ["cat", "dog", "fish"]


def write_tree(
    root, *, train_per_class=4, val_per_class=2, train_classes=CLASSES, val_classes=None
):
    rng = np.random.default_rng(0)
    for split, classes, n in (
        ("train", train_classes, train_per_class),
        ("val", CLASSES if val_classes is None else val_classes, val_per_class),
    ):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                # Varied sizes and aspect ratios, mostly larger than the crops.
                pixels = rng.integers(0, 256, (30 + 7 * i, 44 - 3 * i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)
            (d / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture
def tree(tmp_path):
    """3 classes x 4 train JPEGs + 1 corrupt; 3 x 2 val JPEGs + 1 corrupt."""
    root = write_tree(tmp_path / "ds")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff definitely not a jpeg")
    (root / "val" / "cat" / "broken.png").write_bytes(b"garbage")
    return root


def folder_cfg(root, **kw):
    return DataConfig(name="imagefolder", data_dir=str(root), image_size=16, **kw)


def test_imagefolder_shapes_and_classes(tree):
    cfg = folder_cfg(tree, max_bad_fraction=0.2)
    info = data.dataset_info(cfg)
    assert info.class_names == CLASSES
    assert (info.num_classes, info.channels, info.image_size) == (3, 3, 16)
    assert (info.num_train, info.num_eval) == (13, 7)  # files found, the corrupt ones included
    it = data.train_iterator(cfg, global_batch_size=4)
    for batch in take(it, 6):
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
        assert np.isfinite(batch["image"]).all()
        # ImageNet normalisation of 0..255 pixels.
        assert batch["image"].min() > -2.2 and batch["image"].max() < 2.7
    # Deterministic, including the random crops and flips.
    again = take(data.train_iterator(cfg, global_batch_size=4), 6)
    assert_batches_equal(take(data.train_iterator(cfg, global_batch_size=4), 6), again)


def test_imagefolder_corrupt_image_skipped_and_counted(tree, caplog):
    cfg = folder_cfg(tree, max_bad_fraction=0.2)
    bad = str(tree / "train" / "dog" / "broken.jpg")
    with caplog.at_level(logging.WARNING, logger="sepvit_jax.data"):
        batches = take(data.train_iterator(cfg, global_batch_size=4), 3 * 3)  # 3 epochs
    assert data.unreadable_images()[str(tree / "train")] == [bad]
    assert any(
        bad in r.getMessage() and "1 unreadable of 13" in r.getMessage() for r in caplog.records
    )
    # The slot of the corrupt file is filled by a real image: every row is a decoded image.
    for batch in batches:
        assert (batch["image"].reshape(4, -1).std(axis=1) > 0.1).all()

    evals = list(data.eval_batches(cfg, batch_size=4))
    whole = concat(evals)
    assert len(evals) == 2 and whole["image"].shape == (8, 16, 16, 3)
    # 7 val files, one unreadable (masked out), one padding row.
    assert whole["mask"].sum() == 6
    assert str(tree / "val" / "cat" / "broken.png") in data.unreadable_images()[str(tree / "val")]
    assert_batches_equal(list(data.eval_batches(cfg, batch_size=4)), evals)


def test_imagefolder_too_many_bad_images(tree):
    # Default limit 1%; a global batch of all 13 files touches the corrupt one in step 1.
    it = data.train_iterator(folder_cfg(tree), global_batch_size=13)
    with pytest.raises(DataError, match=r"1 of the 13 images .* are unreadable.*broken\.jpg"):
        next(it)


def test_random_resized_crop_box():
    rng = np.random.default_rng(0)
    boxes = [imagefolder.random_resized_crop_box(64, 48, rng) for _ in range(500)]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        area = (right - left) * (bottom - top) / (64 * 48)
        assert 0.07 < area <= 1.0
        # Within the ratio range up to rounding, or the clamped central fallback.
        assert 3 / 4 - 0.1 < (right - left) / (bottom - top) < 4 / 3 + 0.1
    assert len(set(boxes)) > 400  # random, not a constant crop
    # An extreme panorama can never fit the ratio range: central crop clamped to 4/3.
    # w = round(10 * 4 / 3)
    assert imagefolder.random_resized_crop_box(400, 10, rng) == (193, 0, 206, 10)


def test_imagefolder_process_shards_union_is_global_batch(tree):
    cfg = folder_cfg(tree, max_bad_fraction=0.2)
    single = take(data.train_iterator(cfg, global_batch_size=4), 4)
    shards = [
        take(data.train_iterator(cfg, global_batch_size=4, process_index=p, process_count=2), 4)
        for p in range(2)
    ]
    assert_batches_equal([concat([shards[0][s], shards[1][s]]) for s in range(4)], single)


def test_imagefolder_missing_dirs(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        data.dataset_info(folder_cfg(missing))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing: .*only_train/val"):
        data.dataset_info(folder_cfg(tmp_path / "only_train"))


def test_imagefolder_empty(tmp_path):
    root = write_tree(tmp_path / "empty", train_per_class=0, val_per_class=0)
    with pytest.raises(DataError, match=r"no images in .*empty/train"):
        data.dataset_info(folder_cfg(root))
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    (tmp_path / "no_classes" / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        data.dataset_info(folder_cfg(tmp_path / "no_classes"))


def test_imagefolder_mismatched_classes(tmp_path):
    root = write_tree(
        tmp_path / "mm", train_classes=["a", "b", "c"], val_classes=["a", "b", "d"], val_per_class=1
    )
    with pytest.raises(DataError) as e:
        data.dataset_info(folder_cfg(root))
    msg = str(e.value)
    assert "only in train: ['c']" in msg and "only in val: ['d']" in msg and str(root) in msg


@pytest.mark.slow
def test_imagefolder_worker_processes_match_in_process(tree):
    cfg = folder_cfg(tree, max_bad_fraction=0.2)
    expected = take(data.train_iterator(cfg, global_batch_size=4), 7)
    it = data.train_iterator(
        folder_cfg(tree, max_bad_fraction=0.2, num_workers=2), global_batch_size=4
    )
    try:
        got = take(it, 4)
        state = it.get_state()
        got += take(it, 3)
    finally:
        it.close()
    assert_batches_equal(got, expected)  # same batches whatever num_workers
    it = data.train_iterator(
        folder_cfg(tree, max_bad_fraction=0.2, num_workers=2), global_batch_size=4
    )
    try:
        it.set_state(state)
        assert_batches_equal(take(it, 3), expected[4:])
    finally:
        it.close()


# ---- synthetic -------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism():
    cfg = DataConfig(name="synthetic", image_size=32)
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.channels, info.num_train, info.num_eval) == (
        10,
        3,
        1281167,
        50000,
    )
    a = take(data.train_iterator(cfg, global_batch_size=16), 3)
    b = take(data.train_iterator(cfg, global_batch_size=16), 3)
    assert_batches_equal(a, b)
    assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].dtype == np.int32 and len(set(concat(a)["label"])) > 3
    other = next(
        data.train_iterator(
            DataConfig(name="synthetic", image_size=32, seed=5), global_batch_size=16
        )
    )
    assert not np.array_equal(other["image"], a[0]["image"])

    cfg = DataConfig(name="synthetic", image_size=8, channels=1, num_classes=1000)
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.channels) == (1000, 1)
    batch = next(iter(data.eval_batches(cfg, batch_size=64)))
    assert batch["image"].shape == (64, 8, 8, 1) and batch["mask"].all()
    assert batch["label"].max() < 1000
