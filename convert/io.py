"""Reading and writing SepViT checkpoints as flat `{upstream key: numpy array}` dictionaries.

`read_state_dict` accepts what users actually hold: a `torch.save`d state_dict (zip or legacy
pickle, any suffix), a `.safetensors` file, or either one wrapped the way training code wraps it
(`{"model": ...}`, `{"state_dict": ...}`, EMA copies, PyTorch Lightning checkpoints, DDP's
`module.` and `torch.compile`'s `_orig_mod.` prefixes). Pickles are opened with
`weights_only=True`, so a file that would run code is refused unless the caller explicitly opts
into `unsafe_pickle`.

Dtypes: float16/float32/float64 (and integer) tensors keep their dtype. bfloat16 has no numpy
dtype, so it becomes float32; that is exact (bfloat16 is float32 with the low 16 mantissa bits
dropped, so every bfloat16 value is representable in float32).

`save_state_dict` writes a state_dict back out (torch pickle or safetensors) atomically: the data
goes to a temporary sibling that is fsync'd and then renamed over the target, so a crash never
leaves a truncated checkpoint behind.

Every failure a user can cause raises `CheckpointError`, whose message is one line naming the
file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Containers that hold the model weights in common training scripts (timm, Lightning, DDP
# wrappers, hand-written loops). Searched recursively, so `{"model": {"state_dict": ...}}` works.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "params")
# EMA copies; also candidates, which is why a checkpoint holding both raises and asks for `key`.
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")
# Prefixes that wrappers add to every key: DDP/DataParallel, torch.compile, Lightning.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
# Keys every SepViT state_dict has (first patch embedding and classifier).
SEPVIT_MARKERS = ("layers.0.0.conv.weight", "mlp_head.2.weight")

_ZIP_MAGIC = b"PK\x03\x04"
# What torch's weights-only unpickler says when a pickle wants a global/class it does not allow
# (as opposed to a damaged byte stream). Matched against its "WeightsUnpickler error" detail.
_CODE_MARKERS = ("GLOBAL", "reduce", "Can only create new object", "Can only build", "imported")
# A nested-wrapper search deeper than this is certainly not a checkpoint layout.
_MAX_DEPTH = 4


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or written; the message says why."""


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
    p = Path(path)
    _check_file(p)
    if _is_safetensors(p):
        raw = _load_safetensors(p)
    else:
        raw = _load_torch(p, unsafe_pickle=unsafe_pickle)
    state = unwrap_state_dict(raw, key=key, source=str(p))
    del raw  # drop wrappers (optimizer states etc.) before converting the weights
    return _to_numpy_dict(state, source=str(p))


