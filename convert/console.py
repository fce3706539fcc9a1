"""What the converter's commands print: timed steps and the config table."""

from __future__ import annotations

import importlib.util
import logging
import time

from sepvit_jax.core.config import format_value
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.infer import Resolved

_WINDOW_NOTE = " (upstream vit-pytorch always uses 7)"


class Step:
    """Prints `label ... done in 1.2 s` around a slow step (nothing when `quiet`)."""

    def __init__(self, label: str, *, quiet: bool = False):
        self.label, self.quiet = label, quiet

    def __enter__(self):
        if not self.quiet:
            print(f"{self.label} ...", end="", flush=True)
        self.start = time.perf_counter()

    def __exit__(self, exc_type, *_):
        if not self.quiet:
            seconds = time.perf_counter() - self.start
            print(" failed" if exc_type else f" done in {seconds:.1f} s", flush=True)


def require_torch(what: str, alternative: str = "") -> None:
    """Refuse, before any work, a command that needs torch where it is not installed."""
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(
            f"{what} needs torch: pip install 'sepvit-jax[torch]'"
            + (f" ({alternative})" if alternative else "")
        )


def quiet_orbax_logging() -> None:
    # Orbax logs every save through absl at INFO/WARNING; the CLI's own lines are the output.
    logging.getLogger("absl").setLevel(logging.ERROR)


def print_config(resolved: Resolved) -> None:
    rows = [(k, format_value(v), resolved.sources[k]) for k, v in resolved.config.to_dict().items()]
    rows.append(("dtype", resolved.dtype, resolved.sources["dtype"]))
    print("config:")
    print(f"  {'field':<12} {'value':<18} source")
    for field, value, source in rows:
        note = _WINDOW_NOTE if field == "window_size" and source == "default" else ""
        print(f"  {field:<12} {value:<18} {source}{note}")
