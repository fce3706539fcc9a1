"""The SepViTConfig of a state_dict: hyper-parameters read off the weights, the rest from flags.

Everything but `window_size` and `dropout` is in the weights (SPEC, "What the weights tell"):
channels and dim from the first patch embedding, the stages and their depths from the key names,
dim_head from the window-token LayerNorm, heads from each stage's first `to_qkv`, ff_mult from
each stage's first feed-forward conv, num_classes from the classifier. `infer_config` only reads
these; `resolve_config` adds what flags or a config file give (a value the weights contradict is
an error naming both) and then checks every tensor against the weight table in one pass
(`table.check_state_dict`), so what it returns is a config the state_dict fits exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sepvit_jax.core.config import SepViTConfig, format_value
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.layouts import CURRENT, Layout, detect
from sepvit_jax.core.table import check_state_dict

# Upstream vit-pytorch hard-codes window size 7 in every block (it never forwards the argument).
DEFAULT_WINDOW_SIZE = 7
# Config fields the weights cannot tell, and their defaults.
NOT_IN_WEIGHTS = {"window_size": DEFAULT_WINDOW_SIZE, "dropout": 0.0}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SepViTConfig))
# Parameter dtypes a converted checkpoint may be stored in.
PARAM_DTYPES = ("float32", "bfloat16", "float16")

_STAGE = re.compile(r"^layers\.(\d+)\.")


def _shape(state: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"SepViT state_dict is missing {key!r}")
    shape = tuple(int(n) for n in state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"SepViT weight {key!r} has shape {shape}; expected {ndim} dims")
    return shape


def _count(state: Mapping[str, Any], pattern: re.Pattern, what: str) -> int:
    """Count the 0..n-1 indices captured by `pattern`; gaps mean a broken state_dict."""
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    missing = sorted(set(range(max(found, default=-1) + 1)) - found)
    if missing:
        raise CheckpointError(
            f"SepViT state_dict has {what} {sorted(found)} but not {missing}; keys are missing"
        )
    return len(found)


def _ff_mult(dims: Sequence[int], inner: Sequence[int], keys: Sequence[str]) -> int | float:
    """A single ff_mult with int(d * ff_mult) == inner for every stage, preferring short values.

    The ratio inner/d need not be the same in every stage when ff_mult is not integral
    (int() truncates), so solve for the interval of ff_mult values that fits all stages.
    """
    low = max(i / d for i, d in zip(inner, dims, strict=True))
    high = min((i + 1) / d for i, d in zip(inner, dims, strict=True))

    def fits(f: float) -> bool:
        return all(int(d * f) == i for d, i in zip(dims, inner, strict=True))

    if low < high:
        # The shortest decimal in the interval (4 rather than 4.0001, 1.3 rather than
        # 1.28125), else the interval's exact lower end.
        for digits in range(7):
            f = round(low, digits)
            if f < low:
                f = round(f + 10.0**-digits, digits)
            if fits(f):
                return int(f) if f == int(f) else f
        for f in (low, math.nextafter(low, math.inf)):
            if fits(f):
                return f
    first = inner[0] / dims[0]
    key, d, i = next(
        ((k, d, i) for k, d, i in zip(keys, dims, inner, strict=True) if int(d * first) != i),
        (keys[-1], dims[-1], inner[-1]),
    )
    raise CheckpointError(
        f"inconsistent SepViT weights: {key!r} has {i} rows for width {d}, but {keys[0]!r} has "
        f"{inner[0]} rows for width {dims[0]} (ff_mult {first:g}); ff_mult must be the same in "
        "every block"
    )


def infer_config(
    state_dict: Mapping[str, Any],
    *,
    window_size: int | Sequence[int] | None = None,
    dropout: float = 0.0,
    layout: Layout = CURRENT,
) -> SepViTConfig:
    """Read the SepViT hyper-parameters off a state_dict's shapes (keys named as in `layout`).

    Only the tensors that tell a hyper-parameter are read; `table.check_state_dict` checks the
    rest. `window_size` (None: upstream's 7) and `dropout` are not in the weights.

    Raises:
      CheckpointError: a tensor that tells a hyper-parameter is missing or cannot tell it.
    """
    dim, channels, _, _ = _shape(state_dict, "layers.0.0.conv.weight", 4)
    num_stages = _count(state_dict, _STAGE, "stages")
    depth = []
    for i in range(num_stages):
        blocks = re.compile(rf"^layers\.{i}\.2\.layers\.(\d+)\.")
        depth.append(_count(state_dict, blocks, f"layers.{i} blocks"))
        if depth[-1] == 0:
            raise CheckpointError(f"SepViT state_dict has no blocks 'layers.{i}.2.layers.*'")
    dim_head_key = layout.key("layers.0.2.layers.0.0.window_tokens_to_qk.0.weight")
    (dim_head,) = _shape(state_dict, dim_head_key, 1)
    heads, ff_inner, ff_keys = [], [], []
    for i in range(num_stages):
        qkv_key = layout.key(f"layers.{i}.2.layers.0.0.to_qkv.weight")
        rows = _shape(state_dict, qkv_key, 3)[0]
        if rows == 0 or rows % (3 * dim_head):
            raise CheckpointError(
                f"inconsistent SepViT weights: {qkv_key!r} has {rows} rows, not a multiple of "
                f"3 * dim_head = {3 * dim_head} ({dim_head_key!r} gives dim_head {dim_head})"
            )
        heads.append(rows // (3 * dim_head))
        ff_keys.append(layout.key(f"layers.{i}.2.layers.0.1.net.1.weight"))
        ff_inner.append(_shape(state_dict, ff_keys[-1], 4)[0])
    num_classes = _shape(state_dict, "mlp_head.2.weight", 2)[0]
    dims = [dim * 2**i for i in range(num_stages)]
    if window_size is not None and not isinstance(window_size, int):
        window_size = tuple(window_size)
        if len(window_size) != num_stages:
            raise CheckpointError(
                f"window_size {window_size} has {len(window_size)} entries but the weights have "
                f"{num_stages} stages; give one per stage or a single int"
            )
    try:
        return SepViTConfig(
            num_classes=num_classes,
            dim=dim,
            depth=tuple(depth),
            heads=_collapse(heads),
            window_size=_collapse(window_size or DEFAULT_WINDOW_SIZE),
            dim_head=dim_head,
            ff_mult=_ff_mult(dims, ff_inner, ff_keys),
            channels=channels,
            dropout=dropout,
        )
    except ValueError as err:
        raise CheckpointError(f"cannot build a SepViT config from these weights: {err}") from None


def _collapse(values: int | Sequence[int]) -> int | tuple[int, ...]:
    if isinstance(values, int):
        return values
    return values[0] if len(set(values)) == 1 else tuple(values)


# ---- flags and config files over the weights -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The config a conversion uses, its parameter dtype, where every value came from, and the
    layout the state_dict is in."""

    config: SepViTConfig
    dtype: str
    sources: dict[str, str]  # field -> "weights" | "flag" | "argument" | "config" | "default"
    layout: Layout = CURRENT


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A --config JSON: SepViT fields (any subset) and optionally "dtype"."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"config file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"config file {p} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config file {p} must hold a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - {*CONFIG_FIELDS, "dtype"})
    if unknown:
        raise CheckpointError(
            f"config file {p} has unknown keys {unknown}; expected some of "
            f"{[*CONFIG_FIELDS, 'dtype']}"
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _pick(name: str, flags: Mapping, config: Mapping, default: Any, origin: str) -> tuple:
    """flag > config > default, with the source (`origin` for a flag)."""
    if flags.get(name) is not None:
        return flags[name], origin
    if config.get(name) is not None:
        return config[name], "config"
    return default, "default"


def _agrees(field: str, given: Any, cfg: SepViTConfig) -> bool:
    if field == "depth":
        return isinstance(given, Sequence) and tuple(given) == cfg.depth
    if field == "heads":
        per_stage = tuple(given) if isinstance(given, Sequence) else (given,) * cfg.num_stages
        return per_stage == cfg.stage_heads
    if field == "ff_mult":
        # Only int(width * ff_mult) is in the weights: 4 and 4.0 (and 4.01 on small widths) agree.
        if isinstance(given, bool) or not isinstance(given, int | float):
            return False
        return all(int(d * given) == cfg.ff_inner_dim(i) for i, d in enumerate(cfg.stage_dims))
    return given == getattr(cfg, field)


def resolve_config(
    state_dict: Mapping[str, Any],
    *,
    flags: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    config_origin: str = "--config",
    flags_origin: str = "flag",
    source: str = "state_dict",
) -> Resolved:
    """The SepViTConfig a state_dict fits: shapes from the weights, the rest flag > config >
    default.

    `flags` and `config` may name any config field (and "dtype"); a value the weights contradict
    is an error naming both values. `flags_origin` names the flags in messages and sources
    ("flag" for the CLI, "argument" for the Python API); `source` names the state_dict.

    Raises:
      CheckpointError: contradictions, or tensors that do not fit (all of them, listed).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config = dict(config or {})
    unknown = sorted(set(flags) - {*CONFIG_FIELDS, "dtype"})
    if unknown:
        raise CheckpointError(f"unknown SepViT config fields {unknown}")
    window, window_src = _pick("window_size", flags, config, None, flags_origin)
    dropout, dropout_src = _pick("dropout", flags, config, NOT_IN_WEIGHTS["dropout"], flags_origin)
    dtype, dtype_src = _pick("dtype", flags, config, "float32", flags_origin)
    if dtype not in PARAM_DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(PARAM_DTYPES)}, got {dtype!r}")
    layout = detect(state_dict)
    try:
        cfg = infer_config(state_dict, window_size=window, dropout=dropout, layout=layout)
    except CheckpointError as err:
        raise CheckpointError(f"{source} ({layout.label}): {err}") from None
    sources = dict.fromkeys(CONFIG_FIELDS, "weights")
    sources.update(window_size=window_src, dropout=dropout_src, dtype=dtype_src)

    contradictions, adopt = [], {}
    for origin, given_values in ((flags_origin, flags), (config_origin, config)):
        for field, given in given_values.items():
            if field in NOT_IN_WEIGHTS or field == "dtype":
                continue
            if field in flags and given_values is not flags:
                continue  # the flag wins; it was checked already
            if not _agrees(field, given, cfg):
                contradictions.append(
                    f"{origin} gives {field}={format_value(given)} but the weights have "
                    f"{field}={format_value(getattr(cfg, field))}"
                )
            elif field == "ff_mult" and given != cfg.ff_mult:
                adopt[field] = given
                sources[field] = flags_origin if given_values is flags else "config"
    if contradictions:
        raise CheckpointError("; ".join(contradictions))
    if adopt:
        cfg = cfg.replace(**adopt)
    check_state_dict(
        cfg,
        state_dict,
        f"{source} ({layout.label})",
        rows=layout.table(cfg),
        optional=layout.optional(cfg),
    )
    return Resolved(cfg, dtype, sources, layout)
