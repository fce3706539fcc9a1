"""pytest set-up: one XLA compilation cache per session, and the float64 fixture."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

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


@pytest.fixture
def x64():
    """float64 JAX inside one test only (the golden fixtures are float64)."""
    import jax

    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        yield
