"""Shared test helpers: the golden fixtures, layout conversion, relative-error checks, PyTorch
checkpoint files (the convert.io tests), and the converter CLI (the convert CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.cli import main
from sepvit_jax.checkpoint import directory_state_dict
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.infer import CONFIG_FIELDS

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_CASES = ("two_stage_56", "three_stage_112", "rect_gray")


def load_golden(case: str) -> tuple[SepViTConfig, dict[str, np.ndarray]]:
    """The config and the arrays of one upstream golden fixture (float64)."""
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    with np.load(FIXTURES / f"{case}.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    return SepViTConfig.from_dict(meta["sepvit_kwargs"]), arrays


def golden_params(arrays: dict[str, np.ndarray], prefix: str = "param/") -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected|; an all-zero `expected` must be matched exactly."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    diff = np.abs(actual - expected).max()
    if scale == 0:
        return float("inf") if diff > 0 else 0.0
    return float(diff / scale)


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


# ---- PyTorch checkpoint files --------------------------------------------------------------


def fixture_sd(case: str = "two_stage_56") -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)


def fixture_config(case: str):
    from sepvit_jax.core.infer import infer_config

    return infer_config(fixture_sd(case))


def assert_same(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    # Key order is only compared where the format keeps it (safetensors sorts its keys).
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert isinstance(got[k], np.ndarray), k
        assert got[k].dtype == t.numpy().dtype, k
        np.testing.assert_array_equal(got[k], t.numpy(), err_msg=k)


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# Module-level, so that pickle finds it by name (tests.helpers.Tree).
class Tree(torch.nn.Module):
    """A module whose state_dict has exactly the keys and shapes of a given state_dict."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        for key, value in (state or {}).items():
            node = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, Tree())
                node = getattr(node, part)
            node.register_parameter(leaf, torch.nn.Parameter(value.clone()))


# ---- the converter CLI ---------------------------------------------------------------------

BIN = Path(sys.executable).parent


def run(*args, script: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The CLI in a child process: a console script from the venv, or `python -m convert`."""
    if script is None:
        cmd = [sys.executable, "-m", "convert"]
    else:
        exe = BIN / script
        if not exe.exists():
            pytest.skip(f"console script {script} is not installed next to {sys.executable}")
        cmd = [str(exe)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env
    )


def cli(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_failed(status: int, err: str, *fragments: str, expected: int = 2) -> str:
    """Exit `expected`, exactly one `error:` line (besides `warning:` lines), no traceback."""
    assert status == expected, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def config_table(stdout: str) -> dict[str, tuple[str, str]]:
    """The printed config: field -> (value, source)."""
    fields = {*CONFIG_FIELDS, "dtype"}
    rows = [line.split() for line in stdout.splitlines()]
    return {r[0]: (r[1], r[2]) for r in rows if len(r) >= 3 and r[0] in fields}


def listing(directory: Path) -> list[str]:
    """Every entry, hidden temporaries included."""
    return sorted(os.listdir(directory))


def converted_state_dict(directory: Path) -> dict[str, np.ndarray]:
    return directory_state_dict(directory)[1]


def assert_bitwise(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        value = np.asarray(got[key])
        assert value.dtype == expected.dtype, (key, value.dtype, expected.dtype)
        assert np.array_equal(value, expected), key


# ---- data pipelines --------------------------------------------------------------------------


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)
