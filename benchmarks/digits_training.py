"""Benchmark: the default training run (`python train.py`) against PyTorch doing the same job.

The reference is the recipe the training issue quotes for the upstream PyTorch SepViT: dim 32,
depth (1, 1), heads (1, 2), AdamW lr 2e-3 (torch's other defaults), batch 64, 12 epochs, plain
cross-entropy, on the same 56x56 digits and the same 360-image test split. It runs
`sepvit_torch.SepViT` (the same function and parameters as vit-pytorch's `SepViT`) eagerly on
all cores. Both sides are timed as whole processes, from interpreter start to exit: imports,
data preparation, JAX compilation, training, per-epoch evaluation and (for train.py) checkpoints,
curves and the exported model included.

    python -m benchmarks.digits_training [--repeats 3] [--json FILE]
    python -m benchmarks.digits_training --torch-only   # one PyTorch run, in this process

train.py keeps freed host memory for reuse (`sepvit_jax.train.allocator`); the third row gives
PyTorch the same setting, so that the comparison is of the frameworks, not of the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCHS, BATCH, LR = 12, 64, 2e-3


def torch_recipe(seed: int = 0) -> float:
    """Trains the upstream recipe with PyTorch; prints per-epoch accuracy, returns the last."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sepvit_jax.data import digits
    from sepvit_torch import SepViT, get_config

    torch.manual_seed(seed)
    splits = digits.arrays(56)
    train_x, train_y = (torch.from_numpy(a) for a in splits["train"])
    test_x, test_y = (torch.from_numpy(a) for a in splits["eval"])
    train_x, test_x = train_x.permute(0, 3, 1, 2).contiguous(), test_x.permute(0, 3, 1, 2)
    model = SepViT.from_config(get_config("digits"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(len(order) // BATCH):
            idx = order[i * BATCH : (i + 1) * BATCH]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(chunk).argmax(-1) for chunk in test_x.split(BATCH)])
        accuracy = float((predicted == test_y).float().mean())
        print(f"epoch {epoch + 1}/{EPOCHS}  test acc {accuracy:.4f}", flush=True)
    print(f"final test accuracy: {accuracy:.4f}")
    return float(np.float32(accuracy))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, final test accuracy) of one child process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    accuracy = float(re.findall(r"final test accuracy: (\d\.\d+)", proc.stdout)[-1])
    return seconds, accuracy


JAX = "sepvit_jax (python train.py), first run: empty compilation cache"
JAX_WARM = "sepvit_jax (python train.py), second run: programs from the cache"
TORCH = "sepvit_torch eager (upstream recipe)"
TORCH_REUSE = "sepvit_torch eager, freed memory reused as train.py does"


def compare(repeats: int) -> dict:
    rows = {JAX: [], JAX_WARM: [], TORCH: [], TORCH_REUSE: []}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    torch_cmd = [sys.executable, "-m", "benchmarks.digits_training", "--torch-only"]
    for r in range(repeats):  # interleaved, so that a busy spell hits every row alike
        # A fresh cache per repeat: the first run compiles everything (and writes the cache, as a
        # user's first run does), the second reads every program back.
        with tempfile.TemporaryDirectory() as runs, tempfile.TemporaryDirectory() as cache:
            for name, run_name in ((JAX, "first"), (JAX_WARM, "second")):
                cmd = [sys.executable, "train.py", "--runs-dir", runs, "--run-name", run_name]
                cmd += ["--compile-cache", cache]
                rows[name].append(timed(cmd, env))
        rows[TORCH].append(timed(torch_cmd, env))
        rows[TORCH_REUSE].append(timed([*torch_cmd, "--reuse-freed-memory"], env))
        print(f"repeat {r + 1}/{repeats}: {rows}", file=sys.stderr, flush=True)
    return {
        name: {
            "seconds_median": statistics.median(s for s, _ in runs),
            "seconds": [round(s, 2) for s, _ in runs],
            "final_accuracy": [a for _, a in runs],
        }
        for name, runs in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reuse-freed-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_only:
        if args.reuse_freed_memory:
            from sepvit_jax.train.allocator import reuse_freed_memory

            reuse_freed_memory()
        torch_recipe()
        return
    result = compare(args.repeats)
    print("| run | wall time, median (all runs) | final test accuracy |")
    print("|---|---|---|")
    for name, r in result.items():
        runs = ", ".join(f"{s:.1f}" for s in r["seconds"])
        accuracy = ", ".join(f"{a:.4f}" for a in r["final_accuracy"])
        print(f"| {name} | {r['seconds_median']:.1f} s ({runs}) | {accuracy} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
