"""One training run, top to bottom: hosts, mesh, data, model, state, steps, loop, export.

`main(argv)` is `train.py`. Exit status: 0 done (or stopped cleanly by a signal), 2 bad input
(one `error: ...` line on stderr), 3 the loss diverged (NaN/inf; the last good checkpoint kept).

Batches are NHWC (`image (B, H, W, C)`), B split over every device of the ("data", "fsdp")
mesh. Process 0 alone writes `config.json`, `metrics.jsonl`, `curves.png` and the exported
`model/`; every process takes part in the Orbax checkpoints (a multi-host run needs `runs_dir`
on a shared file system).

    runs/NAME/config.json     the TrainConfig (reusable with --config), plus what it resolved to
    runs/NAME/metrics.jsonl   one JSON row per log point (train loss/accuracy, test metrics, lr)
    runs/NAME/curves.png      loss and accuracy curves
    runs/NAME/checkpoints/    Orbax: train state + data iterator position, per step (--resume)
    runs/NAME/model/          the final model, `sepvit_jax.load`-able (`convert flax2torch`-able)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sepvit_jax import data as data_lib
from sepvit_jax import sharding
from sepvit_jax.allocator import reuse_freed_memory
from sepvit_jax.config import SepViTConfig
from sepvit_jax.train import plotting, steps
from sepvit_jax.train.checkpoints import Checkpoints
from sepvit_jax.train.config import ConfigError, TrainConfig, model_config, parse_args
from sepvit_jax.train.loop import Diverged, Loop, evaluate

# ---- hosts ---------------------------------------------------------------------------------


def _cluster_env() -> bool:
    """True when launched by something JAX's cluster detection understands (multi-process)."""
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or (env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1)
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def init_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize from the flags, or from the environment of a cluster."""
    if cfg.coordinator_address or cfg.num_processes:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    elif _cluster_env():
        jax.distributed.initialize()


def _same_on_every_process(text: str) -> str:
    """Process 0's `text` (e.g. a run name made from the clock), on every process."""
    if jax.process_count() == 1:
        return text
    encoded = np.frombuffer(text.encode().ljust(256, b"\0")[:256], np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(encoded)).rstrip(b"\0").decode()


# ---- run directory -------------------------------------------------------------------------


class RunDir:
    """runs/NAME/: config.json, metrics.jsonl, curves.png, model/ (process 0), checkpoints/."""

    def __init__(self, cfg: TrainConfig):
        default = f"{cfg.data}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        self.name = _same_on_every_process(cfg.run_name or default)
        self.path = Path(cfg.runs_dir) / self.name
        self.checkpoints = self.path / "checkpoints"
        self.main = jax.process_index() == 0

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(
            p.name.isdigit() for p in self.checkpoints.iterdir()
        )

    def saved_model(self) -> SepViTConfig:
        """The model a run was started with (its config.json), for --resume / --eval-only."""
        try:
            saved = json.loads((self.path / "config.json").read_text())
            return SepViTConfig.from_dict(saved["resolved"]["model"])
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"cannot read the model of run {self.path}: {err}") from None

    def start(self, cfg: TrainConfig, resolved: dict) -> None:
        """A new run: refuse to mix with an old one's checkpoints, write config.json."""
        if self.has_checkpoints():  # every process checks, so all stop together
            raise ConfigError(
                f"run directory {self.path} already has checkpoints; pass --resume to continue "
                "it or choose another --run-name"
            )
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            config = {**json.loads(cfg.to_json()), "resolved": resolved}
            (self.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (self.path / "metrics.jsonl").write_text("")

    def truncate_metrics(self, step: int) -> None:
        """On resume: forget the rows logged after the restored checkpoint."""
        metrics = self.path / "metrics.jsonl"
        if self.main and metrics.is_file():
            lines = metrics.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            metrics.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict) -> None:
        if self.main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        metrics = self.path / "metrics.jsonl"
        if self.main and metrics.is_file():
            rows = plotting.read_metrics(metrics)
            if rows:
                plotting.plot_curves(rows, self.path / "curves.png", title=self.name)


# ---- model ---------------------------------------------------------------------------------


def _init_from(path: str, data_classes: int, data_channels: int):
    """(model config, params) of a `convert torch2flax` output, with a fresh head if needed."""
    from sepvit_jax.checkpoint import load

    try:
        loaded = load(path, dtype="float32", param_dtype="float32")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--init-from {path}: {err}") from None
    src = loaded.config
    if src.channels != data_channels:
        raise ConfigError(
            f"--init-from {path}: the model takes {src.channels} input channels but the data "
            f"has {data_channels}"
        )
    params = nnx.state(loaded, nnx.Param)
    if data_classes != src.num_classes:
        # New classes: a zero-initialised head (as big_vision fine-tunes), the rest kept.
        fc = params["mlp_head"]["fc"]
        fc["kernel"].set_value(jnp.zeros((fc["kernel"].shape[0], data_classes), jnp.float32))
        fc["bias"].set_value(jnp.zeros((data_classes,), jnp.float32))
        if jax.process_index() == 0:
            print(
                f"--init-from {path}: new zero-initialised {data_classes}-class head (the "
                f"checkpoint has {src.num_classes} classes)",
                file=sys.stderr,
            )
    return src.replace(num_classes=data_classes), params


