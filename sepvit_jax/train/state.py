"""The train state of SepViT training, planned before any of it exists, then built in one jit.

    {"step": int32 scalar, "params": nnx.State (float32), "rest": nnx.State (e.g. dropout RNG),
     "opt": optax state (moments shaped like params, so sharded like them),
     "ema": the parameters' moving average (only with `ema=True`; shaped, so sharded, like
            params)}

placed on the mesh by `sharding.ShardingRules`. The model's static halves (NNX graph
definitions, in training and in eval mode) go with it: the steps (`steps.py`) merge them with
the state's arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.model import SepViT
from sepvit_jax.sharding import ShardingRules, replicated


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Training options of the model outside SepViTConfig (see `SepViT.from_config`).

    Args:
      drop_path_rate: stochastic depth of the last block (timm's linear schedule; 0: none).
      remat: recompute each transformer block in the backward pass (less memory).
    """

    drop_path_rate: float = 0.0
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class ModelGraphs:
    """The static halves of a SepViT (NNX graph definitions), in training and in eval mode."""

    config: SepViTConfig
    train: Any
    eval: Any


def _build(config: SepViTConfig, dtype: str, key: jax.Array, options: ModelOptions) -> SepViT:
    params_key, dropout_key = jax.random.split(key)
    rngs = nnx.Rngs(params=params_key, dropout=dropout_key)
    # Parameters always float32; `dtype` is the compute dtype.
    return SepViT.from_config(
        config,
        rngs=rngs,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.float32,
        drop_path_rate=options.drop_path_rate,
        remat=options.remat,
    )


def model_graphs(
    config: SepViTConfig,
    dtype: str = "float32",
    options: ModelOptions = ModelOptions(),  # noqa: B008 (frozen, immutable)
) -> ModelGraphs:
    """The graph definitions, without allocating or initialising anything."""
    model = nnx.eval_shape(lambda: _build(config, dtype, jax.random.key(0), options))
    train_graph, _, _ = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
    return ModelGraphs(config, train_graph, eval_graph)


@dataclasses.dataclass(frozen=True)
class StatePlan:
    """The train state before any of it exists: its graphs, shapes and shardings.

    `build(compiler_options)` compiles the init program and runs it once: the state, sharded.
    `shapes` (with `shardings`) is also the target a checkpoint restores into.
    """

    graphs: ModelGraphs
    shapes: dict
    shardings: dict
    build: Callable[[Mapping[str, Any] | None], dict]


def plan_state(
    config: SepViTConfig,
    optimizer: optax.GradientTransformation,
    mesh,
    *,
    seed: int,
    dtype: str = "float32",
    rules: ShardingRules = ShardingRules(),  # noqa: B008 (frozen, immutable)
    params: Mapping | None = None,
    options: ModelOptions = ModelOptions(),  # noqa: B008 (frozen, immutable)
    ema: bool = False,
) -> StatePlan:
    """Plans the sharded train state, built inside one jit (eager NNX init compiles every op).

    Args:
      params: optional initial parameters replacing the random ones (a pure dict of host
        arrays, e.g. converted weights every process has read).
      options: drop path and remat of the model.
      ema: keep a moving average of the parameters ("ema"), starting as the initial ones.
    """

    def init(key, given):
        _, fresh, rest = nnx.split(_build(config, dtype, key, options), nnx.Param, ...)
        if given is not None:
            nnx.replace_by_pure_dict(fresh, given)
        state = {"step": jnp.zeros((), jnp.int32), "params": fresh, "rest": rest,
                 "opt": optimizer.init(fresh)}  # fmt: skip
        if ema:
            state["ema"] = jax.tree.map(jnp.copy, fresh)
        return state

    key = jax.random.key(seed)
    shapes = jax.eval_shape(init, key, params)
    shardings = rules.shardings(shapes, mesh)

    def build(compiler_options: Mapping[str, Any] | None = None) -> dict:
        given, given_shardings = None, None
        if params is not None:
            # Host copies become global arrays laid out like the state, each process supplying
            # its own shards.
            given_shardings = nnx.to_pure_dict(shardings["params"])
            given = jax.tree.map(_global_array, dict(params), given_shardings)
        jitted = jax.jit(
            init, in_shardings=(replicated(mesh), given_shardings), out_shardings=shardings
        )
        return jitted.lower(key, given).compile(compiler_options)(key, given)

    return StatePlan(model_graphs(config, dtype, options), shapes, shardings, build)


def _global_array(value, sharding) -> jax.Array:
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
