"""Without torch (a subprocess whose `import torch` fails): what needs torch says so before any
work; what does not need it works (JAX models, inspecting directories, writing safetensors)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sepvit_jax
import sepvit_torch
from tests.helpers import FIXTURES

# `import torch` (and safetensors, which can call into it) raises ImportError in the child.
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None; "


def without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, timeout=300
    )


def convert_without_torch(*args) -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    return without_torch(f"from convert.cli import main; sys.exit(main({argv!r}))")


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_free") / "model"
    sepvit_jax.save(sepvit_jax.from_torch(FIXTURES / "two_stage_56.pt"), path)
    return path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_commands_that_need_torch_say_so_before_any_work(directory, tmp_path):
    proc = convert_without_torch("flax2torch", directory, "-o", tmp_path / "m.pt")
    assert "writing a PyTorch .pt file needs torch" in one_error_line(proc)
    assert "reading" not in proc.stdout and not (tmp_path / "m.pt").exists()
    proc = convert_without_torch("torch2flax", FIXTURES / "two_stage_56.pt", "--verify", "-o",
                                 tmp_path / "out")  # fmt: skip
    assert "--verify (it runs the PyTorch reference model) needs torch" in one_error_line(proc)
    assert "reading" not in proc.stdout and not (tmp_path / "out").exists()
    proc = convert_without_torch("inspect", FIXTURES / "two_stage_56.pt")
    assert "reading PyTorch checkpoints needs torch" in one_error_line(proc)


def test_what_needs_no_torch_works_without_it(directory, tmp_path):
    out = tmp_path / "m.safetensors"
    proc = convert_without_torch("flax2torch", directory, "--safetensors", "-o", out)
    assert proc.returncode == 0, proc.stderr
    proc = convert_without_torch("inspect", directory)
    assert proc.returncode == 0 and "parameters: " in proc.stdout, proc.stderr
    proc = without_torch(
        f"import sepvit_jax; m = sepvit_jax.load({str(directory)!r}); print(m.config.dim)"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "16", proc.stderr
    # What it wrote without torch loads into the torch model, strictly, bitwise.
    from safetensors.torch import load_file

    written = load_file(str(out))
    model = sepvit_torch.SepViT.from_config(sepvit_jax.load(directory).config)
    model.load_state_dict(written, strict=True)
    original = torch.load(FIXTURES / "two_stage_56.pt", weights_only=True)
    assert all(torch.equal(written[k], original[k]) for k in original)
