"""The PNG of a run's curves: train loss and test accuracy against the step, from metrics.jsonl."""

from __future__ import annotations

import json
import threading
from pathlib import Path

_preloading: threading.Thread | None = None


def preload() -> threading.Thread:
    """Imports matplotlib in a background thread (0.3 s), e.g. while the first steps run, so
    that drawing the curves at the end of a run does not wait for it."""

    def load():
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

    global _preloading
    _preloading = threading.Thread(target=load, name="preload-matplotlib", daemon=True)
    _preloading.start()
    return _preloading


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], out: str | Path, title: str = "") -> None:
    """Writes a two-panel figure: train loss (left) and test accuracy (right) per step."""
    if _preloading is not None:
        _preloading.join()  # import matplotlib in one thread at a time
    # Lazy, and without pyplot (its import and backend set-up cost more than the drawing): a
    # bare Figure renders with the Agg canvas.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    train = [r for r in rows if "train_loss" in r]
    test = [r for r in rows if "test_accuracy" in r]
    ax_loss.plot([r["step"] for r in train], [r["train_loss"] for r in train], marker=".")
    ax_loss.set(xlabel="step", ylabel="train loss", title="loss")
    ax_acc.plot([r["step"] for r in test], [r["test_accuracy"] for r in test], marker=".")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
