"""The weight table: every torch state_dict key <-> its Flax NNX parameter path <-> a transform.

One explicit row per tensor, built from the config alone, with the tensor's torch shape; nothing
is guessed from a tensor's rank (a Conv1d weight is 3-D, a depthwise kernel 4-D like a full conv:
guessing maps both wrongly). Pure numpy: both models, the converter and the checkpoint readers
use it without importing each other.

    torch (NCHW, vit-pytorch names)               Flax (NHWC)                          transform
    layers.i.0.conv.weight  (O, I, k, k)          layers/i/patch_embed/conv/kernel     conv2d
    layers.i.1.proj.weight  (d, 1, 3, 3)          layers/i/peg/proj/kernel             conv2d
    ...to_qkv.weight        (3*inner, d, 1)       .../attn/to_qkv/kernel               conv1d_1x1
    ...norm.g               (1, d, 1, 1)          .../norm/g                           chan_norm
    mlp_head.2.weight       (classes, d)          mlp_head/fc/kernel                   linear

`check_shapes` is the one check of a set of tensors against what a config expects (every
missing, unexpected and mis-shaped tensor, reported together); `to_flax` and `to_torch` are the
one mapping, between a torch-named state_dict and the NNX parameter tree as a pure dict
(`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), each visiting every row exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.errors import CheckpointError

FlaxPath = tuple[str | int, ...]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one tensor changes between the layouts; the two functions are exact inverses.

    `shape`, when given, maps a torch shape to the Flax shape (otherwise the transform is
    applied to a zero-strided dummy of the torch shape, which costs no memory).
    """

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[Shape], Shape] | None = None

    def flax_shape(self, torch_shape: Shape) -> Shape:
        if self.shape is not None:
            return self.shape(torch_shape)
        return tuple(self.to_flax(np.broadcast_to(np.int8(0), torch_shape)).shape)


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
# Conv2d (O, I/groups, kh, kw) <-> nnx.Conv (kh, kw, I/groups, O); depthwise convs included.
CONV2D = Transform("conv2d", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
# A 1x1 Conv2d (O, I, 1, 1) is a Dense on the channel axis: kernel (I, O).
CONV2D_1X1 = Transform("conv2d_1x1", lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None])
# A 1x1 Conv1d (O, I, 1) likewise.
CONV1D_1X1 = Transform("conv1d_1x1", lambda w: w[:, :, 0].T, lambda w: w.T[:, :, None])
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)
# ChanLayerNorm stores g and b as (1, C, 1, 1) to broadcast over NCHW; here they are (C,).
CHAN_NORM = Transform("chan_norm", lambda w: w.reshape(-1), lambda w: w.reshape(1, -1, 1, 1))


@dataclasses.dataclass(frozen=True)
class Row:
    torch_key: str
    flax_path: FlaxPath
    transform: Transform
    torch_shape: Shape

    @property
    def flax_shape(self) -> Shape:
        return self.transform.flax_shape(self.torch_shape)


def _dssa_rows(t: str, f: FlaxPath, d: int, heads: int, dh: int) -> Iterator[Row]:
    inner = heads * dh
    # torch lists a module's own parameters before its submodules', so window_tokens comes first.
    yield Row(f"{t}.window_tokens", (*f, "window_tokens"), IDENTITY, (d,))
    yield Row(f"{t}.norm.g", (*f, "norm", "g"), CHAN_NORM, (1, d, 1, 1))
    yield Row(f"{t}.norm.b", (*f, "norm", "b"), CHAN_NORM, (1, d, 1, 1))
    yield Row(f"{t}.to_qkv.weight", (*f, "to_qkv", "kernel"), CONV1D_1X1, (3 * inner, d, 1))
    qk, tq = (*f, "window_tokens_to_qk"), f"{t}.window_tokens_to_qk"
    yield Row(f"{tq}.0.weight", (*qk, "norm", "scale"), IDENTITY, (dh,))
    yield Row(f"{tq}.0.bias", (*qk, "norm", "bias"), IDENTITY, (dh,))
    yield Row(f"{tq}.3.weight", (*qk, "proj", "kernel"), CONV1D_1X1, (2 * inner, inner, 1))
    yield Row(f"{tq}.3.bias", (*qk, "proj", "bias"), IDENTITY, (2 * inner,))
    yield Row(f"{t}.to_out.0.weight", (*f, "to_out", "kernel"), CONV2D_1X1, (d, inner, 1, 1))
    yield Row(f"{t}.to_out.0.bias", (*f, "to_out", "bias"), IDENTITY, (d,))


def _feed_forward_rows(t: str, f: FlaxPath, d: int, inner: int) -> Iterator[Row]:
    yield Row(f"{t}.net.0.g", (*f, "norm", "g"), CHAN_NORM, (1, d, 1, 1))
    yield Row(f"{t}.net.0.b", (*f, "norm", "b"), CHAN_NORM, (1, d, 1, 1))
    yield Row(f"{t}.net.1.weight", (*f, "fc1", "kernel"), CONV2D_1X1, (inner, d, 1, 1))
    yield Row(f"{t}.net.1.bias", (*f, "fc1", "bias"), IDENTITY, (inner,))
    yield Row(f"{t}.net.4.weight", (*f, "fc2", "kernel"), CONV2D_1X1, (d, inner, 1, 1))
    yield Row(f"{t}.net.4.bias", (*f, "fc2", "bias"), IDENTITY, (d,))


