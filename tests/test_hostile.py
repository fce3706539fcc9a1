"""Hostile checkpoints: every file the converter reads is refused, or read, in bounded time.

Each case is crafted small on disk (deflated runs, shared pickle references, patched zip records)
the way an attacker would, then given to the real CLI in a child process (`convert inspect`, and
`convert torch2flax` for the main ones): exit status 2, exactly one `error: ...` line on stderr
naming the problem, no traceback, and seconds instead of minutes. The measured wall and CPU times
are printed (`pytest -s`). Before the bounds, the first case (a user's 292 KB `.pt` whose
data.pkl inflated to 300 MB of one-byte strings after an `os.system` GLOBAL) kept `convert inspect`
busy for 900 s at 1.26 GB; its 20-million-opcode version here, the nested-tuple key and the shared
dicts each ran past minutes, the hash flood took 91 s, the expanded view 29 s at 5.5 GB. Now each
is refused in the time it takes to import torch. Legitimate checkpoints, wrapped with many small
optimizer tensors and an argparse.Namespace, still load.
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepvit_jax.core.torch_io import read_state_dict
from tests.hostile_files import CASES, FIXTURE

ROOT = Path(__file__).resolve().parent.parent
# Wall time on a loaded 2-core machine (torch2flax alone imports JAX and torch: ~10-20 s there);
# CPU time of the child, which load does not inflate.
MAX_WALL_S, MAX_CPU_S = 60, 20


# ---- running the CLI -----------------------------------------------------------------------


def run_cli(*args) -> tuple[subprocess.CompletedProcess, float, float]:
    """`python -m convert ARGS` in a child; (result, wall seconds, child CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return result, wall, cpu


def assert_refused(result, wall: float, cpu: float, pattern: str, label: str) -> None:
    print(f"\n{label}: exit {result.returncode}, {wall:.1f} s wall, {cpu:.1f} s CPU")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert wall < MAX_WALL_S and cpu < MAX_CPU_S, (wall, cpu)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    return {name: build(tmp) for name, (build, _, _) in CASES.items()}


def test_hostile_files_are_small_on_disk(crafted):
    for name, path in crafted.items():
        assert path.stat().st_size < 7_000_000, (name, path.stat().st_size)


@pytest.mark.parametrize("name", CASES)
def test_inspect_refuses_quickly(crafted, name):
    _, pattern, _ = CASES[name]
    result, wall, cpu = run_cli("inspect", crafted[name])
    assert_refused(result, wall, cpu, pattern, f"inspect {name}")


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[2]])
def test_torch2flax_refuses_quickly(crafted, name, tmp_path):
    _, pattern, _ = CASES[name]
    out = tmp_path / "out"
    result, wall, cpu = run_cli("torch2flax", crafted[name], "-o", out)
    assert_refused(result, wall, cpu, pattern, f"torch2flax {name}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- legitimate files still load -------------------------------------------------------------


def test_fixture_still_inspects():
    result, wall, cpu = run_cli("inspect", FIXTURE)
    print(f"\ninspect fixture: {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr


def _wrapped(sd: dict) -> dict:
    """A training checkpoint: weights, an AdamW-like state of 3,000 small tensors, arguments."""
    optimizer = {
        "state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(4),
                      "exp_avg_sq": torch.zeros(4)} for i in range(1000)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(1000))}],
    }  # fmt: skip
    args = argparse.Namespace(**{f"option_{i}": f"value {i}" for i in range(200)})
    return {"epoch": 3, "state_dict": sd, "optimizer": optimizer, "args": args}


@pytest.mark.parametrize("legacy", [False, True])
def test_wrapped_checkpoint_with_optimizer_and_namespace_loads(tmp_path, legacy):
    sd = torch.load(FIXTURE, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save(_wrapped(sd), path, _use_new_zipfile_serialization=not legacy)
    got = read_state_dict(path)
    assert sorted(got) == sorted(sd)
    for key, value in sd.items():
        assert (got[key] == value.numpy()).all(), key


def test_wrapped_checkpoint_via_cli(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save(_wrapped(torch.load(FIXTURE, weights_only=True)), path)
    result, wall, cpu = run_cli("inspect", path)
    print(f"\ninspect wrapped: {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert result.returncode == 0, result.stderr


def test_real_zip_bounds_are_generous():
    """A real checkpoint uses a small part of each bound."""
    from sepvit_jax.core import zipcheck
    from sepvit_jax.core.pickscan import pickle_limit

    layout = zipcheck.check_torch_zip(FIXTURE)
    assert layout.pickle is not None and len(layout.records) == 46
    assert layout.pickle.file_size < pickle_limit(len(layout.records)) / 100


# ---- a tampered converted directory --------------------------------------------------------


def test_tampered_directory_is_refused_quickly(tmp_path):
    converted = tmp_path / "model_flax"
    result, _, _ = run_cli("torch2flax", FIXTURE, "-o", converted)
    assert result.returncode == 0, result.stderr
    config_path = converted / "config.json"
    config = json.loads(config_path.read_text())
    config["depth"] = [2000, 1]
    config_path.write_text(json.dumps(config))
    result, wall, cpu = run_cli("flax2torch", converted, "-o", tmp_path / "back.pt")
    # The stored tree is checked against config.json's before any model or array is built.
    pattern = r"model_flax does not fit the SepViT: missing keys \([\d,]+\)"
    assert_refused(result, wall, cpu, pattern, "flax2torch tampered")
    assert not (tmp_path / "back.pt").exists()
    shutil.rmtree(converted)
