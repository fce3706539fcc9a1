"""The functional pieces of SepViT training: optimizer, sharded state init, train and eval steps.

The train state is one pytree, placed on the mesh by `sharding.ShardingRules`:

    {"step": int32 scalar, "params": nnx.State (float32), "rest": nnx.State (e.g. dropout RNG),
     "opt": optax state (moments shaped like params, so sharded like them)}

Batches are dicts of NHWC arrays, `image (B, H, W, C)`, `label (B,)` (and `mask (B,)` for eval),
sharded along B over every device. Each step is a single `jax.jit` with explicit in/out
shardings; the train step donates the state, so parameters are updated in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sepvit_jax.config import SepViTConfig
from sepvit_jax.model import SepViT
from sepvit_jax.sharding import ShardingRules, batch_sharding, replicated

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, clipped by global norm.

    Args:
      lr: peak learning rate (reached after `warmup_steps`).
      warmup_steps: linear warm-up from 0.
      total_steps: length of the schedule (cosine decay to `lr * min_lr_ratio`).
      weight_decay: decoupled decay, only on weight matrices/kernels (not on norms, biases or
        window tokens).
      clip_norm: global gradient-norm clip (0: none).
      label_smoothing: mass spread uniformly over the classes in the training loss.
      b1, b2: Adam moment decays.
      min_lr_ratio: final learning rate as a fraction of `lr`.
      grad_accum: micro-batches per step (gradients averaged before one update).
    """

    lr: float = 2e-3
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    min_lr_ratio: float = 0.0
    grad_accum: int = 1


def decay_mask(params) -> Any:
    """True for the arrays weight decay applies to: the kernels of convs and dense layers.

    Not norms (`g`, `b`, `scale`, `bias`), biases, nor the window tokens, which are embeddings.
    Decided by the parameter's own name, the last entry of its path.
    """

    def rule(path, _) -> bool:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]  # nnx.Variable's own pytree entry
        return names[-1] == "kernel"

    return jax.tree.map_with_path(rule, params)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class Model:
    """The static halves of a SepViT: graph definitions for training and evaluation."""

    config: SepViTConfig
    train_graph: Any
    eval_graph: Any


def abstract_model(cfg: SepViTConfig, dtype: str = "float32") -> tuple[Model, Any, Any]:
    """Graph definitions and abstract (params, rest), without allocating or running an init."""
    model = nnx.eval_shape(lambda: _build(cfg, dtype, jax.random.key(0)))
    train_graph, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
    return Model(cfg, train_graph, eval_graph), params, rest


def _build(cfg: SepViTConfig, dtype: str, key: jax.Array) -> SepViT:
    params_key, dropout_key = jax.random.split(key)
    rngs = nnx.Rngs(params=params_key, dropout=dropout_key)
    # Parameters always float32; `dtype` is the compute dtype.
    return SepViT.from_config(cfg, rngs=rngs, dtype=DTYPES[dtype], param_dtype=jnp.float32)


def init_state(
    cfg: SepViTConfig,
    optimizer: optax.GradientTransformation,
    mesh,
    *,
    seed: int,
    dtype: str = "float32",
    rules: ShardingRules = ShardingRules(),  # noqa: B008 (frozen, immutable)
    params=None,
    abstract: bool = False,
) -> tuple[Model, dict, Any]:
    """Builds the sharded train state inside one jit (eager NNX init would compile every op).

    Args:
      params: optional initial parameters (e.g. converted weights) replacing the random ones.
      abstract: return ShapeDtypeStructs instead of arrays (a restore target; nothing runs).

    Returns:
      (model graphs, state, state shardings).
    """

    def init(key, given):
        model = _build(cfg, dtype, key)
        _, fresh, rest = nnx.split(model, nnx.Param, ...)
        p = fresh if given is None else given
        return {"step": jnp.zeros((), jnp.int32), "params": p, "rest": rest,
                "opt": optimizer.init(p)}  # fmt: skip

    model, _, _ = abstract_model(cfg, dtype)
    key = jax.random.key(seed)
    shapes = jax.eval_shape(init, key, params)
    shardings = rules.shardings(shapes, mesh)
    if abstract:
        return model, shapes, shardings
    given_shardings = None
    if params is not None:
        # Host copies (e.g. converted weights every process has read) become global arrays laid
        # out like the state, each process supplying its own shards.
        given_shardings = shardings["params"]
        params = jax.tree.map(_global_array, params, given_shardings)
    jitted = jax.jit(
        init, in_shardings=(replicated(mesh), given_shardings), out_shardings=shardings
    )
    # speed: the init program runs once, so it is compiled for compile time, not run time: at
    # XLA's backend optimisation level 0 it compiles in ~40% of the time (digits: 6.0 -> 2.3 s
    # on a busy 2-core machine; its values may differ from a level-3 build in the last bit),
    # and on CPU without the MLIR fusion emitters in half the CPU time again (1.9 -> 1.0 s;
    # bitwise the same values).
    lowered = jitted.lower(key, params)
    options = {"xla_backend_optimization_level": 0}
    if mesh.devices.flat[0].platform == "cpu":
        options["xla_cpu_use_fusion_emitters"] = False
    try:
        compiled = lowered.compile(options)
    except Exception as err:  # an XLA that no longer knows an option: compile without them
        if "compile option" not in str(err):
            raise
        compiled = lowered.compile()
    return model, compiled(key, params), shardings


