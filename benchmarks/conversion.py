"""Benchmark: time and peak memory of `convert torch2flax` on a full-size checkpoint.

Makes a random sepvit_base (90 M parameters, ~360 MB float32) torch state_dict with
`torch.save`, then runs the real CLI in a child process, the way a user runs it, and measures
the child's wall time (interpreter start and imports included) and its peak resident memory
(`ru_maxrss` from `os.wait4`, which reports that one child only). Targets: under 10 s, and a peak
under 3x the checkpoint's size.

    python -m benchmarks.conversion [--variant sepvit_base] [--repeat 3] [--workdir DIR]

One JSON line per run (the checkpoint is made once). Timings depend on the machine's load:
repeat, and report every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sepvit_jax.core.config import get_config
from sepvit_jax.core.table import torch_shapes

TARGET_SECONDS = 10.0
TARGET_RATIO = 3.0


def make_checkpoint(variant: str, path: Path, seed: int = 0) -> Path:
    """A torch.save'd state_dict of `variant` with random weights (no model is built)."""
    import torch

    rng = np.random.default_rng(seed)
    state = {
        key: torch.from_numpy(rng.standard_normal(shape, np.float32) * np.float32(0.02))
        for key, shape in torch_shapes(get_config(variant)).items()
    }
    torch.save(state, path)
    return path


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit status) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    # ru_maxrss is in kilobytes on Linux.
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def bench_conversion(
    variant: str = "sepvit_base", workdir: str | Path | None = None, repeat: int = 1
) -> list[dict]:
    """Convert a random `variant` checkpoint with the CLI `repeat` times; one dict per run."""
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ckpt = make_checkpoint(variant, Path(tmp) / f"{variant}.pt")
        file_mb = ckpt.stat().st_size / 2**20
        for run in range(repeat):
            out = f"{tmp}/out{run}"
            cmd = [sys.executable, "-m", "convert", "torch2flax", str(ckpt), "-o", out]
            seconds, peak_mb, status = run_measured(cmd)
            if status != 0:
                raise RuntimeError(f"conversion failed with exit status {status}: {' '.join(cmd)}")
            results.append(
                {
                    "variant": variant,
                    "run": run,
                    "file_mb": round(file_mb, 1),
                    "seconds": round(seconds, 2),
                    "peak_rss_mb": round(peak_mb, 1),
                    "ratio": round(peak_mb / file_mb, 2),
                    "within_targets": seconds < TARGET_SECONDS and peak_mb < TARGET_RATIO * file_mb,
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="sepvit_base")
    parser.add_argument("--repeat", type=int, default=1, help="conversions to time")
    parser.add_argument("--workdir", default=None, help="where the temporary files go")
    args = parser.parse_args()
    for result in bench_conversion(args.variant, args.workdir, args.repeat):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
