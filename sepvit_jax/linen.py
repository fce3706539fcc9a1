"""Linen interop: `SepViT` as a `flax.linen.Module`, and weights moved both ways with the NNX model.

`SepViT(config, dtype=..., param_dtype=...)` is a Linen module computing exactly
`sepvit_jax.SepViT` (the NNX model) on NHWC images; `init`/`apply` work as for any Linen module,
under `jax.jit`, `jax.grad` and `jax.vmap`. Dropout (`config.dropout > 0`) runs when
`deterministic=False` (a module attribute or a call argument) and draws from the "dropout" rng
stream: `apply(variables, x, deterministic=False, rngs={"dropout": key})`.

Layout: `variables = {"params": tree}`, the tree keyed by the NNX module paths, list indices as
strings, holding the NNX parameter arrays as they are (same shapes, dtypes and layouts: HWIO conv
kernels, (in, out) linear kernels), so moving weights is re-keying only, bitwise exact:

    Linen variables["params"]                        NNX model
    ["layers"]["0"]["patch_embed"]["conv"]["kernel"]  model.layers[0].patch_embed.conv.kernel
    ["layers"]["1"]["transformer"]["layers"]["0"]["attn"]["to_qkv"]["kernel"]
                                                      model.layers[1].transformer.layers[0].attn.to_qkv.kernel
    ["mlp_head"]["fc"]["bias"]                        model.mlp_head.fc.bias

`nnx_to_linen_variables(model)` and `linen_variables_to_nnx(config, variables)` move them (integer
or string list indices are both accepted, as checkpoint libraries may turn one into the other).

How: the Linen module has no Linen submodules. `init` builds the NNX model from the "params" rng
and stores its parameter arrays; `apply` builds it abstractly (`nnx.eval_shape`: no initializer
runs), fills in the stored arrays, switches dropout and calls it. Not `flax.nnx.bridge.ToLinen`
(Flax 0.12): its `apply` re-runs every parameter initializer on each call (slow eagerly), it
silently uses a fixed key when dropout runs without a "dropout" rng, its `init` needs a "dropout"
rng even in eval mode, and it keys list entries by int (`flatten_dict(..., sep="/")` fails).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx, traverse_util
from flax.core import unfreeze

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.model import SepViT as NNXSepViT

__all__ = ["SepViT", "linen_variables_to_nnx", "nnx_to_linen_variables"]


def _build(config: SepViTConfig, dtype, param_dtype, rngs: nnx.Rngs) -> NNXSepViT:
    return NNXSepViT.from_config(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _abstract(config: SepViTConfig, dtype, param_dtype) -> NNXSepViT:
    """The NNX model with shapes but no values (nothing computed)."""
    # (dropout streams tagged "dropout", so that nnx.reseed(model, dropout=...) finds them)
    return nnx.eval_shape(lambda: _build(config, dtype, param_dtype, nnx.Rngs(params=0, dropout=0)))


def _flat_params(model: NNXSepViT) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    return [
        (tuple(str(k) for k in path), var)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]


def _params_tree(model: NNXSepViT) -> dict[str, Any]:
    return traverse_util.unflatten_dict(
        {path: var.get_value() for path, var in _flat_params(model)}
    )


def _fill(model: NNXSepViT, tree, *, check_dtype: bool) -> None:
    """Set `model`'s parameters from a Linen "params" tree: the same names and shapes, exactly."""
    given = {
        tuple(str(k) for k in path): value
        for path, value in traverse_util.flatten_dict(unfreeze(tree)).items()
    }
    params = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(params)
    names = {tuple(str(k) for k in path) for path, _ in flat}
    missing, unexpected = sorted(names - given.keys()), sorted(given.keys() - names)
    if missing or unexpected:
        raise ValueError(
            f"params do not fit {model.config}: missing {['/'.join(p) for p in missing]}, "
            f"unexpected {['/'.join(p) for p in unexpected]}"
        )
    for path, var in flat:
        value, name = given[tuple(str(k) for k in path)], "/".join(map(str, path))
        want = var.get_value()
        if jnp.shape(value) != want.shape:
            raise ValueError(f"param {name}: shape {jnp.shape(value)}, the model has {want.shape}")
        if check_dtype and jnp.result_type(value) != want.dtype:
            raise ValueError(
                f"param {name}: dtype {jnp.result_type(value)}, the model has {want.dtype} "
                f"(pass param_dtype=)"
            )
        var.set_value(value)
    nnx.update(model, params)


class SepViT(linen.Module):
    """SepViT on NHWC images as a Linen module; the same function as `sepvit_jax.SepViT`.

    Attributes:
      config: the hyper-parameters (`sepvit_jax.SepViTConfig`).
      dtype: compute dtype (e.g. jnp.bfloat16); norms and softmax still run in float32.
      param_dtype: dtype of the parameters `init` makes.
      deterministic: dropout off (True) or on (False); may instead be given to `__call__`.
    """

    config: SepViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool | None = None

    @linen.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = linen.merge_param("deterministic", self.deterministic, deterministic)
        dropping = not deterministic and self.config.dropout > 0
        if dropping and not self.has_rng("dropout"):
            raise ValueError(
                'dropout is on (deterministic=False): pass rngs={"dropout": key}, or '
                "deterministic=True"
            )
        if self.is_initializing():
            rngs = nnx.Rngs(params=self.make_rng("params"), dropout=0)
            model = _build(self.config, self.dtype, self.param_dtype, rngs)
            for name, value in _params_tree(model).items():
                self.put_variable("params", name, value)
        else:
            model = _abstract(self.config, self.dtype, self.param_dtype)
            _fill(model, self.variables.get("params", {}), check_dtype=False)
        if dropping:
            nnx.reseed(model, dropout=self.make_rng("dropout"))
        if deterministic:
            model.eval()
        else:
            model.train()
        return model(x)


def nnx_to_linen_variables(model: NNXSepViT) -> dict[str, Any]:
    """The Linen variables `{"params": ...}` of an NNX `sepvit_jax.SepViT` (its arrays, shared)."""
    return {"params": _params_tree(model)}


def linen_variables_to_nnx(
    config: SepViTConfig,
    variables,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    dropout_rng: int | jax.Array = 0,
) -> NNXSepViT:
    """An NNX `sepvit_jax.SepViT` holding the Linen variables' parameter arrays (shared).

    No initializer runs. `dropout_rng` (a seed or key) seeds the model's dropout stream when
    `config.dropout > 0`. Raises ValueError for a missing, unexpected or misshapen parameter, or
    one whose dtype is not `param_dtype`. The model is in train mode, as a fresh NNX model.
    """
    model = _abstract(config, dtype, param_dtype)
    _fill(model, variables["params"], check_dtype=True)
    if config.dropout > 0:
        nnx.reseed(model, dropout=dropout_rng)
    return model
