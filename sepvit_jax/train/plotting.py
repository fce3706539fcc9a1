"""The PNG of a run's curves: train loss and test accuracy against the step, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], out: str | Path, title: str = "") -> None:
    """Writes a two-panel figure: train loss (left) and test accuracy (right) per step."""
    import matplotlib  # lazy: ~0.5 s, only at the end of a run

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
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
    fig.tight_layout()
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