def _stage_rows(config: SepViTConfig, i: int) -> Iterator[Row]:
    t, f = f"layers.{i}", ("layers", i)
    d = config.stage_dims[i]
    d_in = config.channels if i == 0 else config.stage_dims[i - 1]
    k = 7 if i == 0 else 3  # kernel 2 * stride - 1
    yield Row(f"{t}.0.conv.weight", (*f, "patch_embed", "conv", "kernel"), CONV2D, (d, d_in, k, k))
    yield Row(f"{t}.0.conv.bias", (*f, "patch_embed", "conv", "bias"), IDENTITY, (d,))
    yield Row(f"{t}.1.proj.weight", (*f, "peg", "proj", "kernel"), CONV2D, (d, 1, 3, 3))
    yield Row(f"{t}.1.proj.bias", (*f, "peg", "proj", "bias"), IDENTITY, (d,))
    for j in range(config.depth[i]):
        tb, fb = f"{t}.2.layers.{j}", (*f, "transformer", "layers", j)
        yield from _dssa_rows(f"{tb}.0", (*fb, "attn"), d, config.stage_heads[i], config.dim_head)
        yield from _feed_forward_rows(f"{tb}.1", (*fb, "ff"), d, config.ff_inner_dim(i))
    if i < config.num_stages - 1:
        yield Row(f"{t}.2.norm.g", (*f, "transformer", "norm", "g"), CHAN_NORM, (1, d, 1, 1))
        yield Row(f"{t}.2.norm.b", (*f, "transformer", "norm", "b"), CHAN_NORM, (1, d, 1, 1))


def weight_table(config: SepViTConfig) -> list[Row]:
    """All rows for a model of this config, in torch's state_dict order."""
    rows = [row for i in range(config.num_stages) for row in _stage_rows(config, i)]
    d, classes = config.stage_dims[-1], config.num_classes
    rows.append(Row("mlp_head.1.weight", ("mlp_head", "norm", "scale"), IDENTITY, (d,)))
    rows.append(Row("mlp_head.1.bias", ("mlp_head", "norm", "bias"), IDENTITY, (d,)))
    rows.append(Row("mlp_head.2.weight", ("mlp_head", "fc", "kernel"), LINEAR, (classes, d)))
    rows.append(Row("mlp_head.2.bias", ("mlp_head", "fc", "bias"), IDENTITY, (classes,)))
    return rows


# ---- the one check -----------------------------------------------------------------------------

_LISTED = 5


def check_shapes(expected: Mapping[str, Shape], found: Mapping[str, Shape], what: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor at once.

    Args:
      expected: tensor name -> shape a model of the config has.
      found: tensor name -> shape actually present.
      what: the subject of the message, e.g. "state_dict of model.pt".
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(found[k])}, model expects {tuple(shape)}"
        for k, shape in expected.items()
        if k in found and tuple(found[k]) != tuple(shape)
    ]
    problems = [
        f"{label} keys ({len(items)}): {', '.join(items[:_LISTED])}"
        + (", ..." if len(items) > _LISTED else "")
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", wrong),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{what} does not fit the SepViT: {'; '.join(problems)}")


def torch_shapes(config: SepViTConfig) -> dict[str, Shape]:
    return {row.torch_key: row.torch_shape for row in weight_table(config)}


def flax_shapes(config: SepViTConfig) -> dict[str, Shape]:
    """'layers/0/patch_embed/conv/kernel' -> shape, as Orbax names the stored arrays."""
    return {flax_name(row.flax_path): row.flax_shape for row in weight_table(config)}


def flax_name(path: FlaxPath) -> str:
    return "/".join(map(str, path))


def check_state_dict(
    config: SepViTConfig,
    state_dict: Mapping[str, Any],
    what: str,
    *,
    rows: Sequence[Row] | None = None,
    optional: Mapping[str, Shape] | None = None,
) -> None:
    """`check_shapes` of a torch-named state_dict against a SepViT of `config`.

    `rows` (default: `weight_table(config)`) name the tensors, e.g. in an older layout
    (`sepvit_jax.core.layouts`); `optional` tensors may be present (with their shape) or not.
    """
    rows = weight_table(config) if rows is None else rows
    expected = {row.torch_key: row.torch_shape for row in rows}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    for key, shape in (optional or {}).items():
        if key in found:
            expected[key] = shape
    check_shapes(expected, found, what)


# ---- the one mapping ---------------------------------------------------------------------------


def to_flax(
    config: SepViTConfig,
    state_dict: Mapping[str, np.ndarray],
    dtype=None,
    *,
    rows: Sequence[Row] | None = None,
) -> dict:
    """The NNX parameter tree (a pure dict) of a checked torch-named state_dict of numpy arrays.

    Leaves stay views of the state_dict where the layout allows (no copy when `dtype` is the
    arrays' own or None), so a conversion holds about one copy of the weights. `rows` as in
    `check_state_dict`; tensors the rows do not name are ignored.
    """
    tree: dict = {}
    for row in weight_table(config) if rows is None else rows:
        node = tree
        for part in row.flax_path[:-1]:
            node = node.setdefault(part, {})
        value = row.transform.to_flax(np.asarray(state_dict[row.torch_key]))
        node[row.flax_path[-1]] = value if dtype is None else value.astype(dtype, copy=False)
    return tree


def to_torch(
    config: SepViTConfig, tree: Mapping, *, rows: Sequence[Row] | None = None
) -> dict[str, np.ndarray]:
    """The torch-named state_dict (numpy, torch layouts, contiguous) of an NNX parameter tree,
    in the order and names of `rows` (default: the current layout's)."""
    out = {}
    for row in weight_table(config) if rows is None else rows:
        node: Any = tree
        for part in row.flax_path:
            node = node[part]
        out[row.torch_key] = np.ascontiguousarray(row.transform.to_torch(np.asarray(node)))
    return out
