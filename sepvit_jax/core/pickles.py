"""Opening torch pickles without running code from them, in bounded time and memory.

`load_torch` reads a `torch.save`d file (zip or legacy format, any suffix) with torch's
weights-only unpickler, memory-mapped where the format allows, after two checks that make the
work torch does proportional to what a legitimate checkpoint of the declared tensors needs:

1. a zip file's structure (`sepvit_jax.core.zipcheck`), from its central directory alone: entry
   count, compression ratios, overlaps, and the pickle's inflated size against the storages;
2. the pickle itself (`sepvit_jax.core.pickscan`), walked without importing or calling anything:
   the first global outside torch's weights-only allowlist stops it and is named (the file is
   refused with that name, torch never sees it); byte, storage, tensor-view and key bounds.
   A legacy (non-zip) file is the same five pickles torch reads, within a byte budget that grows
   with the tensors they declare, so junk before the first global cannot make the scan long.

`unsafe_pickle=True` skips the scan and loads for real (with a warning; the zip checks still
apply), which is the only way to read a whole pickled `nn.Module`.

A few plain-data classes that training scripts commonly put next to the weights are accepted
as weights-only too: `argparse.Namespace` (timm and many scripts save their arguments), numpy
scalars, arrays and dtypes (metrics, statistics). Building them runs no code from the file.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sepvit_jax.core import zipcheck
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.pickscan import PICKLE_PER_STORAGE, PICKLE_SLACK, Scan, UnsafeGlobal
from sepvit_jax.core.unpickler import BoundedReader

ZIP_MAGIC = b"PK\x03\x04"
UnsafePickle = UnsafeGlobal  # the pickle would import or call `.names` when loaded for real
# A legacy torch file: magic number, protocol version, system info, the object, storage keys;
# then raw storage bytes, which are not pickles.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_LISTED = 3
# Modules torch refuses even when allowlisted.
_BLOCKED = {"sys", "os", "posix", "nt"}


def _extra_safe_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core
    multiarray = core.multiarray
    extra: list = [argparse.Namespace, np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        function = getattr(multiarray, name)
        extra.append(function)
        # Files written under numpy 1.x name them numpy.core.multiarray.*.
        extra.append((function, f"numpy.core.multiarray.{name}"))
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    if dtypes is not None:
        extra.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
    return extra


def load_torch(path: Path, *, unsafe_pickle: bool) -> Any:
    """`torch.load` of `path` on the CPU, weights-only unless `unsafe_pickle`.

    Raises:
      UnsafePickle: the file names code (listed: the first name outside the allowlist last).
      CheckpointError: the file exceeds a bound a legitimate checkpoint keeps (the message says
        which).
      Exception: whatever torch or the checks raised for a damaged file (the caller words it).
    """
    import torch

    # mmap keeps peak memory at about one copy of the weights; only the zip format (torch's
    # default since 1.6) supports it. torch.load hands any *path* ending in ".safetensors" to
    # safetensors, so a torch file named so is passed as an open file (no mmap then).
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    layout = zipcheck.check_torch_zip(path) if is_zip else None
    if not unsafe_pickle:
        allowed = _allowlist(torch)
        try:
            if layout is not None:
                _scan_zip(path, layout, allowed)
            else:
                _scan_legacy(path, allowed)
        except (CheckpointError, UnsafeGlobal, pickle.UnpicklingError):
            raise
        except Exception as err:  # damage: torch would stop there too
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise pickle.UnpicklingError(f"its pickle does not parse ({detail})") from None
    by_name = path.suffix.lower() != ".safetensors"
    with contextlib.ExitStack() as stack:
        source: Any = path if by_name else stack.enter_context(open(path, "rb"))
        mmap = is_zip and by_name
        if unsafe_pickle:
            return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap)
        stack.enter_context(warnings.catch_warnings())
        # torch warns about pickle protocols other than 2 before it fails or succeeds anyway.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        if safe_globals is not None:
            stack.enter_context(safe_globals(_extra_safe_globals()))
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)


def _scan_zip(path: Path, layout: zipcheck.TorchZip, allowed) -> None:
    """Scan the pickle torch will unpickle; its inflated size is bounded already."""
    if layout.pickle is None:
        return  # torch fails on its own, reading nothing big
    with zipfile.ZipFile(path) as archive:
        data = archive.read(layout.pickle)
    scan = Scan(str(path), allowed, len(data), records=layout.records)
    scan.load(io.BytesIO(data))


def _scan_legacy(path: Path, allowed) -> None:
    """Scan the pickles of a legacy file as torch reads them, stopping where torch would."""
    size = path.stat().st_size
    scan = Scan(str(path), allowed, PICKLE_SLACK, per_id=PICKLE_PER_STORAGE, file_size=size)
    with open(path, "rb") as f:
        reader = BoundedReader(f, scan, "stream")
        for expected in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, None, None, None):
            value = scan.load(reader)
            if expected is not None and not (type(value) is int and value == expected):
                return  # torch stops here too: not a legacy torch file
            if reader.used >= size:
                return


def _allowlist(torch):
    """`allowed(module, name) -> (full name, allowed?)`, as torch's weights-only unpickler judges
    a GLOBAL (its name mappings for protocol-2 files, its allowlist, our extra safe globals)."""
    utils = torch._utils
    import_mapping = getattr(utils, "IMPORT_MAPPING", _compat_pickle.IMPORT_MAPPING)
    name_mapping = getattr(utils, "NAME_MAPPING", _compat_pickle.NAME_MAPPING)
    try:  # imported by torch.serialization
        wou = torch._weights_only_unpickler
        names = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
        exact = True
    except AttributeError:  # private API: let torch judge its own names
        names, exact = {"collections.OrderedDict", "builtins.set"}, False
    for item in _extra_safe_globals():
        obj, name = item if isinstance(item, tuple) else (item, None)
        names.add(name or f"{obj.__module__}.{obj.__qualname__}")

    def allowed(module: str, name: str) -> tuple[str, bool]:
        if (module, name) in name_mapping:
            module, name = name_mapping[(module, name)]
        elif module in import_mapping:
            module = import_mapping[module]
        full = f"{module}.{name}"
        ok = full in names or (not exact and module.split(".")[0] == "torch")
        return full, ok and module not in _BLOCKED

    return allowed


def describe(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
