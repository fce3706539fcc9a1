"""Reading and writing SepViT checkpoints as flat `{upstream key: numpy array}` dictionaries.

`read_state_dict` accepts what users actually hold: a `torch.save`d state_dict (zip or legacy
pickle, any suffix) or a `.safetensors` file, raw or wrapped the way training code wraps it
(`{"model": ...}`, `{"state_dict": ...}`, EMA copies, PyTorch Lightning checkpoints, DDP's
`module.` and torch.compile's `_orig_mod.` prefixes: see `sepvit_jax.core.unwrap`). Pickles are
opened weights-only, so a file that would run code is refused unless the caller explicitly opts
into `unsafe_pickle` (see `sepvit_jax.core.pickles`).

Dtypes: float16/float32/float64 (and integer) tensors keep their dtype. bfloat16 has no numpy
dtype torch converts to, so it becomes float32; that is exact (bfloat16 is float32 with the low 16
mantissa bits dropped). `read_state_dict_and_dtypes` also returns the stored dtype names.

`save_state_dict` writes a state_dict back out (torch pickle or safetensors; float32, float16 and
bfloat16 (`ml_dtypes.bfloat16` arrays) alike) atomically: the data goes to a temporary sibling
that is fsync'd and then renamed over the target, so a crash never leaves a truncated file.

Every failure a user can cause raises `CheckpointError`, whose message is one line naming the
file and what is wrong with it. A hostile file is refused, or read in time and memory bounded by
what a checkpoint of the tensors it declares needs: `pickles` (zip structure, pickle scan),
`safetensors_io` (header against the file), `unwrap` (linear in the distinct dicts).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sepvit_jax.core import pickles
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.safetensors_io import load_safetensors, write_safetensors
from sepvit_jax.core.unwrap import SEPVIT_MARKERS, unwrap_state_dict

__all__ = [
    "SEPVIT_MARKERS",
    "CheckpointError",
    "read_state_dict",
    "read_state_dict_and_dtypes",
    "save_state_dict",
    "to_numpy",
    "unwrap_state_dict",
]


# ---- reading ---------------------------------------------------------------------------------


def read_state_dict(
    path: str | os.PathLike, *, key: str | None = None, unsafe_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Read a SepViT checkpoint into `{upstream key: numpy array}`.

    Args:
      path: a torch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`, ... zip or legacy format) or a
        `.safetensors` file.
      key: which entry of a wrapper dict holds the weights (e.g. `"model_ema"`); dotted for
        nesting (`"ema.module"`). Needed when a checkpoint holds several candidates.
      unsafe_pickle: load pickles that need arbitrary code (weights_only=False). Only for
        trusted files; warns.

    Raises:
      CheckpointError: missing/unreadable/corrupt file, a pickle that would execute code, an
        ambiguous or bad `key`, or weights that are not a SepViT state_dict.
    """
    return read_state_dict_and_dtypes(path, key=key, unsafe_pickle=unsafe_pickle)[0]


def read_state_dict_and_dtypes(
    path: str | os.PathLike, *, key: str | None = None, unsafe_pickle: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """`read_state_dict`, plus each tensor's dtype name as stored (e.g. "bfloat16")."""
    p = Path(path)
    _check_file(p)
    raw = _load_safetensors(p) if _is_safetensors(p) else _load_torch(p, unsafe_pickle)
    state = unwrap_state_dict(raw, key=key, source=str(p))
    del raw  # drop wrappers (optimizer states etc.) before converting the weights
    dtypes = {name: str(v.dtype).removeprefix("torch.") for name, v in state.items()}
    return {name: to_numpy(v, name, str(p)) for name, v in state.items()}, dtypes


def _check_file(p: Path) -> None:
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {p}")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot open checkpoint {p}: {err.strerror or err}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint file is empty (0 bytes): {p}")


def _is_safetensors(p: Path) -> bool:
    # Sniff the content first (files get renamed), the suffix only breaks ties. A safetensors
    # file starts with an 8-byte little-endian header length followed by the JSON header's "{";
    # a torch zip starts with "PK\x03\x04" and a legacy torch pickle with the PROTO opcode 0x80.
    with open(p, "rb") as f:
        head = f.read(9)
    if head.startswith(pickles.ZIP_MAGIC) or head[:1] == b"\x80":
        return False
    header_len = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= header_len <= p.stat().st_size - 8:
        return True
    return p.suffix.lower() == ".safetensors"


def _import_torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading PyTorch checkpoints needs torch: pip install 'sepvit-jax[torch]'"
        ) from None
    return torch


