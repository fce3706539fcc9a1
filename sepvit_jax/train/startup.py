"""Start-up overlap: the programs of a run compile ahead of its first batch, beside its state.

Compilation is most of the start-up of a small run, and XLA compiles with the GIL released, so
`prepare` traces the train step (the longest compile) first and compiles it in a worker thread
while the main thread builds the initial state. On CPU the eval step then compiles in the same
worker while the first training steps run, and is waited for only at its first call (the end of
the first epoch); on an accelerator XLA autotunes kernels on the device while compiling, so it is
compiled before training starts.

The init program runs once, so it is compiled for compile time, not run time: at XLA's backend
optimisation level 0 it compiles in ~40% of the time (digits: 6.0 -> 2.3 s on a busy 2-core
machine; its values may differ from a level-3 build in the last bit), and on CPU without the MLIR
fusion emitters in half the CPU time again (1.9 -> 1.0 s; bitwise the same values). Options the
installed XLA does not know are detected once, on a one-op program, and left out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp

from sepvit_jax.train.state import StatePlan

_FAST_INIT_OPTIONS = {
    "all": {"xla_backend_optimization_level": 0},
    "cpu": {"xla_cpu_use_fusion_emitters": False},
}


@functools.cache
def init_compile_options(platform: str) -> dict:
    """The fast-compile options for a one-off program that this XLA supports on `platform`."""
    wanted = {**_FAST_INIT_OPTIONS["all"], **_FAST_INIT_OPTIONS.get(platform, {})}
    probe = jax.jit(jnp.negative).lower(jnp.zeros((), jnp.float32))
    supported = {}
    for name, value in wanted.items():
        try:
            probe.compile({name: value})
        except Exception:  # noqa: BLE001 - an option this XLA does not have, whatever it says
            continue
        supported[name] = value
    return supported


class CompiledLater:
    """A program still compiling: the first call waits for it (and re-raises its compilation
    error, if any)."""

    def __init__(self, future: Future):
        self._future = future

    def __call__(self, *args):
        return self._future.result()(*args)


def prepare(
    plan: StatePlan,
    train_step,
    train_args: tuple,
    eval_step,
    eval_args: tuple,
    *,
    build_state: bool,
) -> tuple[dict, Callable | None, Callable]:
    """(state, compiled train step, eval step): compiles overlapped with building the state.

    Args:
      plan: the train state's plan; with `build_state` False its abstract shapes are returned
        (a target to restore a checkpoint into).
      train_step: the jitted train step, or None (evaluation only); `train_args` its abstract
        arguments.
      eval_step, eval_args: likewise for the eval step.
    """
    platform = jax.devices()[0].platform
    pool = ThreadPoolExecutor(1, thread_name_prefix="compile")  # one program at a time
    try:
        train = None
        if train_step is not None:
            train = pool.submit(train_step.lower(*train_args).compile)
        evaluate = pool.submit(eval_step.lower(*eval_args).compile)
        state = plan.build(init_compile_options(platform)) if build_state else plan.shapes
        train = train.result() if train is not None else None
        if platform != "cpu":
            evaluate.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=False)
    return state, train, CompiledLater(evaluate)
