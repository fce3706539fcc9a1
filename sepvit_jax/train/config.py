"""TrainConfig: every setting of a training run, one frozen dataclass, with flags over it.

Precedence, lowest first: the dataclass defaults, the run's saved `config.json` (on `--resume`),
`--config run.json`, then flags given on the command line. The resolved config is written to
`runs/NAME/config.json`.

The default reproduces the README's main job (`python train.py`): the `digits` SepViT on
scikit-learn's 8x8 digits upsampled to 56x56, 8 epochs of batch 32, test accuracy >= 0.98.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from sepvit_jax.core.config import CONFIGS, SepViTConfig
from sepvit_jax.data import DataConfig
from sepvit_jax.train.optim import OptimConfig

# Settings that only steer this invocation (or this process) and are not saved with the run.
TRANSIENT = (
    "resume",
    "eval_only",
    "stop_at_step",
    "config",
    "coordinator_address",
    "num_processes",
    "process_id",
)


# Compute dtypes of a run (parameters are always float32).
COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A setting that cannot work, with a message for the user."""


def _setting(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one run; each field is the flag `--field-name` (see `python train.py -h`)."""

    # ---- model and data ----
    model: str = _setting(
        "digits",
        "a named variant (" + ", ".join(CONFIGS) + "), optionally with overrides "
        "('digits,dim=48,depth=2-2'; tuples with '-'), or sizes alone "
        "('dim=32,depth=1-1,heads=1-2'), or a JSON object; num_classes and channels come "
        "from the data",
    )
    data: str = _setting("digits", "digits | imagefolder | synthetic")
    data_dir: str | None = _setting(None, "imagefolder root holding train/CLASS/* and val/CLASS/*")
    image_size: int = _setting(56, "side of the square images the model sees")
    num_workers: int = _setting(0, "Grain worker processes (0: read in this process)")
    prefetch: int = _setting(2, "batches read ahead (per worker)")
    max_bad_fraction: float = _setting(
        0.01, "abort once more than this fraction of an imagefolder split is unreadable"
    )
    # ---- optimisation ----
    batch_size: int = _setting(32, "global batch: all devices and processes together")
    epochs: int = _setting(8, "length of the run in epochs")
    steps: int | None = _setting(None, "length of the run in steps (overrides --epochs)")
    lr: float = _setting(2e-3, "peak learning rate of AdamW")
    warmup_steps: int = _setting(-1, "linear warm-up steps (-1: one epoch), then cosine decay")
    weight_decay: float = _setting(
        0.05, "AdamW decoupled weight decay (not on norms, biases, window tokens)"
    )
    clip_norm: float = _setting(1.0, "global gradient-norm clip (0: off)")
    label_smoothing: float = _setting(0.1, "label smoothing of the training loss")
    min_lr_ratio: float = _setting(0.0, "final learning rate as a fraction of --lr")
    grad_accum: int = _setting(1, "micro-batches per step (gradients averaged)")
    dtype: str = _setting(
        "float32", f"compute dtype: {' | '.join(COMPUTE_DTYPES)} (parameters float32)"
    )
    # ---- devices ----
    mesh: str = _setting("data=-1,fsdp=1", "device mesh axes (-1: the remaining devices)")
    seed: int = _setting(0, "seed of the initialisation, dropout and data order")
    # ---- run directory and checkpoints ----
    runs_dir: str = _setting("runs", "where run directories go")
    run_name: str | None = _setting(None, "the run directory's name (default: data and time)")
    checkpoint_every: int = _setting(
        0, "steps between checkpoints (0: at epoch ends, at least a minute apart)"
    )
    keep: int = _setting(2, "checkpoints kept: the last N, plus the best N by test accuracy")
    log_every: int = _setting(
        0, "steps between logged training metrics (0: every epoch, at most 100 steps apart)"
    )
    init_from: str | None = _setting(
        None, "start from a `convert torch2flax` (or `sepvit_jax.save`) directory"
    )
    eval_only: bool = _setting(False, "evaluate --run-name's latest checkpoint (or --init-from)")
    resume: bool = _setting(False, "continue --run-name from its latest checkpoint, exactly")
    stop_at_step: int | None = _setting(
        None, "stop and checkpoint at this step; the schedule is unchanged"
    )
    # ---- several hosts (otherwise read from the cluster's environment, if any) ----
    coordinator_address: str | None = _setting(None, "host:port of process 0")
    num_processes: int | None = _setting(None, "number of processes of a multi-host run")
    process_id: int | None = _setting(None, "this process's index in a multi-host run")

    def to_json(self) -> str:
        return json.dumps(
            {k: v for k, v in dataclasses.asdict(self).items() if k not in TRANSIENT}, indent=2
        )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def data_config(self) -> DataConfig:
        return DataConfig(
            name=self.data,
            data_dir=self.data_dir,
            image_size=self.image_size,
            num_workers=self.num_workers,
            prefetch=self.prefetch,
            seed=self.seed,
            max_bad_fraction=self.max_bad_fraction,
        )

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def optim_config(self, steps_per_epoch: int) -> OptimConfig:
        return OptimConfig(
            lr=self.lr,
            warmup_steps=steps_per_epoch if self.warmup_steps < 0 else self.warmup_steps,
            total_steps=self.total_steps(steps_per_epoch),
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            label_smoothing=self.label_smoothing,
            min_lr_ratio=self.min_lr_ratio,
            grad_accum=self.grad_accum,
        )

    def check(self) -> None:
        """Raise ConfigError for settings that cannot work whatever the data and devices."""
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--dtype must be one of {list(COMPUTE_DTYPES)}, got {self.dtype!r}")


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    kind = typing.get_type_hints(TrainConfig)[field.name]
    args = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    base = next(a for a in args if a is not type(None))
    if type(None) in args and (value is None or str(value).lower() == "none"):
        return None
    if base is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{source}: {field.name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    try:
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: {field.name} must be {base.__name__}, got {value!r}"
        ) from None


def from_mapping(data: dict[str, Any], base: TrainConfig, source: str) -> TrainConfig:
    """`base` with the entries of `data` (from JSON or flags) applied, type-checked."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown settings {unknown}")
    return base.replace(**{k: _coerce(fields[k], v, source) for k, v in data.items()})


