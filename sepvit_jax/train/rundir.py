"""runs/NAME/: the run directory and the files process 0 writes there.

runs/NAME/config.json     the TrainConfig (reusable with --config), plus what it resolved to
                          ("resolved"; at the end also which parameters were exported)
runs/NAME/metrics.jsonl   one JSON row per log point: step, epoch, lr, train loss/accuracy/
                          gradient norm, test (and EMA) metrics at epoch ends, wall time since
                          the start of this invocation ("time", s) and training images/s since
                          the previous row; floats to 6 significant digits
runs/NAME/curves.png      loss, accuracy and learning-rate curves
runs/NAME/checkpoints/    Orbax: train state + data iterator position (`checkpoints.py`)
runs/NAME/model/          the final model, `sepvit_jax.load`-able (`weights.py`)
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.train import plotting
from sepvit_jax.train.config import ConfigError, TrainConfig
from sepvit_jax.train.hosts import is_main, same_on_every_process


class RunDir:
    """runs/NAME/: config.json, metrics.jsonl, curves.png, model/ (process 0), checkpoints/."""

    def __init__(self, cfg: TrainConfig):
        default = f"{cfg.data}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        self.name = same_on_every_process(cfg.run_name or default)
        self.path = Path(cfg.runs_dir) / self.name
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model"
        self.main = is_main()

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(
            p.name.isdigit() for p in self.checkpoints.iterdir()
        )

    def saved_settings(self) -> dict:
        """The run's config.json as saved ({} when there is none)."""
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return {}

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
            _write_json(self.path / "config.json", config)
            (self.path / "metrics.jsonl").write_text("")

    def record(self, key: str, value: Any) -> None:
        """Adds `key` to config.json's "resolved" (e.g. which parameters were exported)."""
        if self.main:
            config = json.loads((self.path / "config.json").read_text())
            config.setdefault("resolved", {})[key] = value
            _write_json(self.path / "config.json", config)

    def truncate_metrics(self, step: int) -> None:
        """On resume: forget the rows logged after the restored checkpoint."""
        metrics = self.path / "metrics.jsonl"
        if self.main and metrics.is_file():
            lines = metrics.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            metrics.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict) -> None:
        if self.main:
            rounded = {k: significant(v) for k, v in row.items()}
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rounded) + "\n")

    def plot(self) -> None:
        metrics = self.path / "metrics.jsonl"
        if self.main and metrics.is_file():
            rows = plotting.read_metrics(metrics)
            if rows:
                plotting.plot_curves(rows, self.path / "curves.png", title=self.name)


def significant(value: Any, digits: int = 6) -> Any:
    """Floats to `digits` significant digits (float32 metrics carry about 7): as logged, and
    as printed (so that a printed figure is the logged one's, never rounded twice)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader never sees half a config.json."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
