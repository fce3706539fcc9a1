"""Shared helpers: the golden fixtures, layout conversion, and relative-error checks."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sepvit_jax.config import SepViTConfig

# One persistent XLA compilation cache for this test session (fresh each session, so every
# program is still compiled once): many tests and their subprocesses compile the same small
# SepViT train and eval steps, which then cost a cache read instead of seconds of compiling.
# Environment variables, so that subprocesses (train.py, the converter CLI) share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sepvit-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


@pytest.fixture
def x64():
    """float64 JAX inside one test only (the golden fixtures are float64)."""
    import jax

    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        yield
