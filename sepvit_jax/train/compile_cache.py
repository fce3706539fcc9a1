"""The persistent XLA compilation cache of training runs (`--compile-cache`), on by default.

Compiling the init, train and eval programs is most of a small run's start-up; a second run of
the same programs (same model, batch, mesh, flags, JAX and XLA) reads them from disk instead.

Where: `--compile-cache DIR`; `none` turns it off; `auto` (the default) keeps a directory that
JAX was already given through `$JAX_COMPILATION_CACHE_DIR` (an explicit environment wins over our
default; the tests set one per session), else `$XDG_CACHE_HOME/sepvit_jax/xla`, else
`~/.cache/sepvit_jax/xla`. Every program is cached, however small or quick to compile (JAX's
own thresholds would skip programs compiling in under a second, e.g. the digits eval step),
unless `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` / `..._MIN_ENTRY_SIZE_BYTES` say otherwise.

Several processes sharing a directory (a sweep on one machine, parallel tests). JAX 0.10's file
cache (`jax/_src/lru_cache.py`) does *not* write atomically: `put` writes the final file name in
place (`open(..., "wb")`), so a concurrent reader can see a partial entry, and two writers of one
key can interleave. JAX survives a partial read (decompression fails: a warning, then it
compiles), but an interleaved write could leave an entry that fails on every read. With the
cache's size limit set (`jax_compilation_cache_max_size`), JAX takes a `filelock` lock around
every read and write of the directory, which rules both out; so a limit is set here, 4 GiB with
least-recently-used eviction, when the `filelock` package is installed (it comes with PyTorch,
not with JAX) and `$JAX_COMPILATION_CACHE_MAX_SIZE` does not set one. Within a multi-process run
only process 0 writes (JAX's rule, `compiler._cache_write`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

MAX_SIZE_BYTES = 4 * 2**30


def default_directory() -> Path:
    """$XDG_CACHE_HOME/sepvit_jax/xla, else ~/.cache/sepvit_jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sepvit_jax" / "xla"


def resolve(setting: str) -> Path | None:
    """The directory `--compile-cache` names (None: off)."""
    if setting.lower() == "none":
        return None
    if setting == "auto":
        from_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        return Path(from_env) if from_env else default_directory()
    return Path(setting).expanduser()


def configure(setting: str) -> Path | None:
    """Points JAX's persistent cache at `setting`'s directory (or turns it off); call before
    anything compiles. Process-wide, like the JAX configuration it sets. Returns the directory."""
    directory = resolve(setting)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    _unless_in_env("jax_persistent_cache_min_compile_time_secs", 0.0)
    _unless_in_env("jax_persistent_cache_min_entry_size_bytes", -1)
    if importlib.util.find_spec("filelock") is not None:
        _unless_in_env("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    current = jax.config.jax_compilation_cache_dir
    if current is None or Path(current).absolute() != directory.absolute():
        # A cache JAX already opened (an earlier run in this process) keeps its directory
        # until reset.
        compilation_cache.set_cache_dir(str(directory))
        compilation_cache.reset_cache()
    return directory


def _unless_in_env(name: str, value) -> None:
    if name.upper() not in os.environ:
        jax.config.update(name, value)
