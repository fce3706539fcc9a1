"""RandAugment, random erasing and mixup/cutmix (sepvit_jax.data.{randaugment,erasing,mixup})."""

from __future__ import annotations

import functools
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from sepvit_jax.data.erasing import random_erasing
from sepvit_jax.data.mixup import cutmix_box, mix_batch, mix_batch_jax, smooth_one_hot
from sepvit_jax.data.randaugment import (
    IMAGENET_FILL,
    INCREASING_OPS,
    SIGNED_OPS,
    STANDARD_OPS,
    RandAugment,
    apply_op,
    op_argument,
    parse_rand_augment,
)

BICUBIC = Image.Resampling.BICUBIC


def _gradient(h: int = 24, w: int = 32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _noise_image(h: int = 24, w: int = 32, seed: int = 0) -> Image.Image:
    # Mid-range values, so enhancement in either direction is not clipped away.
    rgb = np.random.default_rng(seed).integers(64, 192, (h, w, 3))
    return Image.fromarray(rgb.astype(np.uint8))


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# RandAugment: parsing


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("rand", {}),
        ("rand-m9-mstd0.5-inc1", {"magnitude": 9.0, "magnitude_std": 0.5, "increasing": True}),
        ("rand-n3-m7-mmax12-w0", {"num_layers": 3, "magnitude": 7.0, "magnitude_max": 12.0,
                                  "weight_set": 0}),
        ("rand-inc0", {"increasing": False}),
        ("rand-mstd101", {"magnitude_std": math.inf}),
        ("rand-mstd100", {"magnitude_std": 100.0}),
        ("rand-p0.7-m5", {"prob": 0.7, "magnitude": 5.0}),
    ],
)  # fmt: skip
def test_parse_good(config, expected):
    assert parse_rand_augment(config) == expected


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("rnd-m9", "rand"),
        ("rand-m9-foo1", "foo1"),
        ("rand-m", "'m'"),
        ("rand-mx", "mx"),
        ("rand-m9.5", "m9.5"),
        ("rand-n2x", "n2x"),
        ("rand-p0.5x", "p0.5x"),
        ("rand-mstd0.5.1", "mstd0.5.1"),
        ("rand--m9", "''"),
        ("rand-m9-", "''"),
    ],
)
def test_parse_bad_names_the_section(config, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        parse_rand_augment(config)


def test_from_string_and_validation():
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1", interpolation="bilinear")
    assert (ra.magnitude, ra.magnitude_std, ra.num_layers, ra.prob) == (9.0, 0.5, 2, 0.5)
    assert ra.ops == INCREASING_OPS and ra.fill == IMAGENET_FILL
    assert RandAugment.from_string("rand-m9").ops == STANDARD_OPS
    with pytest.raises(ValueError, match="w1"):
        RandAugment.from_string("rand-w1")
    with pytest.raises(ValueError, match="interpolation"):
        RandAugment(interpolation="lanczos")


# ---------------------------------------------------------------------------------------------
# RandAugment: levels and ops


def test_op_arguments():
    assert op_argument("Rotate", 9) == pytest.approx(27.0)
    assert op_argument("Rotate", 9, sign=-1) == pytest.approx(-27.0)
    assert op_argument("ShearY", 10, sign=-1) == pytest.approx(-0.3)
    assert op_argument("TranslateXRel", 10) == pytest.approx(0.45)
    assert op_argument("Color", 0) == pytest.approx(0.1)
    assert op_argument("Color", 10, sign=-1) == pytest.approx(1.9)  # unsigned op
    assert op_argument("ContrastIncreasing", 10, sign=-1) == pytest.approx(0.1)
    assert op_argument("ContrastIncreasing", 5, sign=1) == pytest.approx(1.45)
    assert op_argument("Posterize", 9) == 3 and op_argument("PosterizeIncreasing", 9) == 1
    assert op_argument("Solarize", 5) == 128 and op_argument("SolarizeIncreasing", 10) == 0
    assert op_argument("SolarizeAdd", 10) == 110
    assert op_argument("Invert", 7) is None
    with pytest.raises(ValueError, match="Blur"):
        op_argument("Blur", 5)


def test_rotate_matches_pil():
    img = _gradient()
    out = apply_op(img, "Rotate", op_argument("Rotate", 9, sign=-1))
    np.testing.assert_array_equal(_px(out), _px(img.rotate(-27, BICUBIC, fillcolor=IMAGENET_FILL)))
    assert tuple(_px(out)[0, 0]) == IMAGENET_FILL  # the uncovered corner takes the fill


def test_translate_shifts_by_whole_pixels():
    img = _gradient(w=20)
    out = _px(apply_op(img, "TranslateXRel", op_argument("TranslateXRel", 10)))  # 0.45 * 20 = 9
    np.testing.assert_array_equal(out[:, :11], _px(img)[:, 9:])
    assert (out[:, 11:] == IMAGENET_FILL).all()


def test_pixel_ops_at_fixed_levels():
    img = _gradient()
    x = _px(img)
    np.testing.assert_array_equal(_px(apply_op(img, "Invert", None)), 255 - x)
    post = apply_op(img, "Posterize", op_argument("Posterize", 5))  # 2 bits kept
    np.testing.assert_array_equal(_px(post), x & 0xC0)
    post = apply_op(img, "PosterizeIncreasing", op_argument("PosterizeIncreasing", 10))
    np.testing.assert_array_equal(_px(post), 0)  # 0 bits kept
    sol = apply_op(img, "Solarize", op_argument("Solarize", 5))  # threshold 128
    np.testing.assert_array_equal(_px(sol), np.where(x >= 128, 255 - x, x))
    sol = apply_op(img, "SolarizeIncreasing", op_argument("SolarizeIncreasing", 0))
    np.testing.assert_array_equal(_px(sol), x)  # threshold 256: nothing inverted
    add = apply_op(img, "SolarizeAdd", op_argument("SolarizeAdd", 10))
    np.testing.assert_array_equal(_px(add), np.where(x < 128, np.minimum(x + 110, 255), x))


def test_equalize_and_autocontrast_stretch_two_levels():
    # 510 pixels, half 50 and half 200: both ops map them to the extremes 0 and 255.
    arr = np.full((15, 34, 3), 50, np.uint8)
    arr[:, 17:] = 200
    img = Image.fromarray(arr)
    for name in ("Equalize", "AutoContrast"):
        out = _px(apply_op(img, name, None))
        assert (out[:, :17] == 0).all() and (out[:, 17:] == 255).all(), name


@pytest.mark.parametrize("name", [n for n in INCREASING_OPS if n not in STANDARD_OPS])
@pytest.mark.parametrize("sign", [1, -1])
def test_increasing_ops_grow_with_magnitude(name, sign):
    img = _noise_image()
    x = _px(img)
    change = [
        np.abs(_px(apply_op(img, name, op_argument(name, m, sign))) - x).mean() for m in (1, 4, 9)
    ]
    assert change[0] < change[1] < change[2], change


@pytest.mark.parametrize("name", ["Posterize", "Solarize"])
def test_standard_posterize_solarize_weaken_with_magnitude(name):
    img = _noise_image()
    x = _px(img)
    change = [np.abs(_px(apply_op(img, name, op_argument(name, m))) - x).mean() for m in (1, 9)]
    assert change[0] > change[1], change


# ---------------------------------------------------------------------------------------------
# RandAugment: the random policy


def test_magnitude_noise():
    rng = np.random.default_rng(0)
    assert RandAugment(magnitude=9).sample_magnitude(rng) == 9.0
    assert RandAugment(magnitude=15).sample_magnitude(rng) == 10.0  # default clip 10
    assert RandAugment(magnitude=15, magnitude_max=20).sample_magnitude(rng) == 15.0
    gauss = RandAugment.from_string("rand-m9-mstd0.5")
    draws = np.array([gauss.sample_magnitude(rng) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() == 10.0  # clipped: 9 + 2 std reaches 10
    assert abs(np.median(draws) - 9.0) < 0.05 and 0.4 < draws.std() < 0.5
    uniform = RandAugment.from_string("rand-m9-mstd101")
    draws = np.array([uniform.sample_magnitude(rng) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 9 and abs(draws.mean() - 4.5) < 0.25


def test_each_layer_is_one_op_of_the_list():
    img = _gradient(16, 16)
    ra = RandAugment(magnitude=9, num_layers=1, prob=1.0, increasing=True)
    candidates = {
        name: [_px(apply_op(img, name, op_argument(name, 9, s))) for s in (1, -1)]
        for name in ra.ops
    }
    seen = set()
    for seed in range(40):
        out = _px(ra(img, np.random.default_rng(seed)))
        hits = [n for n, outs in candidates.items() if any((out == c).all() for c in outs)]
        assert hits, f"seed {seed}: output is none of the ops"
        seen.update(hits)
    assert len(seen) >= 10  # uniform choice over 15 ops


def test_randaugment_deterministic_and_picklable():
    img = _noise_image()
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    clone = pickle.loads(pickle.dumps(ra))
    assert clone == ra
    outs = [_px(ra(img, np.random.default_rng(seed))) for seed in range(8)]
    for seed in (0, 3):
        np.testing.assert_array_equal(_px(clone(img, np.random.default_rng(seed))), outs[seed])
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) >= 5  # a few seeds may skip both ops (prob 0.5 each)
    mixed_interp = RandAugment(magnitude=9, prob=1.0, interpolation="random")
    a, b = (_px(mixed_interp(img, np.random.default_rng(5))) for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_signed_ops_flip_sign_about_half_the_time():
    assert {"Rotate", "ShearX", "TranslateYRel", "ColorIncreasing"} <= SIGNED_OPS
    img = _gradient(16, 16)
    # Weight set w0 picks Rotate for about 28% of the images, so each sign shows up often.
    ra = RandAugment(magnitude=5, num_layers=1, prob=1.0, weight_set=0)
    plus = _px(apply_op(img, "Rotate", 15.0)).tobytes()
    minus = _px(apply_op(img, "Rotate", -15.0)).tobytes()
    outs = [_px(ra(img, np.random.default_rng(seed))).tobytes() for seed in range(200)]
    n_plus, n_minus = outs.count(plus), outs.count(minus)
    assert 30 < n_plus + n_minus < 85 and min(n_plus, n_minus) > 10, (n_plus, n_minus)


# ---------------------------------------------------------------------------------------------
# Random erasing


def _erased_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    changed = (before != after).any(-1)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert changed[top:bottom, left:right].all()  # one solid box, nothing outside it
    assert changed.sum() == (bottom - top) * (right - left)
    return top, bottom, left, right


def test_erasing_probability_zero_is_identity():
    image = np.random.default_rng(0).standard_normal((32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(random_erasing(image, np.random.default_rng(1), 0.0), image)


def test_erasing_one_box_within_area_bounds():
    image = np.full((64, 48, 3), 7.0, np.float32)  # N(0, 1) noise never lands on 7.0
    values = []
    for seed in range(30):
        out = random_erasing(image, np.random.default_rng(seed), 1.0)
        top, bottom, left, right = _erased_box(image, out)
        h, w = bottom - top, right - left
        slack = ((h + w) / 2 + 1) / image[..., 0].size  # the sides are rounded to pixels
        assert 0.02 - slack <= h * w / image[..., 0].size <= 1 / 3 + slack
        assert h < 64 and w < 48
        values.append(out[top:bottom, left:right].ravel())
        again = random_erasing(image, np.random.default_rng(seed), 1.0)
        np.testing.assert_array_equal(again, out)
    assert (image == 7.0).all()  # the input is never written to
    values = np.concatenate(values)
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1.0) < 0.05


def test_erasing_modes():
    image = np.full((40, 40, 3), 7.0, np.float32)
    const = random_erasing(image, np.random.default_rng(0), 1.0, mode="const")
    top, bottom, left, right = _erased_box(image, const)
    assert (const[top:bottom, left:right] == 0).all()
    rand = random_erasing(image, np.random.default_rng(0), 1.0, mode="rand")
    box = rand[top:bottom, left:right]
    assert (box == box[0, 0]).all() and len(set(box[0, 0].tolist())) == 3
    with pytest.raises(ValueError, match="mode"):
        random_erasing(image, np.random.default_rng(0), 1.0, mode="noise")


def test_erasing_several_boxes():
    image = np.full((40, 40, 3), 7.0, np.float32)
    for seed in range(10):
        out = random_erasing(image, np.random.default_rng(seed), 1.0, count=2, max_count=3)
        np.testing.assert_array_equal(
            out, random_erasing(image, np.random.default_rng(seed), 1.0, count=2, max_count=3)
        )
        # Each of the 2-3 boxes gets at most 1/3 of the area divided by the box count.
        assert 0 < (out != image).any(-1).mean() <= 1 / 3 + 0.05


# ---------------------------------------------------------------------------------------------
# Mixup / cutmix

B, H, W, C, K = 6, 16, 12, 3, 10
LABELS = np.array([3, 1, 4, 0, 5, 9], np.int32)  # distinct, so lam can be read off the targets


def _batch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, H, W, C), dtype=np.float32)


def _lam_from_targets(targets: np.ndarray, smoothing: float) -> float:
    lam = (targets[0, LABELS[0]] - smoothing / K) / (1 - smoothing)
    expected = lam * smooth_one_hot(LABELS, K, smoothing)
    expected += (1 - lam) * smooth_one_hot(LABELS[::-1], K, smoothing)
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    return float(lam)


def _check_cutmix(images, mixed, lam) -> None:
    from_flip = (np.asarray(mixed) == images[::-1]).all(-1)
    kept = (np.asarray(mixed) == images).all(-1)
    assert (from_flip ^ kept).all()  # every pixel is one or the other (random data: no ties)
    assert (from_flip == from_flip[0]).all()  # one box for the whole batch
    if from_flip[0].any():
        _erased_box(images[0], np.asarray(mixed)[0])  # a solid rectangle
    assert from_flip[0].sum() == round((1 - lam) * H * W)


def test_smooth_one_hot():
    y = smooth_one_hot(np.array([2, 0]), 4, 0.1)
    np.testing.assert_allclose(y, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])


def test_cutmix_box_corrects_lambda():
    for seed in range(50):
        (top, bottom, left, right), lam = cutmix_box(H, W, 0.3, np.random.default_rng(seed))
        assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
        assert lam == pytest.approx(1 - (bottom - top) * (right - left) / (H * W))
        assert lam >= 0.3 - 1e-9  # clipping and flooring only shrink the box


def test_mixup_numpy():
    images = _batch()
    for seed in range(5):
        mixed, targets = mix_batch(
            images, LABELS, K, np.random.default_rng(seed), 0.8, 0.0, 0.5, 0.0
        )
        lam = _lam_from_targets(targets, 0.0)
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-6)
        assert mixed.dtype == np.float32 and targets.dtype == np.float32


def test_cutmix_numpy():
    images = _batch()
    original = images.copy()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mixed, targets = mix_batch(images, LABELS, K, rng, 0.0, 1.0, label_smoothing=0.0)
        _check_cutmix(images, mixed, _lam_from_targets(targets, 0.0))
    np.testing.assert_array_equal(images, original)


def test_switch_smoothing_and_determinism_numpy():
    images = _batch()
    kinds = set()
    for seed in range(20):
        mixed, targets = mix_batch(images, LABELS, K, np.random.default_rng(seed))  # DeiT values
        lam = _lam_from_targets(targets, 0.1)
        if (mixed == images).any():  # untouched pixels only happen with cutmix
            _check_cutmix(images, mixed, lam)
            kinds.add("cutmix")
        else:
            np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-6)
            kinds.add("mixup")
        again = mix_batch(images, LABELS, K, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[0], mixed)
        np.testing.assert_array_equal(again[1], targets)
    assert kinds == {"mixup", "cutmix"}
    untouched, targets = mix_batch(images, LABELS, K, np.random.default_rng(0), prob=0.0)
    np.testing.assert_array_equal(untouched, images)
    np.testing.assert_allclose(targets, smooth_one_hot(LABELS, K, 0.1))
    with pytest.raises(ValueError, match="alpha"):
        mix_batch(images, LABELS, K, np.random.default_rng(0), 0.0, 0.0)


@functools.cache
def _jitted(mixup_alpha: float, cutmix_alpha: float):
    import jax

    return jax.jit(mix_batch_jax, static_argnames=("num_classes", "mixup_alpha", "cutmix_alpha"))


def _run_jax(seed: int, switch_prob: float, prob: float = 1.0):
    import jax

    fn = _jitted(0.8, 1.0)
    # switch_prob, label_smoothing and prob are traced: all calls share one compiled program.
    mixed, targets = fn(
        _batch(), LABELS, jax.random.key(seed), num_classes=K, mixup_alpha=0.8,
        cutmix_alpha=1.0, switch_prob=switch_prob, label_smoothing=0.1, prob=prob,
    )  # fmt: skip
    return np.asarray(mixed), np.asarray(targets)


def test_mix_batch_jax():
    images = _batch()
    kinds = {}
    for seed in range(16):
        for switch_prob in (0.0, 0.5, 1.0):
            mixed, targets = _run_jax(seed, switch_prob)
            lam = _lam_from_targets(targets, 0.1)
            if (mixed == images).any():  # untouched pixels only happen with cutmix
                _check_cutmix(images, mixed, lam)
                kinds.setdefault(switch_prob, set()).add("cutmix")
            else:
                np.testing.assert_allclose(
                    mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5
                )
                kinds.setdefault(switch_prob, set()).add("mixup")
    assert kinds == {0.0: {"mixup"}, 0.5: {"mixup", "cutmix"}, 1.0: {"cutmix"}}
    for a, b in zip(_run_jax(3, 0.5), _run_jax(3, 0.5), strict=True):
        np.testing.assert_array_equal(a, b)
    untouched, targets = _run_jax(0, 0.5, prob=0.0)
    np.testing.assert_array_equal(untouched, images)
    np.testing.assert_allclose(targets, smooth_one_hot(LABELS, K, 0.1), atol=1e-6)


@pytest.mark.parametrize(
    ("mixup_alpha", "cutmix_alpha", "has_cond"),
    [(0.8, 0.0, False), (0.0, 1.0, False), (0.8, 1.0, True)],
)
def test_mix_batch_jax_picks_the_method_statically(mixup_alpha, cutmix_alpha, has_cond):
    import jax

    # Tracing only: compiling a program with jax.random.beta takes seconds on a small CPU, and
    # the branch functions the single-method configurations call are those test_mix_batch_jax
    # runs through the cond.
    fn = functools.partial(
        mix_batch_jax, num_classes=K, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
    )
    jaxpr = jax.make_jaxpr(fn)(_batch(), LABELS, jax.random.key(0))
    assert any(e.primitive.name == "cond" for e in jaxpr.eqns) == has_cond
    images, targets = jaxpr.out_avals
    assert images.shape == (B, H, W, C) and targets.shape == (B, K)
