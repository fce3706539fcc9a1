"""Random erasing and mixup/cutmix (sepvit_jax.data.{erasing,mixup}): boxes within their
bounds, soft targets summing to 1, cutmix boxes matching lambda, determinism, the jitted version."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from sepvit_jax.data.erasing import random_erasing
from sepvit_jax.data.mixup import cutmix_box, mix_batch, mix_batch_jax, smooth_one_hot

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
