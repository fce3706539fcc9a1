"""One training run, top to bottom: hosts, mesh, data, model and state, steps, loop, export.

`main(argv)` is the library entry (tests call it in-process); `sepvit_jax.train.entry.main` adds
the process-level settings of `train.py` and `sepvit-train`. Exit status: 0 done (or stopped
cleanly by a signal), 2 bad input (one `error: ...` line on stderr), 3 the loss diverged
(NaN/inf; the last good checkpoint kept).

Batches are NHWC (`image (B, H, W, C)`), B split over every device of the ("data", "fsdp")
mesh. Process 0 alone writes the run directory's files (`rundir.py`); every process takes part
in the Orbax checkpoints (a multi-host run needs `runs_dir` on a shared file system).
"""

from __future__ import annotations

import functools
import logging
import sys
import time

import jax

from sepvit_jax import data, sharding
from sepvit_jax.train import compile_cache, describe, hosts, plotting, settle, startup, steps
from sepvit_jax.train.checkpoints import Checkpoints
from sepvit_jax.train.config import ConfigError, TrainConfig, parse_args
from sepvit_jax.train.loop import Diverged, Loop, evaluate
from sepvit_jax.train.mixing import Mixing
from sepvit_jax.train.optim import make_optimizer
from sepvit_jax.train.rundir import RunDir, significant
from sepvit_jax.train.weights import better_of, export_model


