"""Flags over TrainConfig (`settings.py`): every setting of a run from a recipe, files and flags.

Precedence, lowest first: the dataclass defaults, a `--recipe` (`recipes.py`), the run's saved
`config.json` (on `--resume` / `--eval-only`), `--config run.json`, then the flags given on the
command line. The resolved config is written to `runs/NAME/config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from sepvit_jax.train import recipes
from sepvit_jax.train.errors import ConfigError
from sepvit_jax.train.modelspec import model_config  # noqa: F401 (importable from here)
from sepvit_jax.train.settings import (  # noqa: F401 (importable from here)
    COMPUTE_DTYPES,
    DEFAULT_IMAGE_SIZE,
    TRANSIENT,
    TrainConfig,
)


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    kind = typing.get_type_hints(TrainConfig)[field.name]
    args = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    base = next(a for a in args if a is not type(None))
    if type(None) in args and (value is None or str(value).lower() == "none"):
        return None
    if field.name == "model" and isinstance(value, dict):
        return json.dumps(value)  # config.json writes a JSON model spec as an object
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


def read_json(path: str | Path) -> dict[str, Any]:
    """The settings of a JSON file (a run's config.json also records what it resolved to:
    that part is left out)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must hold a JSON object")
    data.pop("resolved", None)
    return data


def load_json(path: str | Path, base: TrainConfig) -> TrainConfig:
    return from_mapping(read_json(path), base, str(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train SepViT (default: digits, reaching >= 0.98 test accuracy).",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config
        epilog=recipes.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the recipes' lines
    )
    parser.add_argument("--config", help="a JSON file of settings (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=text)
        else:
            # A help text that already explains its default is not given a second one.
            shown = text if "default" in text else f"{text} (default {f.default})"
            parser.add_argument(flag, help=shown.replace("%", "%%"))
    return parser


def _saved_run(given: dict[str, Any]) -> Path | None:
    """The config.json of the run that --resume / --eval-only names (None: not such a call)."""
    if not (given.get("resume") or given.get("eval_only")):
        return None
    name = given.get("run_name")
    runs_dir = given.get("runs_dir", TrainConfig.runs_dir)
    if name is None:
        if given.get("resume"):
            raise ConfigError(
                "--resume needs --run-name NAME: the run (a directory under --runs-dir "
                f"{runs_dir}) to continue"
            )
        return None
    saved = Path(runs_dir, name, "config.json")
    if saved.is_file():
        return saved
    if given.get("resume"):
        raise ConfigError(f"--resume needs --run-name of an existing run; {saved} not found")
    return None


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags over `--config` over (with `--resume`) the run's saved config over a recipe over
    the defaults."""
    given = vars(build_parser().parse_args(argv))
    config_file = given.pop("config", None)
    layers = [("flags", given)]  # highest first
    if config_file:
        layers.append((str(config_file), read_json(config_file)))
    saved = _saved_run(given)
    if saved is not None:
        layers.append((str(saved), read_json(saved)))
    cfg = TrainConfig()
    above = {key for _, data in layers for key in data}
    recipe = next((data["recipe"] for _, data in layers if "recipe" in data), None)
    if recipe is not None and str(recipe).lower() != "none":
        try:
            cfg = from_mapping(recipes.values(str(recipe), above), cfg, f"--recipe {recipe}")
        except recipes.UnknownRecipe as err:
            raise ConfigError(str(err)) from None
    for source, data in reversed(layers):
        cfg = from_mapping(data, cfg, source)
    if cfg.recipe is not None and "lr" not in above:
        cfg = cfg.replace(lr=recipes.scaled_lr(cfg.batch_size))
    return cfg
