"""Finding the SepViT state_dict inside whatever a training script saved around it.

Handled: a bare state_dict; wrapper dicts (`state_dict`, `model`, `model_state_dict`, ...,
nested, with optimizer states, epochs, arguments beside them); EMA copies (`model_ema`,
`state_dict_ema`, ...); PyTorch Lightning checkpoints, whose `state_dict` keys carry the
LightningModule's attribute name (`model.`, `net.`, ...); DDP's `module.` and torch.compile's
`_orig_mod.` prefixes, in any combination; whole `nn.Module`s (from `unsafe_pickle` loads).

The SepViT weights are recognised by their marker keys (SEPVIT_MARKERS) under some key prefix,
so any prefix is stripped, and a state_dict holding two models (a Lightning module with an EMA
copy: `model.` and `model_ema.`) offers both. More than one candidate is an error that lists
them; `key` picks one, a dotted path through wrapper entries and then key prefixes
(`state_dict.model_ema`). Keys outside the chosen prefix (a loss module's buffers, say) are
dropped with a warning.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from sepvit_jax.core.errors import CheckpointError

# Entries that hold the model weights in common training scripts (timm, Lightning, DDP
# wrappers, hand-written loops), searched recursively: `{"model": {"state_dict": ...}}` works.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "params")
# EMA copies: candidates too, which is why a checkpoint with both asks for `key`.
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")
# Keys every SepViT state_dict has (the first patch embedding and the classifier).
SEPVIT_MARKERS = ("layers.0.0.conv.weight", "mlp_head.2.weight")
# A nested-wrapper search deeper than this is certainly not a checkpoint layout.
_MAX_DEPTH = 4


def _torch_if_loaded():
    # A value can only be a torch tensor (or module) if torch was imported already.
    return sys.modules.get("torch")


def _is_tensor(value: Any) -> bool:
    torch = _torch_if_loaded()
    return isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))


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


def describe_keys(obj: Mapping, limit: int = 12) -> str:
    names = [repr(k) for k in list(obj)[:limit]]
    more = f", ... ({len(obj)} in all)" if len(obj) > limit else ""
    return ", ".join(names) + more if names else "(none)"


def sepvit_prefixes(state: Mapping[str, Any]) -> list[str]:
    """Each prefix P (`""`, `"module."`, `"model._orig_mod."`...) with P + every marker present."""
    first, *others = SEPVIT_MARKERS
    found = []
    for key in state:
        if isinstance(key, str) and key.endswith(first):
            prefix = key[: len(key) - len(first)]
            if (not prefix or prefix.endswith(".")) and all(prefix + m in state for m in others):
                found.append(prefix)
    return found


def _find_state_dicts(
    obj: Any, names: tuple[str, ...] | None, path: str, depth: int, seen: dict | None = None
) -> list:
    """(dotted path, state_dict) of every dict of tensors reachable through entries `names`.

    `names=None` follows every entry (the fallback when no known wrapper name matches). A dict
    met again (a pickle can share one dict under every entry of every level) is looked at again
    only from a shallower depth, so the walk stays linear in the checkpoint's distinct dicts.
    """
    found: list[tuple[str, Any]] = []
    seen = {id(obj): (depth, obj)} if seen is None else seen  # (the object pins its id)
    if depth > _MAX_DEPTH or not isinstance(obj, Mapping):
        return found
    for k, v in obj.items():
        if not isinstance(k, str) or (names is not None and k not in names):
            continue
        sub = f"{path}.{k}" if path else k
        if _is_module(v):
            v = v.state_dict()
        if not isinstance(v, Mapping) or seen.get(id(v), (_MAX_DEPTH + 2,))[0] <= depth + 1:
            continue
        seen[id(v)] = (depth + 1, v)
        if _is_state_dict(v):
            found.append((sub, v))
        else:
            found.extend(_find_state_dicts(v, names, sub, depth + 1, seen))
    return found


def _sepvit_candidates(state_dicts: list) -> list[tuple[str, Mapping, str]]:
    """(name for --key, state_dict, prefix) of each SepViT inside the given state_dicts."""
    out, seen = [], set()
    for path, state in state_dicts:
        prefixes = sepvit_prefixes(state)
        for prefix in prefixes:
            if (id(state), prefix) in seen:  # the same dict reachable under two names
                continue
            seen.add((id(state), prefix))
            # One model in the dict: its entry name is enough (the prefix is stripped anyway).
            name = path if len(prefixes) == 1 and path else _join(path, prefix.rstrip("."))
            out.append((name or "(top level)", state, prefix))
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _select_key(obj: Any, key: str, source: str) -> Any:
    """Follow a dotted `key` through entries, then, in a state_dict, as a key prefix.

    An entry whose own name contains dots matches too (longest match first).
    """
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
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in current:
                current = current[name]
                walked.append(name)
                i = j
                break
        else:
            prefix = ".".join(parts[i:]) + "."
            if _is_state_dict(current) and any(k.startswith(prefix) for k in current):
                return {k[len(prefix) :]: v for k, v in current.items() if k.startswith(prefix)}
            where = f" under {'.'.join(walked)!r}" if walked else ""
            raise CheckpointError(
                f"{source}: no entry {'.'.join(parts[i:])!r}{where} (from --key {key!r}); "
                f"available keys: {describe_keys(current)}"
            )
    return current


def _not_sepvit(source: str, state: Mapping) -> CheckpointError:
    first, head = SEPVIT_MARKERS
    missing = head if any(k.endswith(first) for k in state) else first
    return CheckpointError(
        f"{source}: does not look like a SepViT state_dict: no {missing!r} "
        f"({len(state)} keys, e.g. {describe_keys(state, limit=6)})"
    )


def unwrap_state_dict(
    obj: Any, *, key: str | None = None, source: str = "checkpoint"
) -> dict[str, Any]:
    """The SepViT state_dict inside a loaded checkpoint object, its key prefix stripped.

    Values are returned unconverted (torch tensors or numpy arrays). `obj` may be a state_dict,
    a wrapper dict (nested, Lightning, EMA, see the module docstring) or an `nn.Module`. `key`
    selects an entry explicitly. `source` names the checkpoint in errors.

    Raises:
      CheckpointError: no state_dict found, several SepViTs and no `key`, a bad `key`, or no SepViT.
    """
    if key:
        obj = _select_key(obj, key, source)
    if _is_module(obj):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state_dict or a dict wrapping one, got {type(obj).__name__}"
        )
    if _is_state_dict(obj):
        state_dicts = [("", obj)]
    else:
        state_dicts = _find_state_dicts(obj, WRAPPER_KEYS + EMA_KEYS, "", 0)
    candidates = _sepvit_candidates(state_dicts)
    if not candidates and not _is_state_dict(obj):
        # Unknown wrapper names: look everywhere (an optimizer's state is a dict of tensors too,
        # so only SepViT-looking ones count).
        everywhere = _find_state_dicts(obj, None, "", 0)
        candidates = _sepvit_candidates(everywhere)
        state_dicts = state_dicts or everywhere
    if not candidates:
        if not state_dicts:
            raise CheckpointError(
                f"{source}: found no state_dict (a dict of tensors) in the checkpoint; "
                f"its top-level keys are {describe_keys(obj)}"
            )
        raise _not_sepvit(source, state_dicts[0][1])
    if len(candidates) > 1:
        names = ", ".join(repr(c[0]) for c in candidates)
        raise CheckpointError(
            f"{source}: the checkpoint holds several SepViT state_dicts ({names}); "
            f"pick one with --key (key=...), e.g. --key {candidates[0][0]}"
        )
    _, state, prefix = candidates[0]
    outside = [k for k in state if not k.startswith(prefix)]
    if outside:
        warnings.warn(
            f"{source}: using the keys under {prefix!r}; ignoring {len(outside)} others "
            f"({describe_keys({k: None for k in outside}, limit=4)})",
            UserWarning,
            stacklevel=2,
        )
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
