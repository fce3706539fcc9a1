"""The PNG of a run's curves: loss, accuracy and learning rate against the step (metrics.jsonl)."""

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
    """Writes a three-panel figure against the step: train and test loss, train and test
    accuracy (and the moving average's, when the run keeps one), the learning rate."""
    if _preloading is not None:
        _preloading.join()  # import matplotlib in one thread at a time
    # Lazy, and without pyplot (its import and backend set-up cost more than the drawing): a
    # bare Figure renders with the Agg canvas.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.5), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    panels = (
        (ax_loss, "loss", [("train_loss", "train"), ("test_loss", "test"),
                           ("ema_test_loss", "test (EMA)")]),
        (ax_acc, "accuracy", [("train_accuracy", "train"), ("test_accuracy", "test"),
                              ("ema_test_accuracy", "test (EMA)")]),
        (ax_lr, "learning rate", [("lr", None)]),
    )  # fmt: skip
    for ax, name, curves in panels:
        for key, label in curves:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=label)
        ax.set(xlabel="step", ylabel=name, title=name)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
