"""Opening torch pickles without running code from them.

`load_torch` reads a `torch.save`d file (zip or legacy format, any suffix) with torch's
weights-only unpickler, memory-mapped where the format allows. When that unpickler stops, the
file is either damaged or wants to import or call something outside torch's allowlist; which of
the two is decided here by reading the pickle opcodes (`pickletools.genops` only parses, it never
imports or calls), not by matching torch's error text, which changes between releases. A file
that would run code is refused with the globals it names; `unsafe_pickle=True` loads it for real
(with a warning), which is the only way to read a whole pickled `nn.Module`.

A few plain-data classes that training scripts commonly put next to the weights are accepted
as weights-only too: `argparse.Namespace` (timm and many scripts save their arguments), numpy
scalars, arrays and dtypes (metrics, statistics). Building them runs no code from the file.
"""

from __future__ import annotations

import argparse
import contextlib
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
# Opcodes that instantiate or call something named by the pickle beyond GLOBAL/STACK_GLOBAL.
_CODE_OPS = {"OBJ", "EXT1", "EXT2", "EXT4"}
# A legacy torch file is five pickles (magic, protocol, sys info, the object, storage keys) and
# then raw bytes, which must not be parsed as opcodes.
_MAX_PICKLES = 5
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_MAX_LISTED = 3


class UnsafePickle(Exception):
    """The pickle would import or call `names` when loaded for real."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


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
      UnsafePickle: weights-only loading failed because the file names code (listed).
      Exception: whatever torch raised for a damaged file (the caller words it).
    """
    import torch

    # mmap keeps peak memory at about one copy of the weights; only the zip format (torch's
    # default since 1.6) supports it. torch.load hands any *path* ending in ".safetensors" to
    # safetensors, so a torch file named so is passed as an open file (no mmap then).
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
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
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:
            # torch words this differently across releases (and formats): read the opcodes.
            names = code_globals(path, is_zip)
            if names:
                raise UnsafePickle(names) from None
            raise


def code_globals(path: Path, is_zip: bool) -> list[str]:
    """What the pickles of a torch file would import or call outside the weights-only allowlist.

    Empty when nothing does: a file that fails to load all the same is merely damaged.
    """
    found: list[str] = []
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith("data.pkl"):
                        with archive.open(member) as f:
                            found += _referenced(f, archive.getinfo(member).file_size)
        else:
            with open(path, "rb") as f:
                found += _referenced(f, path.stat().st_size)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        pass
    allowed = _allowed_names()
    return list(dict.fromkeys(n for n in found if n not in allowed))


def _allowed_names() -> set[str]:
    try:
        from torch import _weights_only_unpickler as wou

        names = set(wou._get_allowed_globals())
    except (ImportError, AttributeError):  # private API: assume only torch's own names
        names = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}
    for item in _extra_safe_globals():
        obj, name = item if isinstance(item, tuple) else (item, None)
        names.add(name or f"{obj.__module__}.{obj.__name__}")
    return names


def _referenced(f: IO[bytes], size: int) -> list[str]:
    """Globals imported and code opcodes used by the successive complete pickles in `f`.

    A legacy torch file is several pickles followed by raw storage bytes: parse pickles until
    the bytes stop parsing. Only complete pickles (up to their STOP) count: bytes that merely
    happen to decode as opcodes (a damaged file, random data) name nothing.
    """
    names: list[str] = []
    for _ in range(_MAX_PICKLES):
        if f.tell() >= size:
            break
        try:
            names += _scan_one(f)
        except (ValueError, EOFError, KeyError, IndexError, UnicodeDecodeError):
            break  # the raw storage bytes after the pickles, or damage
    return names


def _scan_one(f: IO[bytes]) -> list[str]:
    """The names one pickle imports; strings are tracked (memo included) for STACK_GLOBAL."""
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    memo_count = 0
    last_was_string = False
    for op, arg, _ in pickletools.genops(f):  # raises ValueError before an incomplete STOP
        name = op.name
        if name == "MEMOIZE":
            if last_was_string:
                memo[memo_count] = strings[-1]
            memo_count += 1
            continue
        if name in {"PUT", "BINPUT", "LONG_BINPUT"}:
            if last_was_string:
                memo[arg] = strings[-1]
            continue
        last_was_string = name in _STRING_OPS or (
            name in {"GET", "BINGET", "LONG_BINGET"} and arg in memo
        )
        if name in _STRING_OPS:
            strings.append(arg if isinstance(arg, str) else repr(arg))
        elif last_was_string:
            strings.append(memo[arg])
        elif name in {"GLOBAL", "INST"}:
            names.append(arg.replace(" ", "."))
        elif name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
        if name in _CODE_OPS:
            names.append(f"the {name} opcode")
    return names


def describe(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
