"""Helpers of the training tests: small runs through `main` in this process, subprocess
environments, the exported parameters of a run, its metrics rows, generated image folders."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

import sepvit_jax
from sepvit_jax.train.run import main

ROOT = Path(__file__).resolve().parent.parent
# A small model and batch: 56x56 digits, 2x2 windows of 7 then one window.
SMALL = ["--model", "testing", "--batch-size", "16", "--image-size", "56"]


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), **extra)
    return env


def train(tmp_path: Path, name: str, *args: str) -> int:
    return main([*SMALL, "--runs-dir", str(tmp_path), "--run-name", name, *args])


def model_params(run_dir: Path) -> list[np.ndarray]:
    """The exported final parameters of a run, as numpy leaves in a fixed order."""
    model = sepvit_jax.load(run_dir / "model")
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


def max_abs_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def max_relative_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest difference relative to the largest magnitude of `b` (for small gradients)."""
    return max_abs_difference(a, b) / max(float(np.abs(x).max()) for x in b)


# Keys of a metrics row that measure this invocation's speed, not the training.
TIMING = ("time", "images_per_sec")


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_image_tree(root: Path, *, train_per_class=8, val_per_class=4, corrupt=0) -> Path:
    """Two classes of generated JPEGs (reddish vs bluish noise) and `corrupt` broken files."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for label, cls in enumerate(("red", "blue")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (40 + i, 48, 3), dtype=np.uint8)
                pixels[..., 0 if label == 0 else 2] += 120
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    for i in range(corrupt):
        (root / "train" / "red" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
