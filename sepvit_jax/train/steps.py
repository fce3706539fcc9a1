"""The train state and the jitted train and eval steps of SepViT training.

The train state is one pytree, placed on the mesh by `sharding.ShardingRules`:

    {"step": int32 scalar, "params": nnx.State (float32), "rest": nnx.State (e.g. dropout RNG),
     "opt": optax state (moments shaped like params, so sharded like them)}

Batches are dicts of NHWC arrays, `image (B, H, W, C)`, `label (B,)` (and `mask (B,)` for eval),
sharded along B over every device. Each step is a single `jax.jit` with explicit in/out
shardings; the train step donates the state, so parameters are updated in place.
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
from sepvit_jax.kernels import lean_backward
from sepvit_jax.model import SepViT
from sepvit_jax.sharding import ShardingRules, batch_sharding, replicated
from sepvit_jax.train.optim import OptimConfig, cross_entropy, make_schedule


@dataclasses.dataclass(frozen=True)
class ModelGraphs:
    """The static halves of a SepViT (NNX graph definitions), in training and in eval mode."""

    config: SepViTConfig
    train: Any
    eval: Any


def _build(config: SepViTConfig, dtype: str, key: jax.Array) -> SepViT:
    params_key, dropout_key = jax.random.split(key)
    rngs = nnx.Rngs(params=params_key, dropout=dropout_key)
    # Parameters always float32; `dtype` is the compute dtype.
    return SepViT.from_config(config, rngs=rngs, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)


def model_graphs(config: SepViTConfig, dtype: str = "float32") -> ModelGraphs:
    """The graph definitions, without allocating or initialising anything."""
    model = nnx.eval_shape(lambda: _build(config, dtype, jax.random.key(0)))
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
) -> StatePlan:
    """Plans the sharded train state, built inside one jit (eager NNX init compiles every op).

    Args:
      params: optional initial parameters replacing the random ones (a pure dict of host
        arrays, e.g. converted weights every process has read).
    """

    def init(key, given):
        _, fresh, rest = nnx.split(_build(config, dtype, key), nnx.Param, ...)
        if given is not None:
            nnx.replace_by_pure_dict(fresh, given)
        return {"step": jnp.zeros((), jnp.int32), "params": fresh, "rest": rest,
                "opt": optimizer.init(fresh)}  # fmt: skip

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

    return StatePlan(model_graphs(config, dtype), shapes, shardings, build)


def _global_array(value, sharding) -> jax.Array:
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_spec(
    config: SepViTConfig, batch_size: int, image_size: int, mesh, *, eval: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch every input pipeline yields (see `sepvit_jax.data`), as abstract arrays.

    Lets the steps compile before the first batch exists.
    """
    sharded = batch_sharding(mesh)
    shape = (batch_size, image_size, image_size, config.channels)
    spec = {
        "image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharded),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    if eval:
        spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharded)
    return spec


def eval_totals_spec(mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated(mesh))


def make_train_step(
    graphs: ModelGraphs,
    optimizer: optax.GradientTransformation,
    cfg: OptimConfig,
    state_shardings,
    mesh,
) -> Callable:
    """`step(state, batch) -> (state, metrics)`: one jitted update, the state donated.

    With `cfg.grad_accum = N` the batch is cut into N micro-batches (example i goes to
    micro-batch i % N, so each device keeps its own rows) whose gradients are averaged.
    """
    num_classes = graphs.config.num_classes
    schedule = make_schedule(cfg)

    def loss_fn(params, rest, batch):
        # copy: fresh Variables at this trace level, so dropout may advance its RNG count.
        net = nnx.merge(graphs.train, params, rest, copy=True)
        with lean_backward():  # the memory-lean backward passes (sepvit_jax.kernels)
            logits = net(batch["image"])
        loss = cross_entropy(logits, batch["label"], num_classes, cfg.label_smoothing).mean()
        correct = (logits.argmax(-1) == batch["label"]).sum()
        _, _, new_rest = nnx.split(net, nnx.Param, ...)
        return loss, (new_rest, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(params, rest, batch):
        n = cfg.grad_accum
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def body(carry, micro_batch):
            grad_sum, rest, loss_sum, correct_sum = carry
            (loss, (rest, correct)), grads = grad_fn(params, rest, micro_batch)
            # Laid out like the parameters: with fsdp, each micro-batch's gradient is
            # reduce-scattered into the sum instead of all-reduced.
            grad_sum = jax.lax.with_sharding_constraint(
                jax.tree.map(jnp.add, grad_sum, grads), state_shardings["params"]
            )
            return (grad_sum, rest, loss_sum + loss, correct_sum + correct), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, rest, jnp.float32(0), jnp.int32(0))
        (grad_sum, rest, loss_sum, correct), _ = jax.lax.scan(body, init, micro)
        return (loss_sum / n, (rest, correct)), jax.tree.map(lambda g: g / n, grad_sum)

    def step(state, batch):
        params = state["params"]
        gradients = grad_fn if cfg.grad_accum == 1 else accumulated
        (loss, (rest, correct)), grads = gradients(params, state["rest"], batch)
        updates, opt = optimizer.update(grads, state["opt"], params)
        metrics = {
            "loss": loss,
            "accuracy": correct / batch["label"].shape[0],
            "grad_norm": optax.tree.norm(grads),
            # The learning rate this step used, for the log (the schedule evaluated on the host
            # would compile a handful of eager ops: 0.3 s of a 15 s run).
            "lr": schedule(state["step"]),
        }
        new_params = optax.apply_updates(params, updates)
        return {"step": state["step"] + 1, "params": new_params, "rest": rest, "opt": opt}, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(graphs: ModelGraphs, state_shardings, mesh) -> Callable:
    """`eval_step(params, rest, batch, totals) -> totals`, totals = [correct, loss sum, count].

    Padding rows (mask False) count for nothing, so one compiled shape serves the last batch.
    """
    num_classes = graphs.config.num_classes

    def step(params, rest, batch, totals):
        logits = nnx.merge(graphs.eval, params, rest)(batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        correct = ((logits.argmax(-1) == batch["label"]) * mask).sum()
        loss = (cross_entropy(logits, batch["label"], num_classes) * mask).sum()
        return totals + jnp.stack([correct, loss, mask.sum()])

    return jax.jit(
        step,
        in_shardings=(
            state_shardings["params"],
            state_shardings["rest"],
            batch_sharding(mesh),
            replicated(mesh),
        ),
        out_shardings=replicated(mesh),
        donate_argnums=3,
    )