def resolve_model(cfg: TrainConfig, info, run_dir: RunDir, continuing: bool):
    """(SepViTConfig, initial params or None): the run's own, converted weights, or --model."""
    if continuing:
        return run_dir.saved_model(), None
    if cfg.init_from:
        return _init_from(cfg.init_from, info.num_classes, info.channels)
    return model_config(cfg.model, num_classes=info.num_classes, channels=info.channels), None


def export_model(directory: Path, model_cfg, state, dtype: str) -> None:
    """Writes the final parameters as a `sepvit_jax.save` directory (process 0 writes)."""
    from sepvit_jax.checkpoint import write_checkpoint

    # Every process joins the gather (parameters may be sharded across hosts).
    params = multihost_utils.process_allgather(nnx.to_pure_dict(state["params"]), tiled=True)
    if jax.process_index() == 0:
        write_checkpoint(
            directory,
            model_cfg,
            jax.tree.map(np.asarray, params),
            param_dtype="float32",
            dtype=dtype,
            source={
                "trained_by": "train.py",
                "run": str(directory.parent),
                "step": int(jax.device_get(state["step"])),
            },
            overwrite=True,
        )
        print(f"saved the final model to {directory}", file=sys.stderr)
    multihost_utils.sync_global_devices("sepvit_export_model")