def _global_array(value, sharding) -> jax.Array:
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_spec(
    cfg: SepViTConfig, batch_size: int, image_size: int, mesh, *, eval: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch every input pipeline yields (see `sepvit_jax.data`), as abstract arrays.

    Lets the steps compile before the first batch exists.
    """
    sharded = batch_sharding(mesh)
    spec = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, cfg.channels), jnp.float32, sharding=sharded
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    if eval:
        spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharded)
    return spec


def eval_totals_spec(mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated(mesh))


def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (float32) against optionally smoothed one-hot labels."""
    targets = jax.nn.one_hot(labels, num_classes)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(
    model: Model, optimizer: optax.GradientTransformation, cfg: OptimConfig, state_shardings, mesh
) -> Callable:
    """`step(state, batch) -> (state, metrics)`: one jitted update, the state donated.

    With `cfg.grad_accum = N` the batch is cut into N micro-batches (example i goes to
    micro-batch i % N, so each device keeps its own rows) whose gradients are averaged.
    """
    num_classes = model.config.num_classes
    schedule = make_schedule(cfg)

    def loss_fn(params, rest, batch):
        # copy: fresh Variables at this trace level, so dropout may advance its RNG count.
        net = nnx.merge(model.train_graph, params, rest, copy=True)
        logits = net(batch["image"])
        loss = cross_entropy(logits, batch["label"], num_classes, cfg.label_smoothing).mean()
        correct = (logits.argmax(-1) == batch["label"]).sum()
        _, _, new_rest = nnx.split(net, nnx.Param, ...)
        return loss, (new_rest, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        params, n = state["params"], cfg.grad_accum
        if n == 1:
            (loss, (rest, correct)), grads = grad_fn(params, state["rest"], batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch
            )

            def body(carry, mb):
                g_sum, rest, l_sum, c_sum = carry
                (loss, (rest, correct)), g = grad_fn(params, rest, mb)
                # Laid out like the parameters: with fsdp, each micro-batch's gradient is
                # reduce-scattered into the sum instead of all-reduced.
                g_sum = jax.lax.with_sharding_constraint(
                    jax.tree.map(jnp.add, g_sum, g), state_shardings["params"]
                )
                return (g_sum, rest, l_sum + loss, c_sum + correct), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, state["rest"], jnp.float32(0), jnp.int32(0))
            (g_sum, rest, l_sum, correct), _ = jax.lax.scan(body, init, micro)
            grads = jax.tree.map(lambda g: g / n, g_sum)
            loss = l_sum / n
        updates, opt = optimizer.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "accuracy": correct / batch["label"].shape[0],
            "grad_norm": optax.tree.norm(grads),
            # The learning rate this step used, for the log (the schedule evaluated on the host
            # would compile a handful of eager ops: 0.3 s of a 15 s run).
            "lr": schedule(state["step"]),
        }
        new_state = {"step": state["step"] + 1, "params": new_params, "rest": rest, "opt": opt}
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(model: Model, state_shardings, mesh) -> Callable:
    """`eval_step(params, rest, batch, totals) -> totals`, totals = [correct, loss sum, count].

    Padding rows (mask False) count for nothing, so one compiled shape serves the last batch.
    """
    num_classes = model.config.num_classes

    def step(params, rest, batch, totals):
        logits = nnx.merge(model.eval_graph, params, rest)(batch["image"])
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
