"""The jitted train and eval steps of SepViT training.

The train state is one pytree (`state.py`): step counter, parameters, RNG state, optimiser
state and, optionally, the parameters' moving average. Batches are dicts of NHWC arrays,
`image (B, H, W, C)`, `label (B,)` (and `mask (B,)` for eval), sharded along B over every
device. Each step is a single `jax.jit` with explicit in/out shardings; the train step donates
the state, so parameters are updated in place.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.kernels import lean_backward
from sepvit_jax.sharding import batch_sharding, replicated
from sepvit_jax.train.mixing import Mixing
from sepvit_jax.train.optim import (
    OptimConfig,
    cross_entropy,
    ema_update,
    make_schedule,
    soft_cross_entropy,
)

# The state's plan lives in state.py; these names stay importable from here.
from sepvit_jax.train.state import (  # noqa: F401
    ModelGraphs,
    ModelOptions,
    StatePlan,
    model_graphs,
    plan_state,
)


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
    *,
    mixing: Mixing = Mixing(),  # noqa: B008 (frozen, immutable)
) -> Callable:
    """`step(state, batch) -> (state, metrics)`: one jitted update, the state donated.

    With `cfg.grad_accum = N` the batch is cut into N micro-batches (example i goes to
    micro-batch i % N, so each device keeps its own rows) whose gradients are averaged. With
    `mixing` on, the whole batch is mixed first and the loss is against its soft targets (the
    accuracy: of the targets' argmax). With `cfg.ema_decay` > 0 the state's "ema" follows
    the updated parameters.
    """
    num_classes = graphs.config.num_classes
    schedule = make_schedule(cfg)

    def loss_fn(params, rest, batch):
        # copy: fresh Variables at this trace level, so dropout may advance its RNG count.
        net = nnx.merge(graphs.train, params, rest, copy=True)
        with lean_backward():  # the memory-lean backward passes (sepvit_jax.kernels)
            logits = net(batch["image"])
        if "target" in batch:  # soft targets (mixup/cutmix), label smoothing folded in
            loss = soft_cross_entropy(logits, batch["target"]).mean()
            correct = (logits.argmax(-1) == batch["target"].argmax(-1)).sum()
        else:
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
        if mixing.on:
            batch = mixing(batch, state["step"], num_classes, cfg.label_smoothing)
        gradients = grad_fn if cfg.grad_accum == 1 else accumulated
        (loss, (rest, correct)), grads = gradients(params, state["rest"], batch)
        updates, opt = optimizer.update(grads, state["opt"], params)
        metrics = {
            "loss": loss,
            "accuracy": correct / batch["image"].shape[0],
            "grad_norm": optax.tree.norm(grads),
            # The learning rate this step used, for the log (the schedule evaluated on the host
            # would compile a handful of eager ops: 0.3 s of a 15 s run).
            "lr": schedule(state["step"]),
        }
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "rest": rest, "opt": opt}
        if "ema" in state:
            new_state["ema"] = ema_update(state["ema"], new_params, cfg.ema_decay)
        return new_state, metrics

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