# ---- the run -------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> int:
    init_distributed(cfg)
    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, cfg.grad_accum)
    if cfg.dtype not in steps.DTYPES:
        raise ConfigError(f"--dtype must be one of {list(steps.DTYPES)}, got {cfg.dtype!r}")
    # ---- data ----
    dcfg = data_lib.DataConfig(
        name=cfg.data,
        data_dir=cfg.data_dir,
        image_size=cfg.image_size,
        num_workers=cfg.num_workers,
        prefetch=cfg.prefetch,
        seed=cfg.seed,
        max_bad_fraction=cfg.max_bad_fraction,
    )
    info = data_lib.dataset_info(dcfg)
    spe = data_lib.steps_per_epoch(dcfg, cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    # ---- model ----
    run_dir = RunDir(cfg)
    continuing = cfg.resume or (cfg.eval_only and run_dir.has_checkpoints())
    if cfg.eval_only and not continuing and not cfg.init_from:
        raise ConfigError(
            f"--eval-only: run {run_dir.path} has no checkpoint; name a run with --run-name or "
            "give weights with --init-from"
        )
    if cfg.resume and not run_dir.has_checkpoints():
        raise ConfigError(f"--resume: no checkpoint to resume from in {run_dir.checkpoints}")
    model_cfg, init_params = resolve_model(cfg, info, run_dir, continuing)
    try:
        model_cfg.check_image_size(cfg.image_size, cfg.image_size)  # before anything compiles
    except ValueError as err:
        raise ConfigError(f"--image-size {cfg.image_size} does not fit the model: {err}") from None
    if cfg.stop_at_step is not None and cfg.stop_at_step > total and run_dir.main:
        print(f"note: --stop-at-step {cfg.stop_at_step} is past the end ({total})", file=sys.stderr)
    ocfg = steps.OptimConfig(
        lr=cfg.lr,
        warmup_steps=spe if cfg.warmup_steps < 0 else cfg.warmup_steps,
        total_steps=total,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_norm,
        label_smoothing=cfg.label_smoothing,
        min_lr_ratio=cfg.min_lr_ratio,
        grad_accum=cfg.grad_accum,
    )
    if not (continuing or cfg.eval_only):
        run_dir.start(cfg, _resolved(model_cfg, spe, ocfg, mesh))
    # ---- state and steps ----
    tx = steps.make_optimizer(ocfg)
    state, shardings, train_step, eval_step = build_state_and_steps(
        cfg, model_cfg, tx, ocfg, mesh, init_params, continuing
    )
    ckpts = Checkpoints(run_dir.checkpoints, keep=cfg.keep, create=not cfg.eval_only)
    train_iter = data_lib.train_iterator(
        dcfg,
        global_batch_size=cfg.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    try:
        if continuing:
            state, step = ckpts.restore(state, shardings, train_iter)
            if run_dir.main:
                print(f"restored {run_dir.path} at step {step}", file=sys.stderr)
            if cfg.resume:
                run_dir.truncate_metrics(step)
        bsharding = sharding.batch_sharding(mesh)
        if cfg.eval_only:
            result = evaluate(eval_step, state, dcfg, cfg.batch_size, bsharding)
            if run_dir.main:
                print(f"test loss {result['test_loss']:.4f}")
                print(f"final test accuracy: {result['test_accuracy']:.4f}")
            return 0
        if int(jax.device_get(state["step"])) >= total:
            if run_dir.main:
                print(f"run {run_dir.path} already finished at step {total}", file=sys.stderr)
            return 0
        # ---- loop ----
        if run_dir.main:
            plotting.preload()
        loop = Loop(cfg, run_dir, ckpts, spe, total)
        state = loop.run(state, train_step, eval_step, train_iter, dcfg, bsharding)
        # ---- export ----
        if int(jax.device_get(state["step"])) == total:
            export_model(run_dir.path / "model", model_cfg, state, cfg.dtype)
        _report_unreadable()
        return 0
    finally:
        ckpts.close()
        run_dir.plot()
        if hasattr(train_iter, "close"):
            train_iter.close()


def build_state_and_steps(cfg: TrainConfig, model_cfg, tx, ocfg, mesh, init_params, continuing):
    """(state, its shardings, compiled train step, eval step).

    Compilation is most of the start-up of a small run, and XLA compiles with the GIL released:
    the train step (the longest) is traced first and compiles in a worker thread while the main
    thread builds the initial state. On CPU the eval step compiles in the same worker after it,
    while the first steps run, and is waited for only at its first call (the end of the first
    epoch).
    `continuing`: the state is only abstract, a target to restore into.
    """
    model, abstract, shardings = steps.init_state(
        model_cfg, tx, mesh, seed=cfg.seed, dtype=cfg.dtype, params=init_params, abstract=True
    )
    train_batch = steps.batch_spec(model_cfg, cfg.batch_size, cfg.image_size, mesh)
    eval_batch = steps.batch_spec(model_cfg, cfg.batch_size, cfg.image_size, mesh, eval=True)
    totals = steps.eval_totals_spec(mesh)
    pool = ThreadPoolExecutor(1, thread_name_prefix="compile")  # one program at a time
    try:
        compiled_train = None
        if not cfg.eval_only:
            train_step = steps.make_train_step(model, tx, ocfg, shardings, mesh)
            compiled_train = pool.submit(train_step.lower(abstract, train_batch).compile)
        eval_step = steps.make_eval_step(model, shardings, mesh)
        lowered_eval = eval_step.lower(abstract["params"], abstract["rest"], eval_batch, totals)
        compiled_eval = pool.submit(lowered_eval.compile)
        state = abstract
        if not continuing:
            state = steps.init_state(
                model_cfg, tx, mesh, seed=cfg.seed, dtype=cfg.dtype, params=init_params
            )[1]
        train = compiled_train.result() if compiled_train else None
        if mesh.devices.flat[0].platform != "cpu":
            # On an accelerator XLA autotunes kernels on the device while compiling: not
            # alongside training steps.
            compiled_eval.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=False)
    return state, shardings, train, _CompiledLater(compiled_eval)


class _CompiledLater:
    """A compiled program still compiling: the first call waits for it (and re-raises its
    compilation error, if any)."""

    def __init__(self, future):
        self._future = future

    def __call__(self, *args):
        return self._future.result()(*args)


def _resolved(model_cfg: SepViTConfig, spe: int, ocfg: steps.OptimConfig, mesh) -> dict:
    """What the settings came to, recorded in config.json (the model is reused on --resume)."""
    return {
        "model": model_cfg.to_dict(),
        "steps_per_epoch": spe,
        "total_steps": ocfg.total_steps,
        "warmup_steps": ocfg.warmup_steps,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()[:8]],
    }


def _report_unreadable() -> None:
    # Worker processes (--num-workers > 0) log their own finds as they meet them.
    for split_dir, paths in data_lib.unreadable_images().items():
        shown = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
        print(f"skipped {len(paths)} unreadable image(s) in {split_dir}: {shown}", file=sys.stderr)


def exit_now(status: int) -> NoReturn:
    """Ends `python train.py` with `status`, skipping the interpreter's teardown when alone.

    speed: at exit JAX destroys its backends (compiled programs, the CPU client's thread pools)
    and Python collects every object: ~0.6 s of the 15 s default run, after the run has closed
    its checkpoints and data workers and written everything. With nothing left but the standard
    streams and logging to flush, a single-process run ends at once; a multi-process run exits
    normally, so that JAX's distributed runtime shuts down in step with its peers.
    """
    if jax.distributed.is_initialized() or jax.process_count() > 1:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # before the first step: see sepvit_jax.allocator
    # Orbax reports routine events through absl at INFO/WARNING; the run prints its own progress.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return run(parse_args(argv))
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, data_lib.DataError, sharding.MeshError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
