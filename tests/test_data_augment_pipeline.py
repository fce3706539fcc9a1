"""RandAugment and random erasing inside the imagefolder training pipeline, and their settings."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest
from PIL import Image

from sepvit_jax import data
from sepvit_jax.data import DataConfig, DataError, imagefolder
from sepvit_jax.data.config import rand_augment, seeds
from tests.helpers import assert_batches_equal, take

RECIPE = {"randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25}
# ImageNet mean and std as the pre-augmentation pipeline normalised with (written out, not
# imported, so a change to the module's constants would show).
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def write_photos(root, per_class=(4, 4, 4), val_per_class=1):
    """~64 px JPEGs with structure (gradients and a disc), so the ops have something to change."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", per_class), ("val", [val_per_class] * len(per_class))):
        for c, n in enumerate(counts):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = 56 + 4 * i, 72 - 3 * i
                y, x = np.mgrid[0:h, 0:w]
                base = rng.integers(0, 256, 3)
                disc = (y - h / 2) ** 2 + (x - w / 3) ** 2 < (h / 4) ** 2
                rgb = (base + 2 * x[..., None] + y[..., None] + 90 * disc[..., None]) % 256
                rgb += rng.integers(0, 12, rgb.shape)
                Image.fromarray(rgb.astype(np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


def folder_cfg(root, **kw):
    return DataConfig(name="imagefolder", data_dir=str(root), image_size=16, **kw)


def _pre_augmentation_example(files, labels, size):
    """The training example as the pipeline made it before augmentations existed."""

    def example(index, rng):
        with Image.open(files[index]) as im:
            img = im.convert("RGB")
        box = imagefolder.random_resized_crop_box(img.width, img.height, rng)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(img, np.float32) * np.float32(1 / 255)
        return {"image": (x - MEAN) / STD, "label": labels[index]}

    return example


def test_defaults_leave_the_pipeline_as_before(photos):
    cfg = folder_cfg(photos, seed=7)
    g, n = 4, 6  # crosses the epoch boundary (3 steps per epoch)
    tree = imagefolder.scan(str(photos))
    shuffle_seed, augment_seed = seeds(cfg.seed)
    steps = len(tree.train.files) // g
    reference = grain.MapDataset.range(len(tree.train.files)).shuffle(seed=shuffle_seed)
    reference = reference[: steps * g].random_map(
        _pre_augmentation_example(tree.train.files, tree.train.labels, 16), seed=augment_seed
    )
    reference = reference.batch(g).repeat()
    expected = [reference[i] for i in range(n)]
    assert_batches_equal(take(data.train_iterator(cfg, global_batch_size=g), n), expected)
    explicit = folder_cfg(photos, seed=7, randaugment=None, random_erasing=0.0, repeated_aug=1)
    assert_batches_equal(take(data.train_iterator(explicit, global_batch_size=g), n), expected)


@pytest.mark.parametrize(
    "augment", [{"randaugment": "rand-m9-mstd0.5-inc1"}, {"random_erasing": 1.0}, RECIPE]
)
def test_augmentation_deterministic_per_seed_and_position(photos, augment):
    cfg = folder_cfg(photos, **augment)
    a = take(data.train_iterator(cfg, global_batch_size=4), 5)
    assert_batches_equal(take(data.train_iterator(cfg, global_batch_size=4), 5), a)
    plain = take(data.train_iterator(folder_cfg(photos), global_batch_size=4), 5)
    # Same order and crops (drawn first from the same rng), different pixels.
    for x, y in zip(a, plain, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
    assert (
        sum(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, plain, strict=True)) >= 4
    )
    other = next(data.train_iterator(folder_cfg(photos, seed=1, **augment), global_batch_size=4))
    assert not np.array_equal(other["image"], a[0]["image"])


def test_randaugment_is_timms_with_imagenet_fill():
    ra = rand_augment(
        DataConfig(name="imagefolder", data_dir="x", randaugment=RECIPE["randaugment"])
    )
    assert (ra.magnitude, ra.magnitude_std, ra.increasing, ra.num_layers) == (9, 0.5, True, 2)
    # timm hands RandAugment the dataset mean as fill: round(255 * mean).
    assert ra.fill == tuple(int(v) for v in np.round(255 * MEAN)) == (124, 116, 104)
    assert ra.interpolation == "bicubic"  # DeiT's interpolation
    assert rand_augment(DataConfig()) is None


def test_randaugment_stays_on_the_uint8_grid(photos):
    # RandAugment works on the uint8 image before normalisation: every value is (k/255-mean)/std.
    cfg = folder_cfg(photos, randaugment="rand-n3-m9-mstd0.5-inc1")
    images = np.concatenate(
        [b["image"] for b in take(data.train_iterator(cfg, global_batch_size=4), 3)]
    )
    levels = np.round((images * STD + MEAN) * 255)
    np.testing.assert_allclose((images * STD + MEAN) * 255, levels, atol=2e-3)
    assert levels.min() >= 0 and levels.max() <= 255


def test_random_erasing_is_one_noise_box(photos):
    plain = take(data.train_iterator(folder_cfg(photos), global_batch_size=4), 3)
    erased = take(
        data.train_iterator(folder_cfg(photos, random_erasing=1.0), global_batch_size=4), 3
    )
    noise = []
    for x, y in zip(erased, plain, strict=True):
        for img, ref in zip(x["image"], y["image"], strict=True):
            changed = (img != ref).any(axis=-1)
            rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
            box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            assert box.all(), "the erased pixels form one rectangle"
            assert 0.02 * 256 - 8 <= box.size <= 256 / 3 + 8  # area bounds, up to rounding
            assert box.shape[0] < 16 and box.shape[1] < 16
            noise.append(img[changed].ravel())
    # Pixel mode on the normalised image: N(0, 1) per pixel and channel (erasing before the
    # normalisation would give mean ~-2, std ~4).
    noise = np.concatenate(noise)
    assert len(noise) > 300
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2


def test_resume_with_every_augmentation(photos):
    cfg = folder_cfg(photos, repeated_aug=3, **RECIPE)
    k, m = 2, 5  # m crosses an epoch boundary (3 steps per epoch)
    it = data.train_iterator(cfg, global_batch_size=4, process_index=1, process_count=2)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, m)
    fresh = data.train_iterator(cfg, global_batch_size=4, process_index=1, process_count=2)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, m), expected)


