"""Infer a `SepViTConfig` from the tensor shapes of a SepViT state_dict.

Everything but `window_size` and `dropout` is in the weights (see SPEC, "What the weights
tell"): channels and dim from the first patch embedding, the stages and their depths from the
key names, dim_head from the window-token LayerNorm, heads from `to_qkv`, ff_mult from the
feed-forward's first conv, num_classes from the classifier. Every shape is also checked against
the others, so a state_dict that no single config could have produced is rejected with the
offending key named, instead of failing later while loading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from convert.io import CheckpointError
from sepvit_jax.config import SepViTConfig

# Upstream vit-pytorch hard-codes window size 7 in every block (it never forwards the argument).
DEFAULT_WINDOW_SIZE = 7

_STAGE = re.compile(r"^layers\.(\d+)\.")


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"SepViT state_dict is missing {key!r}")
    return tuple(int(n) for n in state[key].shape)


def _fail(key: str, shape: tuple[int, ...], expected: str) -> CheckpointError:
    return CheckpointError(f"inconsistent SepViT weights: {key!r} has shape {shape}, {expected}")


def _indices(state: Mapping[str, Any], pattern: re.Pattern, what: str) -> int:
    """Count 0..n-1 indices captured by `pattern`; gaps mean a broken state_dict."""
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        return 0
    expected = set(range(max(found) + 1))
    if found != expected:
        missing = sorted(expected - found)
        raise CheckpointError(
            f"SepViT state_dict has {what} {sorted(found)} but not {missing}; keys are missing"
        )
    return len(found)


def _ff_mult(dims: Sequence[int], inner: Sequence[int], keys: Sequence[str]) -> int | float:
    """A single ff_mult with int(d * ff_mult) == inner for every block, preferring short values.

    The ratio inner/d need not be the same in every stage when ff_mult is not integral
    (int() truncates), so solve for the interval of ff_mult values that fits all blocks.
    """
    low = max(i / d for i, d in zip(inner, dims, strict=True))
    high = min((i + 1) / d for i, d in zip(inner, dims, strict=True))

    def fits(f: float) -> bool:
        return all(int(d * f) == i for d, i in zip(dims, inner, strict=True))

    if low < high:
        # Prefer the shortest decimal in the interval (4 rather than 4.0001, 1.3 rather
        # than 1.28125), then the interval's exact lower end.
        for digits in range(7):
            f = round(low, digits)
            if f < low:
                f = round(f + 10.0**-digits, digits)
            if fits(f):
                return int(f) if f == int(f) else f
        for f in (low, math.nextafter(low, math.inf)):
            if fits(f):
                return f
    # No single ff_mult explains every block: name the first block that disagrees with stage 0.
    first = inner[0] / dims[0]
    for key, d, i in zip(keys, dims, inner, strict=True):
        if int(d * first) != i:
            raise CheckpointError(
                f"inconsistent SepViT weights: {key!r} has {i} rows for width {d}, but "
                f"{keys[0]!r} has {inner[0]} rows for width {dims[0]} (ff_mult {first:g}); "
                "ff_mult must be the same in every block"
            )
    raise CheckpointError(f"inconsistent SepViT weights: no ff_mult fits {list(keys)}")


def _collapse(values: Sequence[int]) -> int | tuple[int, ...]:
    return values[0] if len(set(values)) == 1 else tuple(values)


def infer_config(
    state_dict: Mapping[str, Any],
    *,
    window_size: int | Sequence[int] | None = None,
    dropout: float = 0.0,
) -> tuple[SepViTConfig, dict[str, str]]:
    """Read the SepViT hyper-parameters off a state_dict's shapes.

    Args:
      state_dict: upstream key names (prefixes already stripped) -> arrays (anything with
        `.shape`).
      window_size: not stored in the weights; None means upstream's 7. An int, or one per stage
        (collapsed to an int when all equal).
      dropout: not stored in the weights either.

    Returns:
      (config, sources): `sources` maps every config field to where its value came from:
      "weights", "default" or "flag".

    Raises:
      CheckpointError: a key is missing or the shapes contradict each other.
    """
    conv0_key = "layers.0.0.conv.weight"
    conv0 = _shape(state_dict, conv0_key)
    if len(conv0) != 4 or conv0[2:] != (7, 7):
        raise _fail(conv0_key, conv0, "expected (dim, channels, 7, 7)")
    dim, channels = conv0[0], conv0[1]

    num_stages = _indices(state_dict, _STAGE, "stages")
    dims = [dim * 2**i for i in range(num_stages)]
    depth: list[int] = []
    stage_heads: list[int] = []
    dim_head: int | None = None
    dim_head_key = ""
    ff_dims: list[int] = []
    ff_inner: list[int] = []
    ff_keys: list[str] = []

    for i, d in enumerate(dims):
        stage = f"layers.{i}"
        conv_key = f"{stage}.0.conv.weight"
        conv = _shape(state_dict, conv_key)
        c_in = channels if i == 0 else dims[i - 1]
        k = 7 if i == 0 else 3
        if conv != (d, c_in, k, k):
            raise _fail(
                conv_key, conv, f"expected {(d, c_in, k, k)} (stage {i} width must be dim*2**{i})"
            )
        peg_key = f"{stage}.1.proj.weight"
        peg = _shape(state_dict, peg_key)
        if peg != (d, 1, 3, 3):
            raise _fail(peg_key, peg, f"expected {(d, 1, 3, 3)}")

        n_blocks = _indices(
            state_dict, re.compile(rf"^{re.escape(stage)}\.2\.layers\.(\d+)\."), f"{stage} blocks"
        )
        if n_blocks == 0:
            raise CheckpointError(f"SepViT state_dict has no blocks '{stage}.2.layers.*'")
        depth.append(n_blocks)

        heads_here: int | None = None
        for j in range(n_blocks):
            block = f"{stage}.2.layers.{j}"
            wt_key = f"{block}.0.window_tokens_to_qk.0.weight"
            wt = _shape(state_dict, wt_key)
            if len(wt) != 1:
                raise _fail(wt_key, wt, "expected (dim_head,)")
            if dim_head is None:
                dim_head, dim_head_key = wt[0], wt_key
            elif wt[0] != dim_head:
                raise _fail(
                    wt_key,
                    wt,
                    f"but {dim_head_key!r} has ({dim_head},): dim_head must be equal "
                    "in every block",
                )

            qkv_key = f"{block}.0.to_qkv.weight"
            qkv = _shape(state_dict, qkv_key)
            if len(qkv) != 3 or qkv[1:] != (d, 1) or qkv[0] % (3 * dim_head) or qkv[0] == 0:
                raise _fail(
                    qkv_key,
                    qkv,
                    f"expected (3 * heads * {dim_head}, {d}, 1) for width {d} and "
                    f"dim_head {dim_head}",
                )
            h = qkv[0] // (3 * dim_head)
            if heads_here is None:
                heads_here = h
            elif h != heads_here:
                raise _fail(
                    qkv_key,
                    qkv,
                    f"i.e. {h} heads, but block 0 of stage {i} has {heads_here}; "
                    "heads must be equal within a stage",
                )
            inner = h * dim_head
            mix_key = f"{block}.0.window_tokens_to_qk.3.weight"
            mix = _shape(state_dict, mix_key)
            if mix != (2 * inner, inner, 1):
                raise _fail(mix_key, mix, f"expected {(2 * inner, inner, 1)} for {h} heads")
            out_key = f"{block}.0.to_out.0.weight"
            out = _shape(state_dict, out_key)
            if out != (d, inner, 1, 1):
                raise _fail(out_key, out, f"expected {(d, inner, 1, 1)} for {h} heads")

            ff1_key = f"{block}.1.net.1.weight"
            ff1 = _shape(state_dict, ff1_key)
            if len(ff1) != 4 or ff1[1:] != (d, 1, 1) or ff1[0] == 0:
                raise _fail(ff1_key, ff1, f"expected (inner, {d}, 1, 1) for width {d}")
            ff4_key = f"{block}.1.net.4.weight"
            ff4 = _shape(state_dict, ff4_key)
            if ff4 != (d, ff1[0], 1, 1):
                raise _fail(ff4_key, ff4, f"expected {(d, ff1[0], 1, 1)}")
            ff_dims.append(d)
            ff_inner.append(ff1[0])
            ff_keys.append(ff1_key)
        assert heads_here is not None
        stage_heads.append(heads_here)

    head_key = "mlp_head.2.weight"
    head = _shape(state_dict, head_key)
    if len(head) != 2 or head[1] != dims[-1]:
        raise _fail(head_key, head, f"expected (num_classes, {dims[-1]}) for the last stage")

    ff_mult = _ff_mult(ff_dims, ff_inner, ff_keys)

    if window_size is None:
        ws: int | tuple[int, ...] = DEFAULT_WINDOW_SIZE
        ws_source = "default"
    else:
        ws = window_size
        if isinstance(window_size, Sequence):
            if len(window_size) != num_stages:
                raise CheckpointError(
                    f"window_size {tuple(window_size)} has {len(window_size)} entries but the "
                    f"weights have {num_stages} stages; give one per stage or a single int"
                )
            ws = _collapse(list(window_size))
        ws_source = "flag"

    assert dim_head is not None
    try:
        config = SepViTConfig(
            num_classes=head[0],
            dim=dim,
            depth=tuple(depth),
            heads=_collapse(stage_heads),
            window_size=ws,
            dim_head=dim_head,
            ff_mult=ff_mult,
            channels=channels,
            dropout=dropout,
        )
    except ValueError as err:
        raise CheckpointError(f"cannot build a SepViT config from these weights: {err}") from None
    sources = {
        name: "weights"
        for name in ("num_classes", "dim", "depth", "heads", "dim_head", "ff_mult", "channels")
    }
    sources["window_size"] = ws_source
    sources["dropout"] = "default" if dropout == 0.0 else "flag"
    return config, sources
