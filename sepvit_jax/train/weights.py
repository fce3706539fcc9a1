"""Weights into and out of a run: `--init-from` a checkpoint directory, the final `model/`."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sepvit_jax.checkpoint import restore_params, write_checkpoint
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.preprocessing import Preprocessing
from sepvit_jax.train.config import ConfigError
from sepvit_jax.train.hosts import is_main


def init_from(path: str, num_classes: int, channels: int) -> tuple[SepViTConfig, dict]:
    """(model config, parameter tree) of a checkpoint directory, with a fresh head if needed.

    Every process reads the (host) parameters itself; `steps.plan_state` shards them.
    """
    try:
        config, _, params = restore_params(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--init-from {path}: {err}") from None
    if config.channels != channels:
        raise ConfigError(
            f"--init-from {path}: the model takes {config.channels} input channels but the data "
            f"has {channels}"
        )
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    if num_classes != config.num_classes:
        # New classes: a zero-initialised head (as big_vision fine-tunes), the rest kept.
        fc = params["mlp_head"]["fc"]
        fc["kernel"] = np.zeros((fc["kernel"].shape[0], num_classes), np.float32)
        fc["bias"] = np.zeros((num_classes,), np.float32)
        if is_main():
            print(
                f"--init-from {path}: new zero-initialised {num_classes}-class head (the "
                f"checkpoint has {config.num_classes} classes)",
                file=sys.stderr,
            )
    return config.replace(num_classes=num_classes), params


def export_model(
    directory: Path,
    config: SepViTConfig,
    state: dict,
    dtype: str,
    *,
    which: str = "params",
    preprocessing: Preprocessing | None = None,
    class_names: list[str] | None = None,
    note: dict | None = None,
) -> None:
    """Writes `state[which]` (the parameters, or their moving average "ema") as a
    `sepvit_jax.save` directory that describes its input and classes (process 0 writes).

    Args:
      preprocessing, class_names: what the model expects and predicts (sepvit.json).
      note: more to record in sepvit.json's "source" (e.g. the accuracies behind `which`).
    """
    # Every process joins the gather (parameters may be sharded across hosts).
    params = multihost_utils.process_allgather(nnx.to_pure_dict(state[which]), tiled=True)
    if is_main():
        write_checkpoint(
            directory,
            config,
            jax.tree.map(np.asarray, params),
            param_dtype="float32",
            dtype=dtype,
            source={
                "trained_by": "train.py",
                "run": str(directory.parent),
                "step": int(jax.device_get(state["step"])),
                "parameters": "ema" if which == "ema" else "raw",
                **(note or {}),
            },
            preprocessing=preprocessing,
            class_names=class_names,
            overwrite=True,
        )
        print(f"saved the final model to {directory}", file=sys.stderr)
    multihost_utils.sync_global_devices("sepvit_export_model")


def better_of(result: dict) -> tuple[str, dict]:
    """("params" or "ema", what decided it) from the last evaluation: the moving average only
    when its test accuracy is strictly higher."""
    if "ema_test_accuracy" not in result:
        return "params", {}
    raw, ema = result["test_accuracy"], result["ema_test_accuracy"]
    which = "ema" if ema > raw else "params"
    return which, {"test_accuracy": raw, "ema_test_accuracy": ema}
