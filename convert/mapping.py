"""The weight table: every torch state_dict key <-> its Flax NNX parameter path <-> a transform.

One explicit row per tensor, built from the config; nothing is guessed from a tensor's rank (a
Conv1d weight is 3-D, a depthwise kernel 4-D like a full conv: guessing maps both wrongly).

    torch (NCHW, vit-pytorch names)               Flax (NHWC)                          transform
    layers.i.0.conv.weight  (O, I, k, k)          layers/i/patch_embed/conv/kernel     conv2d
    layers.i.1.proj.weight  (d, 1, 3, 3)          layers/i/peg/proj/kernel             conv2d
    ...to_qkv.weight        (3*inner, d, 1)       .../attn/to_qkv/kernel               conv1d_1x1
    ...norm.g               (1, d, 1, 1)          .../norm/g                           chan_norm
    mlp_head.2.weight       (classes, d)          mlp_head/fc/kernel                   linear

`state_dict_to_nnx` copies a torch-named mapping into a model; `nnx_to_state_dict` reads one
back out. Both visit every row exactly once and report every problem together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from convert.io import to_numpy
from sepvit_jax.config import SepViTConfig

FlaxPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one tensor changes between the layouts; the two functions are exact inverses."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


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

    @property
    def flax_name(self) -> str:
        return "/".join(map(str, self.flax_path))


def _dssa_rows(t: str, f: FlaxPath) -> Iterator[Row]:
    # torch lists a module's own parameters before its submodules', so window_tokens comes first.
    yield Row(f"{t}.window_tokens", (*f, "window_tokens"), IDENTITY)
    yield Row(f"{t}.norm.g", (*f, "norm", "g"), CHAN_NORM)
    yield Row(f"{t}.norm.b", (*f, "norm", "b"), CHAN_NORM)
    yield Row(f"{t}.to_qkv.weight", (*f, "to_qkv", "kernel"), CONV1D_1X1)
    qk = (*f, "window_tokens_to_qk")
    yield Row(f"{t}.window_tokens_to_qk.0.weight", (*qk, "norm", "scale"), IDENTITY)
    yield Row(f"{t}.window_tokens_to_qk.0.bias", (*qk, "norm", "bias"), IDENTITY)
    yield Row(f"{t}.window_tokens_to_qk.3.weight", (*qk, "proj", "kernel"), CONV1D_1X1)
    yield Row(f"{t}.window_tokens_to_qk.3.bias", (*qk, "proj", "bias"), IDENTITY)
    yield Row(f"{t}.to_out.0.weight", (*f, "to_out", "kernel"), CONV2D_1X1)
    yield Row(f"{t}.to_out.0.bias", (*f, "to_out", "bias"), IDENTITY)


def _feed_forward_rows(t: str, f: FlaxPath) -> Iterator[Row]:
    yield Row(f"{t}.net.0.g", (*f, "norm", "g"), CHAN_NORM)
    yield Row(f"{t}.net.0.b", (*f, "norm", "b"), CHAN_NORM)
    yield Row(f"{t}.net.1.weight", (*f, "fc1", "kernel"), CONV2D_1X1)
    yield Row(f"{t}.net.1.bias", (*f, "fc1", "bias"), IDENTITY)
    yield Row(f"{t}.net.4.weight", (*f, "fc2", "kernel"), CONV2D_1X1)
    yield Row(f"{t}.net.4.bias", (*f, "fc2", "bias"), IDENTITY)


def weight_table(config: SepViTConfig) -> list[Row]:
    """All rows for a model of this config, in torch's state_dict order."""
    rows: list[Row] = []
    for i in range(config.num_stages):
        t, f = f"layers.{i}", ("layers", i)
        rows.append(Row(f"{t}.0.conv.weight", (*f, "patch_embed", "conv", "kernel"), CONV2D))
        rows.append(Row(f"{t}.0.conv.bias", (*f, "patch_embed", "conv", "bias"), IDENTITY))
        rows.append(Row(f"{t}.1.proj.weight", (*f, "peg", "proj", "kernel"), CONV2D))
        rows.append(Row(f"{t}.1.proj.bias", (*f, "peg", "proj", "bias"), IDENTITY))
        for j in range(config.depth[i]):
            tb, fb = f"{t}.2.layers.{j}", (*f, "transformer", "layers", j)
            rows.extend(_dssa_rows(f"{tb}.0", (*fb, "attn")))
            rows.extend(_feed_forward_rows(f"{tb}.1", (*fb, "ff")))
        if i < config.num_stages - 1:
            rows.append(Row(f"{t}.2.norm.g", (*f, "transformer", "norm", "g"), CHAN_NORM))
            rows.append(Row(f"{t}.2.norm.b", (*f, "transformer", "norm", "b"), CHAN_NORM))
    rows.append(Row("mlp_head.1.weight", ("mlp_head", "norm", "scale"), IDENTITY))
    rows.append(Row("mlp_head.1.bias", ("mlp_head", "norm", "bias"), IDENTITY))
    rows.append(Row("mlp_head.2.weight", ("mlp_head", "fc", "kernel"), LINEAR))
    rows.append(Row("mlp_head.2.bias", ("mlp_head", "fc", "bias"), IDENTITY))
    return rows