@pytest.mark.slow
def test_worker_processes_match_in_process(photos):
    cfg = folder_cfg(photos, repeated_aug=2, **RECIPE)
    expected = take(data.train_iterator(cfg, global_batch_size=4), 4)
    workers = folder_cfg(photos, repeated_aug=2, num_workers=2, **RECIPE)
    it = data.train_iterator(workers, global_batch_size=4)
    try:
        assert_batches_equal(take(it, 4), expected)
    finally:
        it.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"randaugment": "rnd-m9"}, r"DataConfig.randaugment='rnd-m9': .*must start with 'rand'"),
        ({"randaugment": "rand-m9-x1"}, r"randaugment='rand-m9-x1': .*section 'x1'"),
        ({"randaugment": "rand-w1"}, "weight set w1"),
        ({"randaugment": "rand-n14-w0"}, "w0 has 13 ops, fewer than n14"),
        ({"randaugment": "rand-p1.5"}, "invalid RandAugment settings"),
        ({"randaugment": 9}, "randaugment must be a string or None, got 9"),
        ({"random_erasing": 1.5}, r"random_erasing must be a probability in \[0, 1\], got 1.5"),
        ({"random_erasing": -0.1}, "random_erasing must be a probability"),
        ({"random_erasing": float("nan")}, "random_erasing must be a probability"),
        ({"random_erasing": True}, "random_erasing must be a probability"),
        ({"repeated_aug": 0}, r"repeated_aug must be an int >= 1 \(1: off\), got 0"),
        ({"repeated_aug": 2.0}, "repeated_aug must be an int"),
        ({"repeated_aug": True}, "repeated_aug must be an int"),
    ],
)
def test_bad_settings_are_one_line_errors(photos, settings, message):
    with pytest.raises(DataError, match=message) as e:
        data.dataset_info(folder_cfg(photos, **settings))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
@pytest.mark.parametrize(
    "settings", [{"randaugment": "rand-m9"}, {"random_erasing": 0.25}, {"repeated_aug": 3}]
)
def test_augmentation_of_in_memory_datasets_is_an_error(name, settings):
    ((field, value),) = settings.items()
    with pytest.raises(DataError, match=f"{field}={value!r} applies to the imagefolder dataset "
                       f"only, not {name}"):  # fmt: skip
        data.train_iterator(DataConfig(name=name, image_size=8, **settings), global_batch_size=8)
    assert data.dataset_info(DataConfig(name=name, image_size=8, random_erasing=0))


def test_input_pipeline_benchmark_runs(tmp_path, capsys):
    from benchmarks import input_pipeline

    out = tmp_path / "bench.json"
    input_pipeline.main(
        # 8 batches: a timed window long enough for the CPU clock (10 ms ticks) to see it
        ["--images", "8", "--classes", "2", "--workers", "0", "--batch", "4", "--batches", "8"]
        + ["--warmup", "0", "--image-size", "32", "--rounds", "2", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["recipe"] == RECIPE and result["dataset"]["images"] == 8
    assert 40 < result["dataset"]["mean_kb"] < 200  # photo-sized JPEGs, not flat colour
    assert [(r["round"], r["workers"], r["images"]) for r in result["rows"]] == [
        (0, 0, 32),
        (1, 0, 32),
    ]
    for row in result["rows"]:
        assert row["img_per_s"] > 0 and row["cpu_s_per_img"] > 0 and row["cores_used"] > 0
        assert row["other_cores_busy"] >= 0
    (summary,) = result["summary"]
    rates = sorted(r["img_per_s"] for r in result["rows"])
    assert (
        summary["img_per_s"] == (rates[0] + rates[1]) / 2 and summary["img_per_s_min"] == rates[0]
    )
    cpu = sorted(r["cpu_s_per_img"] for r in result["rows"])
    assert summary["cores_per_accelerator"] == round(5528 * (cpu[0] + cpu[1]) / 2, 1)
    assert result["stages_ms_per_img"]["decode"] > 0
    assert set(result["meta"]) >= {"date", "cpu", "versions", "load_avg_start", "load_avg_end"}
    assert "| 0 |" in capsys.readouterr().out
