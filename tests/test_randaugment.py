"""RandAugment (sepvit_jax.data.randaugment): parsing timm's strings, each op on known images,
magnitude noise and increasing severity, the random policy."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from PIL import Image

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