def load_json(path: str | Path, base: TrainConfig) -> TrainConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must hold a JSON object")
    data.pop("resolved", None)  # a run's config.json also records what it resolved to
    return from_mapping(data, base, str(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train SepViT (default: digits, reaching >= 0.98 test accuracy).",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config
    )
    parser.add_argument("--config", help="a JSON file of settings (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, help=f"{f.metadata['help']} (default {f.default})")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags over `--config` over (with `--resume`) the run's saved config over the defaults."""
    given = vars(build_parser().parse_args(argv))
    config_file = given.pop("config", None)
    cfg = TrainConfig()
    if given.get("resume") or given.get("eval_only"):
        saved = Path(given.get("runs_dir", cfg.runs_dir), str(given.get("run_name")), "config.json")
        if given.get("run_name") and saved.is_file():
            cfg = load_json(saved, cfg)
        elif given.get("resume"):
            raise ConfigError(f"--resume needs --run-name of an existing run; {saved} not found")
    if config_file:
        cfg = load_json(config_file, cfg)
    return from_mapping(given, cfg, "flags")


def _parse_value(text: str) -> Any:
    if "-" in text.strip("-"):
        try:
            return tuple(int(v) for v in text.split("-"))
        except ValueError:
            raise ConfigError(f"--model value {text!r}: a tuple is ints joined by '-'") from None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def model_config(spec: str, *, num_classes: int, channels: int) -> SepViTConfig:
    """Resolves `--model` (name[,k=v...] | k=v,... | JSON) for the data's classes and channels."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            values = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--model {spec!r} is not valid JSON: {err}") from None
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        values = {}
        if parts and "=" not in parts[0]:
            name = parts.pop(0)
            if name not in CONFIGS:
                raise ConfigError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
            values = CONFIGS[name].to_dict()
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"--model entry {part!r} is not key=value")
            values[key.strip()] = _parse_value(value.strip())
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    values.update(num_classes=num_classes, channels=channels)
    if isinstance(values.get("depth"), int):
        values["depth"] = (values["depth"],)
    try:
        return SepViTConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--model {spec!r}: {err}") from None
