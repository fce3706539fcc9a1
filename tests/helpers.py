"""Shared test helpers: the golden fixtures, layout conversion, and relative-error checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sepvit_jax.core.config import SepViTConfig

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_CASES = ("two_stage_56", "three_stage_112", "rect_gray")


def load_golden(case: str) -> tuple[SepViTConfig, dict[str, np.ndarray]]:
    """The config and the arrays of one upstream golden fixture (float64)."""
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    with np.load(FIXTURES / f"{case}.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    return SepViTConfig.from_dict(meta["sepvit_kwargs"]), arrays


def golden_params(arrays: dict[str, np.ndarray], prefix: str = "param/") -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected|; an all-zero `expected` must be matched exactly."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    diff = np.abs(actual - expected).max()
    if scale == 0:
        return float("inf") if diff > 0 else 0.0
    return float(diff / scale)


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"
