"""The sepvit_jax checkpoint directory: its files, its metadata, and atomic writes.

The one on-disk format of the project: `convert torch2flax` writes it, `train.py` reads and
writes it, `sepvit_jax.load`/`save` and `sepvit_torch.load` read it.

    DIR/config.json   the SepViTConfig (vit-pytorch's keyword arguments), JSON
    DIR/sepvit.json   format name and version, param dtype, compute dtype hint, parameter count,
                      where the weights came from, the preprocessing record
                      (`sepvit_jax.core.preprocessing`) and the class names when known
    DIR/params/       an Orbax checkpoint of `nnx.state(model, nnx.Param)` as a pure dict
                      (NHWC layouts: conv kernels (kh, kw, in, out), dense kernels (in, out);
                      written and read by `sepvit_jax.checkpoint`)

This module is the part that needs neither JAX nor Orbax: the metadata, and directories that
appear complete or not at all (everything goes to a hidden temporary sibling that replaces DIR
only once complete, so a crash or an error never leaves a half-written checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.preprocessing import Preprocessing, imagenet

FORMAT = "sepvit_jax"
FORMAT_VERSION = 1
CONFIG_FILE, META_FILE, PARAMS_DIR = "config.json", "sepvit.json", "params"


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; it becomes `directory` on success.

    An existing `directory` is refused unless `overwrite`, and then only replaced when it is a
    sepvit_jax checkpoint or empty (never an arbitrary folder), after the new one is complete.
    On any exception the temporary directory is removed and `directory` is left as it was.
    """
    final = Path(directory).absolute()
    check_target(final, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        check_target(final, overwrite)  # it may have appeared meanwhile
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(final: Path, overwrite: bool) -> None:
    """Raise unless `final` may become a checkpoint directory (see `atomic_directory`)."""
    if not final.parent.is_dir():
        raise FileNotFoundError(f"cannot write {final}: directory {final.parent} does not exist")
    if not final.exists() and not final.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"output {final} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if not final.is_dir() or final.is_symlink():
        raise FileExistsError(f"refusing to replace {final}: it is not a directory")
    if not (final / META_FILE).is_file() and any(final.iterdir()):
        raise FileExistsError(
            f"refusing to replace {final}: it is neither empty nor a sepvit_jax checkpoint "
            f"(no {META_FILE})"
        )


def write_metadata(
    directory: Path,
    config: SepViTConfig,
    *,
    num_params: int,
    param_dtype: str,
    dtype: str | None = None,
    source: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Write config.json and sepvit.json into `directory` (a temporary one, being filled).

    Without `preprocessing`, ImageNet's defaults at the model's default size are recorded with
    origin "default".
    """
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "param_dtype": param_dtype,
        "dtype": dtype or param_dtype,
        "num_params": num_params,
        "source": dict(source or {}),
        "preprocessing": (preprocessing or imagenet(config)).to_dict(config),
        "class_names": list(class_names) if class_names is not None else None,
    }
    (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(directory: str | os.PathLike) -> tuple[SepViTConfig, dict[str, Any]]:
    """(config, sepvit.json contents) of a checkpoint directory, without touching the params."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    if not d.is_dir():
        raise CheckpointError(f"not a sepvit_jax checkpoint directory (a file): {d}")
    for name in (CONFIG_FILE, META_FILE):
        if not (d / name).is_file():
            raise CheckpointError(f"not a sepvit_jax checkpoint directory: {d} has no {name}")
    try:
        meta = json.loads((d / META_FILE).read_text())
        config = SepViTConfig.from_json(d / CONFIG_FILE)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"broken sepvit_jax checkpoint {d}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a sepvit_jax checkpoint directory: {d / META_FILE} is foreign")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{d} has checkpoint format version {meta['format_version']}; this sepvit_jax reads "
            f"up to {FORMAT_VERSION}: upgrade sepvit_jax"
        )
    return config, meta


def read_preprocessing(directory: str | os.PathLike) -> Preprocessing:
    """The preprocessing record of a checkpoint directory (older ones: the defaults)."""
    config, meta = read_metadata(directory)
    record = meta.get("preprocessing")
    if record is None:
        return imagenet(config)
    try:
        return Preprocessing.from_dict(record)
    except ValueError as err:
        raise CheckpointError(f"broken sepvit_jax checkpoint {directory}: {err}") from None
