"""Reading checkpoints (convert.io) that must be refused: missing, empty, truncated, corrupt and
foreign files, and pickles that would run code (never run, unless --unsafe-pickle).

Every checkpoint goes through a real file in tmp_path; the weights come from the golden
fixtures copied into tests/fixtures.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

from sepvit_jax.core.torch_io import CheckpointError, read_state_dict
from tests.helpers import Tree, assert_same, fixture_sd, save


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return fixture_sd()


# ---- broken and foreign files --------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\): .*empty.pt"):
        read_state_dict(tmp_path / "empty.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, sd, legacy):
    full = tmp_path / "full.pt"
    torch.save(sd, full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(cut)
    message = str(info.value)
    assert "not a readable PyTorch or safetensors checkpoint" in message
    assert str(cut) in message and "truncated or corrupt" in message and "\n" not in message


@pytest.mark.parametrize(
    "data",
    [b"hello, this is certainly not a checkpoint\n" * 4, b"\x10\x00\x00\x00\x00\x00\x00\x00{"],
)
def test_garbage_file(tmp_path, data):
    for name in ("junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_state_dict(tmp_path / name)


def test_truncated_safetensors(tmp_path, sd):
    save_safetensors(sd, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a readable .*w.safetensors.*truncated"):
        read_state_dict(tmp_path / "w.safetensors")


def _resnet_like():
    return {
        "conv1.weight": torch.zeros(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "bn1.running_mean": torch.zeros(8),
        "bn1.num_batches_tracked": torch.tensor(0),
        "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "fc.weight": torch.zeros(10, 8),
        "fc.bias": torch.zeros(10),
    }


def test_not_sepvit_torch(tmp_path):
    path = save({"state_dict": _resnet_like()}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "does not look like a SepViT state_dict: no 'layers.0.0.conv.weight'" in message
    assert "'conv1.weight'" in message and str(path) in message


def test_not_sepvit_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    save_safetensors(
        {"embed.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(2, 4)}, str(path)
    )
    with pytest.raises(CheckpointError, match="does not look like a SepViT.*'embed.weight'"):
        read_state_dict(path)


def test_backbone_without_head_is_not_sepvit(tmp_path, sd):
    headless = {k: v for k, v in sd.items() if not k.startswith("mlp_head")}
    with pytest.raises(CheckpointError, match="no 'mlp_head.2.weight'"):
        read_state_dict(save(headless, tmp_path / "w.pt"))


# ---- pickles that run code -----------------------------------------------------------------


class Touch:
    """Unpickling this calls Path.touch: the canary for code execution."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


@pytest.mark.parametrize("wrap", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, sd, wrap):
    canary = tmp_path / "pwned"
    payload = {"model": sd, "extra": Touch(canary)} if wrap else Touch(canary)
    path = save(payload, tmp_path / "evil.pt")
    assert not canary.exists()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "execute code" in message and "--unsafe-pickle" in message and str(path) in message
    assert "\n" not in message
    assert not canary.exists()


class System:
    """Unpickling runs a shell command (the classic payload)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", [Touch, System])
def test_raw_pickles_of_every_protocol_are_refused(tmp_path, protocol, payload):
    canary = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": payload(canary)}, protocol=protocol))
    name = "pathlib" if payload is Touch else "system"
    with pytest.raises(CheckpointError, match=f"would execute code .*{name}"):
        read_state_dict(path)
    assert not canary.exists()


def test_plain_data_beside_the_weights_is_not_code(tmp_path, sd):
    """timm saves argparse.Namespace args, scripts save numpy metrics: weights-only reads them."""
    ckpt = {"state_dict": sd, "args": argparse.Namespace(lr=0.1), "best": np.float64(0.9)}
    assert_same(read_state_dict(save(ckpt, tmp_path / "timm.pth.tar")), sd)
    # Weights kept as numpy arrays, beside numpy statistics.
    ckpt = {"model": {k: v.numpy() for k, v in sd.items()}, "mean": np.array([0.5, 0.4])}
    assert_same(read_state_dict(save(ckpt, tmp_path / "numpy.pt")), sd)


def test_unsafe_pickle_loads_a_module_with_a_warning(tmp_path, sd):
    path = save(Tree(sd), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="execute code"):
        read_state_dict(path)
    with pytest.warns(UserWarning, match="unsafe"):
        got = read_state_dict(path, unsafe_pickle=True)
    assert_same(got, sd)
    # Nested inside a wrapper, and DDP-wrapped, too.
    path = save({"model": torch.nn.DataParallel(Tree(sd)), "epoch": 1}, tmp_path / "wrapped.pt")
    with pytest.warns(UserWarning):
        assert_same(read_state_dict(path, unsafe_pickle=True), sd)


def test_safe_load_does_not_warn(tmp_path, sd):
    path = save(sd, tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_state_dict(path)
