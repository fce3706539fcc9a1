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

import jax

from sepvit_jax import data, sharding
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.train import hosts, plotting, startup, steps
from sepvit_jax.train.checkpoints import Checkpoints
from sepvit_jax.train.config import ConfigError, TrainConfig, model_config, parse_args
from sepvit_jax.train.loop import Diverged, Loop, evaluate
from sepvit_jax.train.optim import make_optimizer
from sepvit_jax.train.rundir import RunDir
from sepvit_jax.train.weights import export_model, init_from


def run(cfg: TrainConfig) -> int:
    cfg.check()
    # ---- hosts ----
    hosts.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, cfg.grad_accum)
    # ---- data ----
    data_cfg = cfg.data_config()
    info = data.dataset_info(data_cfg)
    steps_per_epoch = data.steps_per_epoch(data_cfg, cfg.batch_size)
    total_steps = cfg.total_steps(steps_per_epoch)
    batch_sharding = sharding.batch_sharding(mesh)
    # ---- model and state ----
    run_dir = RunDir(cfg)
    continuing = _check_continuation(cfg, run_dir)
    model_cfg, given_params = _model(cfg, info, run_dir, continuing)
    if cfg.stop_at_step is not None and cfg.stop_at_step > total_steps and run_dir.main:
        print(
            f"note: --stop-at-step {cfg.stop_at_step} is past the end ({total_steps})",
            file=sys.stderr,
        )
    optim_cfg = cfg.optim_config(steps_per_epoch)
    if not (continuing or cfg.eval_only):
        run_dir.start(cfg, _resolved(model_cfg, steps_per_epoch, optim_cfg, mesh))
    optimizer = make_optimizer(optim_cfg)
    plan = steps.plan_state(
        model_cfg, optimizer, mesh, seed=cfg.seed, dtype=cfg.dtype, params=given_params
    )
    # ---- steps ----
    train_step = None
    if not cfg.eval_only:
        train_step = steps.make_train_step(plan.graphs, optimizer, optim_cfg, plan.shardings, mesh)
    eval_step = steps.make_eval_step(plan.graphs, plan.shardings, mesh)
    batch = functools.partial(steps.batch_spec, model_cfg, cfg.batch_size, cfg.image_size, mesh)
    state, train_step, eval_step = startup.prepare(
        plan,
        train_step,
        (plan.shapes, batch()),
        eval_step,
        (
            plan.shapes["params"],
            plan.shapes["rest"],
            batch(eval=True),
            steps.eval_totals_spec(mesh),
        ),
        build_state=not continuing,
    )
    score = functools.partial(evaluate, eval_step, data_cfg=data_cfg, batch_size=cfg.batch_size,
                              batch_sharding=batch_sharding)  # fmt: skip
    checkpoints = Checkpoints(run_dir.checkpoints, keep=cfg.keep, create=not cfg.eval_only)
    train_iter = data.train_iterator(
        data_cfg,
        global_batch_size=cfg.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    try:
        if continuing:
            state, step = checkpoints.restore(state, plan.shardings, train_iter)
            if run_dir.main:
                print(f"restored {run_dir.path} at step {step}", file=sys.stderr)
            if cfg.resume:
                run_dir.truncate_metrics(step)
        if cfg.eval_only:
            _print_evaluation(score(state), run_dir.main)
            return 0
        if int(jax.device_get(state["step"])) >= total_steps:
            if run_dir.main:
                print(f"run {run_dir.path} already finished at step {total_steps}", file=sys.stderr)
            return 0
        # ---- loop ----
        if run_dir.main:
            plotting.preload()
        loop = Loop(cfg, run_dir, checkpoints, steps_per_epoch, total_steps, score)
        state = loop.run(state, train_step, train_iter, batch_sharding)
        # ---- export ----
        if int(jax.device_get(state["step"])) == total_steps:
            export_model(run_dir.model, model_cfg, state, cfg.dtype)
        _report_unreadable()
        return 0
    finally:
        checkpoints.close()
        run_dir.plot()
        if hasattr(train_iter, "close"):
            train_iter.close()


def _check_continuation(cfg: TrainConfig, run_dir: RunDir) -> bool:
    """Whether the run continues from its own checkpoint (--resume, or --eval-only of a run)."""
    continuing = cfg.resume or (cfg.eval_only and run_dir.has_checkpoints())
    if cfg.eval_only and not continuing and not cfg.init_from:
        raise ConfigError(
            f"--eval-only: run {run_dir.path} has no checkpoint; name a run with --run-name or "
            "give weights with --init-from"
        )
    if cfg.resume and not run_dir.has_checkpoints():
        raise ConfigError(f"--resume: no checkpoint to resume from in {run_dir.checkpoints}")
    return continuing


def _model(cfg: TrainConfig, info, run_dir: RunDir, continuing: bool):
    """(SepViTConfig, initial parameters or None): the run's own, --init-from's, or --model's."""
    if continuing:
        model_cfg, params = run_dir.saved_model(), None
    elif cfg.init_from:
        model_cfg, params = init_from(cfg.init_from, info.num_classes, info.channels)
    else:
        model_cfg = model_config(cfg.model, num_classes=info.num_classes, channels=info.channels)
        params = None
    try:
        model_cfg.check_image_size(cfg.image_size, cfg.image_size)  # before anything compiles
    except ValueError as err:
        raise ConfigError(f"--image-size {cfg.image_size} does not fit the model: {err}") from None
    return model_cfg, params


def _resolved(model_cfg: SepViTConfig, steps_per_epoch: int, optim_cfg, mesh) -> dict:
    """What the settings came to, recorded in config.json (the model is reused on --resume)."""
    return {
        "model": model_cfg.to_dict(),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": optim_cfg.total_steps,
        "warmup_steps": optim_cfg.warmup_steps,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()[:8]],
    }


def _print_evaluation(result: dict, main: bool) -> None:
    if main:
        print(f"test loss {result['test_loss']:.4f}")
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