def run(cfg: TrainConfig) -> int:
    started = time.perf_counter()
    cfg.check()
    compile_cache.configure(cfg.compile_cache)  # before anything compiles
    # ---- hosts ----
    hosts.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    main = hosts.is_main()
    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, cfg.grad_accum)
    # ---- data ----
    cfg = settle.image_size(cfg, main)
    data_cfg = cfg.data_config()
    info = data.dataset_info(data_cfg)
    # Evaluation alone has no schedule (its training set may even be smaller than a batch).
    steps_per_epoch = 1 if cfg.eval_only else data.steps_per_epoch(data_cfg, cfg.batch_size)
    total_steps = cfg.total_steps(steps_per_epoch)
    batch_sharding = sharding.batch_sharding(mesh)
    # ---- model and state ----
    run_dir = RunDir(cfg)
    continuing = settle.check_continuation(cfg, run_dir)
    model_cfg, given_params = settle.model(cfg, info, run_dir, continuing)
    optim_cfg = cfg.optim_config(steps_per_epoch)
    if not (continuing or cfg.eval_only):
        resolved = settle.resolved(cfg, model_cfg, info, steps_per_epoch, optim_cfg, mesh)
        settle.start(cfg, run_dir, model_cfg, resolved)
    if main and not cfg.eval_only:
        settle.notes(cfg, info, steps_per_epoch, total_steps)
    optimizer = make_optimizer(optim_cfg)
    options = steps.ModelOptions(cfg.drop_path_rate, cfg.remat)
    plan = steps.plan_state(model_cfg, optimizer, mesh, seed=cfg.seed, dtype=cfg.dtype,
                            params=given_params, options=options,
                            ema=cfg.ema_decay > 0)  # fmt: skip
    # ---- steps ----
    state, train_step, eval_step = _compile(cfg, plan, optimizer, optim_cfg, mesh, continuing)
    score = functools.partial(evaluate, eval_step, data_cfg=data_cfg, batch_size=cfg.batch_size,
                              batch_sharding=batch_sharding)  # fmt: skip
    checkpoints = Checkpoints(run_dir.checkpoints, keep=cfg.keep, create=not cfg.eval_only)
    train_iter = None
    if not cfg.eval_only:
        train_iter = data.train_iterator(
            data_cfg,
            global_batch_size=cfg.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    try:
        if continuing:
            state = _restore(cfg, run_dir, checkpoints, state, plan, train_iter)
        if cfg.eval_only:
            _print_evaluation(score(state), main)
            return 0
        if int(jax.device_get(state["step"])) >= total_steps:
            if main:
                print(f"run {run_dir.path} already finished at step {total_steps}", file=sys.stderr)
            return 0
        # ---- loop ----
        if main:
            plotting.preload()
        loop = Loop(cfg, run_dir, checkpoints, steps_per_epoch, total_steps, score, started)
        state = loop.run(state, train_step, train_iter, batch_sharding)
        # ---- export ----
        if int(jax.device_get(state["step"])) == total_steps:
            _export(cfg, run_dir, model_cfg, state, loop.last_result, data_cfg, info)
        _report_unreadable()
        return 0
    finally:
        checkpoints.close()
        run_dir.plot()
        if hasattr(train_iter, "close"):
            train_iter.close()


def _compile(cfg: TrainConfig, plan, optimizer, optim_cfg, mesh, continuing: bool):
    """(state, train step, eval step): compiled ahead of the first batch (`startup.py`)."""
    train_step = None
    if not cfg.eval_only:
        mixing = Mixing(cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.seed)
        train_step = steps.make_train_step(
            plan.graphs, optimizer, optim_cfg, plan.shardings, mesh, mixing=mixing
        )
    eval_step = steps.make_eval_step(plan.graphs, plan.shardings, mesh)
    model_cfg = plan.graphs.config
    batch = functools.partial(steps.batch_spec, model_cfg, cfg.batch_size, cfg.image_size, mesh)
    shapes = plan.shapes
    eval_args = (shapes["params"], shapes["rest"], batch(eval=True), steps.eval_totals_spec(mesh))
    return startup.prepare(plan, train_step, (shapes, batch()), eval_step, eval_args,
                           build_state=not continuing)  # fmt: skip


def _restore(cfg: TrainConfig, run_dir: RunDir, checkpoints, state, plan, train_iter):
    state, step = checkpoints.restore(state, plan.shardings, train_iter)
    if run_dir.main:
        print(f"restored {run_dir.path} at step {step}", file=sys.stderr)
    if cfg.resume:
        run_dir.truncate_metrics(step)
    return state


def _export(cfg, run_dir: RunDir, model_cfg, state, result: dict, data_cfg, info) -> None:
    """model/: the better of the parameters and their moving average, self-describing."""
    which, accuracies = better_of(result)
    export_model(run_dir.model, model_cfg, state, cfg.dtype, which=which,
                 preprocessing=describe.preprocessing(data_cfg, info.channels),
                 class_names=info.class_names, note=accuracies)  # fmt: skip
    name = "ema" if which == "ema" else "raw"
    run_dir.record("exported", {"parameters": name, **accuracies})
    if accuracies and run_dir.main:
        raw, ema = accuracies["test_accuracy"], accuracies["ema_test_accuracy"]
        print(f"exported the {name} parameters (test accuracy: raw {raw:.4f}, ema {ema:.4f})",
              file=sys.stderr)  # fmt: skip


def _print_evaluation(result: dict, main: bool) -> None:
    result = {k: significant(v) for k, v in result.items()}  # the figures a run logs
    if main:
        print(f"test loss {result['test_loss']:.4f}")
        if "ema_test_accuracy" in result:
            print(f"moving average (EMA): test loss {result['ema_test_loss']:.4f}, test accuracy "
                  f"{result['ema_test_accuracy']:.4f}")  # fmt: skip
        print(f"final test accuracy: {result['test_accuracy']:.4f}")


def _report_unreadable() -> None:
    # Worker processes (--num-workers > 0) log their own finds as they meet them.
    for split_dir, paths in data.unreadable_images().items():
        shown = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
        print(f"skipped {len(paths)} unreadable image(s) in {split_dir}: {shown}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run; errors a user can cause become exit status 2 or 3."""
    # Orbax reports routine events through absl at INFO/WARNING; the run prints its own progress.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return run(parse_args(argv))
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, data.DataError, sharding.MeshError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