def read_state_dict_and_dtypes(
    path: str | os.PathLike, *, key: str | None = None, unsafe_pickle: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """`read_state_dict`, plus each tensor's dtype as stored (e.g. "bfloat16", before widening).

    The converter reports and round-trips the stored precision, which the numpy arrays alone
    cannot tell for bfloat16.
    """
    p = Path(path)
    _check_file(p)
    raw = (
        _load_safetensors(p) if _is_safetensors(p) else _load_torch(p, unsafe_pickle=unsafe_pickle)
    )
    state = unwrap_state_dict(raw, key=key, source=str(p))
    del raw
    dtypes = {name: str(v.dtype).removeprefix("torch.") for name, v in state.items()}
    return _to_numpy_dict(state, source=str(p)), dtypes


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


def _read_head(p: Path, n: int = 16) -> bytes:
    with open(p, "rb") as f:
        return f.read(n)


def _is_safetensors(p: Path) -> bool:
    # Sniff the content first (files get renamed), the suffix only breaks ties. A safetensors
    # file starts with an 8-byte little-endian header length followed by the JSON header's "{";
    # a torch zip starts with "PK\x03\x04" and a legacy torch pickle with the PROTO opcode 0x80.
    head = _read_head(p, 9)
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
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
    # The first sentence says what broke; torch's follow-up advice does not fit on one line.
    detail = detail.strip().split(". ")[0][:200] or "no detail"
    return CheckpointError(
        f"not a readable PyTorch or safetensors checkpoint: {p} "
        f"(truncated or corrupt? {type(err).__name__}: {detail})"
    )


def _load_torch(p: Path, *, unsafe_pickle: bool) -> Any:
    torch = _import_torch()
    # mmap keeps peak memory at about one copy of the weights, but only the zip format (the
    # default since torch 1.6) supports it; the legacy format is read into memory.
    use_mmap = _read_head(p, 4) == _ZIP_MAGIC
    # torch.load hands any *path* ending in ".safetensors" to safetensors; a torch file that was
    # named so (our sniffing says it is one) is passed as an open file, which rules out mmap.
    if p.suffix.lower() == ".safetensors":
        with open(p, "rb") as f:
            return _torch_load(torch, p, f, mmap=False, unsafe_pickle=unsafe_pickle)
    return _torch_load(torch, p, p, mmap=use_mmap, unsafe_pickle=unsafe_pickle)


def _torch_load(torch, p: Path, f: Any, *, mmap: bool, unsafe_pickle: bool) -> Any:
    if unsafe_pickle:
        warnings.warn(
            f"loading {p} with unsafe_pickle: unpickling can execute arbitrary code; "
            "do this only for files from a trusted source",
            UserWarning,
            stacklevel=4,
        )
        try:
            return torch.load(f, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err:
            raise _corrupt(p, err) from None
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        message = " ".join(str(err).split())
        found = re.search(r"WeightsUnpickler error: (.+?)(?:\. |$)", message)
        detail = found.group(1) if found else ""
        if "Weights only load failed" in message and any(m in detail for m in _CODE_MARKERS):
            # The weights-only unpickler stopped at a global to import or call, or a class to
            # build: loading this file for real means running code named by the file.
            raise CheckpointError(
                f"refusing to load {p}: this pickle would execute code when loaded "
                f"({detail[:200]}); if you trust the file, --unsafe-pickle "
                "(unsafe_pickle=True) loads it"
            ) from None
        # Anything else the unpickler trips on (unknown opcodes, bad lengths) is damage.
        raise _corrupt(p, err) from None
    except Exception as err:
        # torch reports damage as RuntimeError (zip), EOFError/KeyError/ValueError (legacy
        # pickle) and more; none of them tells the user more than "corrupt".
        raise _corrupt(p, err) from None


def _load_safetensors(p: Path) -> dict[str, Any]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            "reading .safetensors files needs safetensors: pip install 'sepvit-jax[torch]'"
        ) from None
    try:
        import torch  # noqa: F401  (the "pt" framework reads bfloat16; numpy cannot)

        framework = "pt"
    except ImportError:
        framework = "numpy"
    try:
        out = {}
        with safe_open(str(p), framework=framework) as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                out[name] = f.get_tensor(name)
        return out
    except Exception as err:
        raise _corrupt(p, err) from None


# ---- unwrapping ------------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    torch = _torch_if_loaded()
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_if_loaded():
    # A value can only be a torch tensor (or module) if torch was imported already; avoid
    # importing it just to check.
    import sys

    return sys.modules.get("torch")


def _is_module(value: Any) -> bool:
    torch = _torch_if_loaded()
    return torch is not None and isinstance(value, torch.nn.Module)


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and all(_is_tensor(v) for v in value.values())
    )


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Strip `module.`/`_orig_mod.`/`model.` in any order and repetition, while EVERY key has it."""
    keys = list(state)
    offset = 0
    changed = True
    while changed and keys:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix, offset) for k in keys):
                offset += len(prefix)
                changed = True
    return {k[offset:]: v for k, v in state.items()}


def _looks_like_sepvit(state: Mapping[str, Any]) -> bool:
    stripped = _strip_prefixes(state)
    return all(m in stripped for m in SEPVIT_MARKERS)


def _describe_keys(obj: Mapping, limit: int = 12) -> str:
    names = [repr(k) for k in list(obj)[:limit]]
    more = f", ... ({len(obj)} in all)" if len(obj) > limit else ""
    return ", ".join(names) + more if names else "(none)"


def _find_candidates(obj: Any, names: tuple[str, ...] | None, path: str, depth: int) -> list:
    """Dotted paths of state_dicts reachable from `obj` through the entries `names`.

    `names=None` follows every entry (the fallback when no known wrapper name matches).
    """
    found: list[tuple[str, Any]] = []
    if depth > _MAX_DEPTH or not isinstance(obj, Mapping):
        return found
    for k, v in obj.items():
        if not isinstance(k, str) or (names is not None and k not in names):
            continue
        sub = f"{path}.{k}" if path else k
        if _is_module(v):
            v = v.state_dict()
        if _is_state_dict(v):
            found.append((sub, v))
        else:
            found.extend(_find_candidates(v, names, sub, depth + 1))
    return found


def _select_key(obj: Any, key: str, source: str) -> Any:
    """Follow a dotted `key`; an entry whose own name contains dots also matches."""
    parts = key.split(".")
    current = obj
    walked: list[str] = []
    i = 0
    while i < len(parts):
        if _is_module(current):
            current = current.state_dict()
        if not isinstance(current, Mapping):
            where = f"entry {'.'.join(walked)!r}" if walked else "the checkpoint"
            raise CheckpointError(
                f"{source}: cannot select key {key!r}: {where} is a "
                f"{type(current).__name__}, not a dict"
            )
        # Longest match first, so a literal key "ema.module" wins over nested ema -> module.
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in current:
                current = current[name]
                walked.append(name)
                i = j
                break
        else:
            where = f" under {'.'.join(walked)!r}" if walked else ""
            raise CheckpointError(
                f"{source}: no entry {'.'.join(parts[i:])!r}{where} (from --key {key!r}); "
                f"available keys: {_describe_keys(current)}"
            )
    return current


def unwrap_state_dict(
    obj: Any, *, key: str | None = None, source: str = "checkpoint"
) -> dict[str, Any]:
    """Find the SepViT state_dict inside a loaded checkpoint object and strip wrapper prefixes.

    Values are returned unconverted (torch tensors or numpy arrays). `obj` may be a state_dict,
    a wrapper dict (see WRAPPER_KEYS / EMA_KEYS, nested, Lightning), or an `nn.Module`. `key`
    selects an entry explicitly (dotted for nesting). `source` names the checkpoint in errors.

    Raises:
      CheckpointError: no state_dict found, several found and no `key`, a bad `key`, or a
        state_dict that lacks the SepViT marker keys.
    """
    if key:
        obj = _select_key(obj, key, source)
    if _is_module(obj):
        obj = obj.state_dict()
    if _is_state_dict(obj):
        state = obj
    elif isinstance(obj, Mapping):
        candidates = _find_candidates(obj, WRAPPER_KEYS + EMA_KEYS, "", 0)
        if not candidates:
            # Unknown wrapper names: look everywhere, but an optimizer's per-parameter state is
            # also "a dict of tensors", so prefer what looks like SepViT.
            candidates = _find_candidates(obj, None, "", 0)
            sepvit = [c for c in candidates if _looks_like_sepvit(c[1])]
            candidates = sepvit or candidates
        if not candidates:
            raise CheckpointError(
                f"{source}: found no state_dict (a dict of tensors) in the checkpoint; "
                f"its top-level keys are {_describe_keys(obj)}"
            )
        # The same dict reachable under two names (e.g. aliases) is not a real choice.
        candidates = list({id(c[1]): c for c in candidates}.values())
        if len(candidates) > 1:
            names = ", ".join(repr(c[0]) for c in candidates)
            raise CheckpointError(
                f"{source}: the checkpoint holds several state_dicts ({names}); "
                "pick one with --key (key=...), e.g. --key " + candidates[0][0]
            )
        state = candidates[0][1]
    else:
        raise CheckpointError(
            f"{source}: expected a state_dict or a dict wrapping one, got {type(obj).__name__}"
        )
    state = _strip_prefixes(state)
    missing = [m for m in SEPVIT_MARKERS if m not in state]
    if missing:
        raise CheckpointError(
            f"{source}: does not look like a SepViT state_dict: no {missing[0]!r} "
            f"({len(state)} keys, e.g. {_describe_keys(state, limit=6)})"
        )
    return state


# ---- conversion to numpy ---------------------------------------------------------------------


def _to_numpy(value: Any, name: str, source: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
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


def _to_numpy_dict(state: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    return {name: _to_numpy(v, name, source) for name, v in state.items()}


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
            os.close(fd)
            fd = -1
            _write_safetensors(arrays, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            torch = _import_torch()
            with os.fdopen(fd, "wb") as f:
                fd = -1  # the file object owns it now
                torch.save({k: torch.from_numpy(a) for k, a in arrays.items()}, f)
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


def _write_safetensors(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise CheckpointError(
            "writing .safetensors files needs safetensors: pip install safetensors"
        ) from None
    save_file(dict(arrays), str(path))


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