def _corrupt(p: Path, err: BaseException) -> CheckpointError:
    detail = " ".join(str(err).split())
    if "WeightsUnpickler error:" in detail:
        # Skip torch's long advice about weights_only; only the cause is useful here.
        detail = detail.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0]
    elif "Weights only load failed" in detail:
        detail = detail.split("trusted source.", 1)[-1].split(" Check the documentation")[0]
    # The first sentence says what broke; torch's follow-up advice does not fit on one line.
    detail = detail.strip().split(". ")[0][:200] or "no detail"
    return CheckpointError(
        f"not a readable PyTorch or safetensors checkpoint: {p} "
        f"(truncated or corrupt? {type(err).__name__}: {detail})"
    )


def _load_torch(p: Path, unsafe_pickle: bool) -> Any:
    _import_torch()
    if unsafe_pickle:
        warnings.warn(
            f"loading {p} with unsafe_pickle: unpickling can execute arbitrary code; "
            "do this only for files from a trusted source",
            UserWarning,
            stacklevel=4,
        )
    try:
        return pickles.load_torch(p, unsafe_pickle=unsafe_pickle)
    except CheckpointError:
        raise  # a bound a legitimate checkpoint keeps: the message says which
    except pickles.UnsafePickle as err:
        raise CheckpointError(
            f"refusing to load {p}: this pickle would execute code when loaded (it imports or "
            f"calls {pickles.describe(err.names)}); if you trust the file, --unsafe-pickle "
            "(unsafe_pickle=True) loads it"
        ) from None
    except (ModuleNotFoundError, AttributeError) as err:
        if not unsafe_pickle:
            raise _corrupt(p, err) from None
        # A pickled module or object whose class is not importable here.
        raise CheckpointError(
            f"cannot unpickle {p}: it names code this environment lacks ({err}); install the "
            "package that defined it, or save a state_dict instead (model.state_dict())"
        ) from None
    except Exception as err:
        # torch reports damage as RuntimeError (zip), EOFError/KeyError/ValueError/
        # UnpicklingError (legacy pickle) and more; none tells the user more than "corrupt".
        raise _corrupt(p, err) from None


def _load_safetensors(p: Path) -> dict[str, Any]:
    try:
        return load_safetensors(p)
    except CheckpointError:
        raise
    except Exception as err:
        raise _corrupt(p, err) from None


# ---- conversion to numpy ---------------------------------------------------------------------


def to_numpy(value: Any, name: str = "tensor", source: str = "state_dict") -> np.ndarray:
    """A numpy array of a torch tensor (bfloat16 widened to float32, exactly) or an array."""
    if isinstance(value, np.ndarray):
        return value
    if not type(value).__module__.startswith("torch"):
        return np.asarray(value)
    torch = _import_torch()
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
        # Exact: every bfloat16 is a float32 with zero low mantissa bits. Creates the one copy.
        return t.to(torch.float32).numpy()
    try:
        array = t.numpy()
    except (TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"{source}: tensor {name!r} has dtype {t.dtype}, which cannot become a numpy array "
            f"({err})"
        ) from None
    # A tensor that is a slice of a bigger storage (or strided) would keep that whole storage
    # alive and give an odd layout: copy it. Whole, contiguous tensors stay zero-copy views of
    # the (memory-mapped) storage, so peak memory stays near one copy of the file.
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes
    return array if whole else np.ascontiguousarray(array).copy()


# ---- writing ---------------------------------------------------------------------------------


def save_state_dict(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    safetensors: bool | None = None,
) -> None:
    """Write `{key: array}` as a torch state_dict (`torch.save`) or a safetensors file.

    `safetensors=None` picks safetensors for a `.safetensors` suffix, torch otherwise. The
    torch file loads with `torch.load(weights_only=True)` and `load_state_dict(strict=True)`.
    Atomic: a temporary sibling is written, fsync'd and renamed over `path`; on any failure
    the temporary file is removed and `path` is left as it was.
    """
    p = Path(path)
    use_safetensors = p.suffix.lower() == ".safetensors" if safetensors is None else safetensors
    if not p.parent.is_dir():
        raise CheckpointError(f"cannot write {p}: directory {p.parent} does not exist")
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise CheckpointError(f"cannot write {p}: key {name!r} is not a string")
        # Contiguous, native-byte-order, writable (torch.from_numpy warns on read-only arrays);
        # only copies arrays that are not like that already.
        array = np.ascontiguousarray(np.asarray(value))
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.writeable:
            array = array.copy()
        arrays[name] = array

    fd, tmp_name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if use_safetensors:
            with os.fdopen(fd, "wb") as f:
                fd = -1  # the file object owns it now
                write_safetensors(arrays, f)
                f.flush()
                os.fsync(f.fileno())
        else:
            torch = _import_torch()
            with os.fdopen(fd, "wb") as f:
                fd = -1  # the file object owns it now
                torch.save({k: _to_torch(torch, a) for k, a in arrays.items()}, f)
                f.flush()
                os.fsync(f.fileno())
        _apply_umask(tmp)
        os.replace(tmp, p)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(p.parent)


def _to_torch(torch, array: np.ndarray):
    if array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: torch.from_numpy rejects it
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _apply_umask(path: Path) -> None:
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
