"""The SepViT training run, top to bottom: hosts -> mesh -> data -> state -> steps -> loop.

`main(argv)` is `train.py`; bad input ends it with `error: ...` on stderr and exit status 2.

Batches are NHWC (`image (B, H, W, C)`), B split over every device of the ("data", "fsdp")
mesh. Python does no per-step work beyond feeding the batch: metrics stay on device and are
fetched once per log interval, where non-finite losses are caught before anything is saved.
Process 0 alone writes `config.json`, `metrics.jsonl` and `curves.png`; every process takes part
in the Orbax checkpoints (a multi-host run needs `runs_dir` on a shared file system).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sepvit_jax import data as data_lib
from sepvit_jax import sharding, training
from sepvit_jax.train_checkpoint import Checkpoints
from sepvit_jax.train_config import TrainConfig, model_config, parse_args
from sepvit_jax.train_loop import Diverged, Loop

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


# ---- run directory -------------------------------------------------------------------------


class RunDir:
    """runs/NAME/: config.json, metrics.jsonl, curves.png (process 0 writes), checkpoints/."""

    def __init__(self, cfg: TrainConfig, resolved: dict):
        name = cfg.run_name or f"{cfg.data}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        self.name = name
        self.path = Path(cfg.runs_dir) / name
        self.main = jax.process_index() == 0
        if self.main and not (cfg.resume or cfg.eval_only):
            if (self.path / "checkpoints").exists() and any((self.path / "checkpoints").iterdir()):
                raise ValueError(
                    f"run directory {self.path} already has checkpoints; pass --resume to "
                    "continue it or choose another --run-name"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            (self.path / "metrics.jsonl").write_text("")
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        if self.main:
            self.rows.append(row)
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        if self.main and self.path.is_dir():
            from sepvit_jax.plotting import plot_curves, read_metrics

            rows = read_metrics(self.path / "metrics.jsonl")
            if rows:
                plot_curves(rows, self.path / "curves.png", title=self.name)


# ---- state ---------------------------------------------------------------------------------


def _init_from(path: str, data_classes: int, data_channels: int):
    """(model config, params) of a `convert torch2flax` output, with a fresh head if needed."""
    from flax import nnx

    import sepvit_jax

    loaded = sepvit_jax.load(path)
    src_cfg = loaded.config
    if src_cfg.channels != data_channels:
        raise ValueError(
            f"--init-from {path}: the model takes {src_cfg.channels} input channels but the "
            f"data has {data_channels}"
        )
    params = nnx.state(loaded, nnx.Param)
    cfg = src_cfg.replace(num_classes=data_classes)
    if data_classes != src_cfg.num_classes:
        # New classes: a zero-initialised head (as big_vision's fine-tuning), the rest kept.
        fc = params["mlp_head"]["fc"]
        fc["kernel"].set_value(jnp.zeros((fc["kernel"].shape[0], data_classes), jnp.float32))
        fc["bias"].set_value(jnp.zeros((data_classes,), jnp.float32))
        print(
            f"--init-from: new {data_classes}-class head (checkpoint had {src_cfg.num_classes})",
            file=sys.stderr,
        )
    return cfg, params


# ---- evaluation ----------------------------------------------------------------------------


def evaluate(eval_step, state, dcfg, batch_size: int, bsharding) -> dict:
    totals = jax.device_put(jnp.zeros(3, jnp.float32), sharding.replicated(bsharding.mesh))
    for local in data_lib.eval_batches(
        dcfg,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = sharding.global_batch(local, bsharding)
        totals = eval_step(state["params"], state["rest"], batch, totals)
    correct, loss, count = np.asarray(jax.device_get(totals), np.float64)
    return {"test_accuracy": correct / count, "test_loss": loss / count}


# ---- the run -------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> int:
    init_distributed(cfg)
    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, cfg.grad_accum)
    if cfg.dtype not in training.DTYPES:
        raise ValueError(f"--dtype must be one of {list(training.DTYPES)}, got {cfg.dtype!r}")
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
    if cfg.data == "imagefolder" and (info.num_train == 0 or info.num_eval == 0):
        raise data_lib.DataError(f"imagefolder {cfg.data_dir} has no images in train or val")
    init_params = None
    if cfg.init_from and not cfg.resume:
        model_cfg, init_params = _init_from(cfg.init_from, info.num_classes, info.channels)
    else:
        model_cfg = model_config(cfg.model, num_classes=info.num_classes, channels=info.channels)
    model_cfg.check_image_size(cfg.image_size, cfg.image_size)  # before anything compiles
    spe = data_lib.steps_per_epoch(dcfg, cfg.batch_size)
    total = cfg.steps or cfg.epochs * spe
    warmup = spe if cfg.warmup_steps < 0 else cfg.warmup_steps
    ocfg = training.OptimConfig(
        lr=cfg.lr,
        warmup_steps=warmup,
        total_steps=total,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_norm,
        label_smoothing=cfg.label_smoothing,
        min_lr_ratio=cfg.min_lr_ratio,
        grad_accum=cfg.grad_accum,
    )
    resolved = {**json.loads(cfg.to_json()), "resolved_model": model_cfg.to_dict(),
                "steps_per_epoch": spe, "total_steps": total, "warmup_steps": warmup,
                "mesh_shape": dict(mesh.shape), "process_count": jax.process_count()}  # fmt: skip
    run_dir = RunDir(cfg, resolved)
    # ---- state ----
    tx = training.make_optimizer(ocfg)
    model, state, shardings = training.init_state(
        model_cfg, tx, mesh, seed=cfg.seed, dtype=cfg.dtype, params=init_params,
        abstract=cfg.resume or (cfg.eval_only and not cfg.init_from))  # fmt: skip
    ckpts = Checkpoints(run_dir.path / "checkpoints", keep=cfg.keep)
    train_iter = data_lib.train_iterator(
        dcfg,
        global_batch_size=cfg.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if cfg.resume or (cfg.eval_only and not cfg.init_from):
        if ckpts.latest_step() is None:
            raise ValueError(f"no checkpoint to resume from in {run_dir.path / 'checkpoints'}")
        state, step = ckpts.restore(state, shardings, train_iter)
        print(f"restored {run_dir.path} at step {step}", file=sys.stderr)
    # ---- steps ----
    bsharding = sharding.batch_sharding(mesh)
    eval_step = training.make_eval_step(model, shardings, mesh)
    try:
        if cfg.eval_only:
            result = evaluate(eval_step, state, dcfg, cfg.batch_size, bsharding)
            run_dir.log({"step": int(jax.device_get(state["step"])), **result})
            print(f"final test accuracy: {result['test_accuracy']:.4f}")
            return 0
        train_step = training.make_train_step(model, tx, ocfg, shardings, mesh)
        loop = Loop(cfg, run_dir, ckpts, spe, total, training.make_schedule(ocfg))
        return loop.run(state, train_step, eval_step, train_iter, dcfg, bsharding)
    finally:
        ckpts.close()
        run_dir.plot()
        if hasattr(train_iter, "close"):
            train_iter.close()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        return run(cfg)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