def _variable(model, path: FlaxPath):
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def state_dict_to_nnx(model, state_dict: Mapping[str, Any]):
    """Copy a torch-named state_dict (numpy arrays or torch tensors) into `model` in place.

    Values are cast to each parameter's dtype. Missing, unexpected and mis-shaped keys are all
    collected and raised together in one ValueError; the model is untouched unless all fit.
    Returns the model.
    """
    import jax.numpy as jnp

    table = weight_table(model.config)
    missing = [row.torch_key for row in table if row.torch_key not in state_dict]
    unexpected = sorted(set(state_dict) - {row.torch_key for row in table})
    converted, mis_shaped = [], []
    for row in table:
        if row.torch_key not in state_dict:
            continue
        variable = _variable(model, row.flax_path)
        source = to_numpy(state_dict[row.torch_key], row.torch_key)
        target_shape = tuple(variable.shape)
        expected_torch_shape = row.transform.to_torch(np.empty(target_shape, np.int8)).shape
        if source.shape != expected_torch_shape:
            mis_shaped.append(
                f"{row.torch_key}: checkpoint {tuple(source.shape)}, model expects "
                f"{tuple(expected_torch_shape)}"
            )
            continue
        converted.append((variable, row.transform.to_flax(source)))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys ({len(mis_shaped)}): {'; '.join(mis_shaped)}")
    if problems:
        raise ValueError(
            f"state_dict does not fit SepViT{model.config.to_dict()}:\n  " + "\n  ".join(problems)
        )
    for variable, value in converted:
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    return model


def nnx_to_state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters as a torch-named `dict[str, numpy.ndarray]` (torch layouts)."""
    return {
        row.torch_key: np.ascontiguousarray(
            row.transform.to_torch(np.asarray(_variable(model, row.flax_path).get_value()))
        )
        for row in weight_table(model.config)
    }


def from_state_dict(
    config: SepViTConfig, state_dict: Mapping[str, Any], *, dtype=None, param_dtype=None, seed=0
):
    """A new `sepvit_jax.SepViT` holding `state_dict`, without running any random init.

    The model is traced abstractly (`sepvit_jax.checkpoint.abstract_model`), so converting a
    large checkpoint costs no initialisation time or memory; the parameters are then filled from
    the table, and the dropout RNG streams, the only other state, get keys derived from `seed`.
    """
    from sepvit_jax.checkpoint import abstract_model, fill_rng_state

    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, seed=seed)
    state_dict_to_nnx(model, state_dict)
    fill_rng_state(model, seed)
    return model
