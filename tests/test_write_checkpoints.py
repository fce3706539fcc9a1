"""Writing checkpoints (save_state_dict): torch and safetensors round trips, bfloat16, the format
flag, atomic writes, and a missing output directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sepvit_jax.core.torch_io import CheckpointError, read_state_dict, save_state_dict
from tests.helpers import FIXTURES, Tree, assert_same, fixture_sd


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return fixture_sd()


# ---- save_state_dict -----------------------------------------------------------------------


def test_save_torch_round_trip(tmp_path, sd):
    arrays = read_state_dict(FIXTURES / "two_stage_56.pt")
    arrays["half.weight"] = np.arange(4, dtype=np.float16)
    path = tmp_path / "out.pt"
    save_state_dict(arrays, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(arrays)
    for k, a in arrays.items():
        assert loaded[k].dtype == torch.from_numpy(a).dtype
        np.testing.assert_array_equal(loaded[k].numpy(), a)
    del loaded["half.weight"]
    Tree(sd).load_state_dict(loaded, strict=True)
    assert_same(read_state_dict(path), {**sd, "half.weight": torch.arange(4).half()})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("how", ["suffix", "flag"])
def test_save_safetensors_round_trip(tmp_path, sd, how):
    arrays = read_state_dict(FIXTURES / "two_stage_56.pt")
    # Read-only and strided inputs must be written correctly too.
    arrays["layers.0.0.conv.bias"] = arrays["layers.0.0.conv.bias"].copy()
    arrays["layers.0.0.conv.bias"].flags.writeable = False
    path = tmp_path / ("out.safetensors" if how == "suffix" else "out.pt")
    save_state_dict(arrays, path, safetensors=None if how == "suffix" else True)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a torch zip
    assert_same(read_state_dict(path), sd)


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_save_bfloat16_arrays(tmp_path, sd, name):
    import ml_dtypes

    arrays = {k: v.float().numpy().astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    save_state_dict(arrays, tmp_path / name)
    if name.endswith(".pt"):
        loaded = torch.load(tmp_path / name, weights_only=True)
    else:
        from safetensors.torch import load_file

        loaded = load_file(tmp_path / name)
    for k, v in sd.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.bfloat16()), k


def test_save_torch_when_suffix_says_safetensors_but_flag_says_no(tmp_path, sd):
    path = tmp_path / "out.safetensors"
    save_state_dict({k: v.numpy() for k, v in sd.items()}, path, safetensors=False)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert_same(read_state_dict(path), sd)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_save_torch_is_atomic(tmp_path, sd, monkeypatch, existing):
    path = tmp_path / "out.pt"
    if existing:
        path.write_bytes(b"previous checkpoint")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_state_dict({k: v.numpy() for k, v in sd.items()}, path)
    if existing:
        assert path.read_bytes() == b"previous checkpoint"
        assert _listing(tmp_path) == ["out.pt"]
    else:
        assert _listing(tmp_path) == []


def test_save_safetensors_is_atomic(tmp_path, sd, monkeypatch):
    from sepvit_jax.core import torch_io

    def broken_write(arrays, file):
        file.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(torch_io, "write_safetensors", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({k: v.numpy() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert _listing(tmp_path) == []


def test_save_into_missing_directory(tmp_path, sd):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_state_dict({"a": np.zeros(2)}, tmp_path / "missing" / "out.pt")
