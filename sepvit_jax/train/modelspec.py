"""`--model`: a named variant with overrides, sizes alone, or a JSON object -> SepViTConfig."""

from __future__ import annotations

import json
from typing import Any

from sepvit_jax.core.config import CONFIGS, SepViTConfig
from sepvit_jax.train.errors import ConfigError


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
