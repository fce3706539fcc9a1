"""What a run starts from, settled before anything compiles: the image size, whether it
continues a run, the model and its initial weights, and the record of it all in config.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.preprocessing import nearest_tiled_sizes
from sepvit_jax.train import describe
from sepvit_jax.train.config import DEFAULT_IMAGE_SIZE, ConfigError, TrainConfig, model_config
from sepvit_jax.train.rundir import RunDir
from sepvit_jax.train.weights import init_from


def image_size(cfg: TrainConfig, main: bool) -> TrainConfig:
    """`cfg` with the image size settled: the one given, else --init-from's record, else 56."""
    if cfg.image_size is not None:
        return cfg
    if not cfg.init_from:
        return cfg.replace(image_size=DEFAULT_IMAGE_SIZE)
    try:
        height, width = describe.recorded_image_size(cfg.init_from)
    except (CheckpointError, OSError) as err:
        raise ConfigError(f"--init-from {cfg.init_from}: {err}") from None
    if height != width:
        raise ConfigError(
            f"--init-from {cfg.init_from} records {height}x{width} images; training takes "
            "square ones: give --image-size"
        )
    if main:
        print(
            f"image size {height} from the preprocessing record of {cfg.init_from} "
            "(--image-size overrides it)",
            file=sys.stderr,
        )
    return cfg.replace(image_size=height)


def check_continuation(cfg: TrainConfig, run_dir: RunDir) -> bool:
    """Whether the run continues from its own checkpoint (--resume, or --eval-only of a run)."""
    continuing = cfg.resume or (cfg.eval_only and run_dir.has_checkpoints())
    if cfg.eval_only and not continuing and not cfg.init_from:
        raise ConfigError(
            f"--eval-only: run {run_dir.path} has no checkpoint; name a run with --run-name or "
            "give weights with --init-from"
        )
    if cfg.resume and not run_dir.has_checkpoints():
        raise ConfigError(f"--resume: no checkpoint to resume from in {run_dir.checkpoints}")
    if continuing:
        # Settings that change what the checkpoint holds cannot change on the way.
        saved = run_dir.saved_settings()
        for name in ("ema_decay", "drop_path_rate"):
            if (saved.get(name, 0.0) > 0) != (getattr(cfg, name) > 0):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} {getattr(cfg, name)}: run {run_dir.path} was started with {flag} "
                    f"{saved.get(name, 0.0)}, and its checkpoints hold what that implies"
                )
    return continuing


def model(cfg: TrainConfig, info, run_dir: RunDir, continuing: bool):
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
        near = " or ".join(map(str, nearest_tiled_sizes(model_cfg, cfg.image_size)))
        raise ConfigError(
            f"--image-size {cfg.image_size} does not fit the model: {err}; the nearest sizes "
            f"that tile: {near}"
        ) from None
    return model_cfg, params


def resolved(cfg, model_cfg: SepViTConfig, info, steps_per_epoch: int, optim_cfg, mesh) -> dict:
    """What the settings came to, recorded in config.json (the model is reused on --resume)."""
    end_lr = optim_cfg.lr * optim_cfg.min_lr_ratio if optim_cfg.min_lr is None else optim_cfg.min_lr
    return {
        "model": model_cfg.to_dict(),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": optim_cfg.total_steps,
        "warmup_steps": optim_cfg.warmup_steps,
        "final_lr": end_lr,
        "preprocessing": describe.preprocessing(cfg.data_config(), info.channels).to_dict(),
        "class_names": info.class_names,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()[:8]],
    }


def start(cfg: TrainConfig, run_dir: RunDir, model_cfg: SepViTConfig, resolved: dict) -> None:
    """A new run's config.json, naming the model that really runs."""
    if cfg.init_from:
        # Not --model but the architecture of the weights (reusable as a --model spec).
        cfg = cfg.replace(model=json.dumps(model_cfg.to_dict()))
        resolved = {**resolved, "init_from": str(Path(cfg.init_from).absolute())}
    run_dir.start(cfg, resolved)


def notes(cfg: TrainConfig, info, steps_per_epoch: int, total_steps: int) -> None:
    used = steps_per_epoch * cfg.batch_size
    if used < info.num_train:
        print(
            f"note: --batch-size {cfg.batch_size} does not divide the {info.num_train} training "
            f"images: each epoch trains on {used} and skips {info.num_train - used} (other ones "
            "each epoch: the order is reshuffled)",
            file=sys.stderr,
        )
    if cfg.stop_at_step is not None and cfg.stop_at_step > total_steps:
        print(f"note: --stop-at-step {cfg.stop_at_step} is past the end ({total_steps})",
              file=sys.stderr)  # fmt: skip
