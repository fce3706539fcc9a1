"""The `convert` CLI refusing what it must: missing, broken and foreign files, malicious pickles
(never run), ambiguous or contradicting settings, existing outputs. Every failing command must
exit with its status, print one `error: ...` line, no traceback, and leave no output (nor
temporary sibling) behind. Real subprocesses for the representative paths, `convert.cli.main`
in-process for the many variants."""

from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as save_safetensors

import sepvit_torch
from convert.cli import main
from tests.helpers import (
    FIXTURES,
    assert_bitwise,
    assert_failed,
    cli,
    converted_state_dict,
    fixture_config,
    fixture_sd,
    listing,
    run,
)

# ---- through real subprocesses ---------------------------------------------------------------


class _Touch:
    """Unpickling calls builtins.open(marker, "w"): creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _System:
    """Unpickling runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["zip", "legacy_pickle"])
def test_malicious_pickle_refused_and_never_runs_subprocess(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if kind == "zip":  # torch.save of an object whose unpickling calls open()
        torch.save({"state_dict": fixture_sd(), "extra": _Touch(marker)}, path)
    else:  # a raw pickle (protocol 5: STACK_GLOBAL) whose unpickling runs a shell command
        path.write_bytes(pickle.dumps({"model": _System(marker)}, protocol=5))
    before = listing(tmp_path)
    proc = run("torch2flax", path)
    line = assert_failed(proc.returncode, proc.stderr, "would execute code", str(path))
    assert ("io.open" if kind == "zip" else "system") in line
    assert "--unsafe-pickle" in line
    assert not marker.exists()
    assert listing(tmp_path) == before  # and no evil_flax/ output


def test_error_exits_subprocess(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"state_dict": _resnet_like()}, resnet)
    proc = run("torch2flax", resnet)
    assert_failed(proc.returncode, proc.stderr, "does not look like a SepViT", "'conv1.weight'")
    proc = run("inspect", tmp_path / "missing.pt", script="sepvit-convert")
    assert_failed(proc.returncode, proc.stderr, "not found", "missing.pt")
    assert listing(tmp_path) == ["resnet.pth"]


# ---- in-process ------------------------------------------------------------------------------


def _resnet_like():
    return {
        "conv1.weight": torch.zeros(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "bn1.num_batches_tracked": torch.tensor(0),
        "fc.weight": torch.zeros(10, 8),
        "fc.bias": torch.zeros(10),
    }


def _truncated(tmp_path: Path, legacy: bool = False) -> Path:
    torch.save(fixture_sd(), tmp_path / "full.pt", _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "full.pt").unlink()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pt"


def _write(name: str, data: bytes):
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return make


def _saved(name: str, obj):
    def make(tmp_path: Path) -> Path:
        torch.save(obj() if callable(obj) else obj, tmp_path / name)
        return tmp_path / name

    return make


def _safetensors_other(tmp_path: Path) -> Path:
    save_safetensors({"embed.weight": torch.zeros(4, 2)}, str(tmp_path / "lm.safetensors"))
    return tmp_path / "lm.safetensors"


# name -> (make the input, extra args, fragments of the error line)
ERRORS = {
    "missing": (lambda d: d / "nope.pt", [], ["checkpoint not found", "nope.pt"]),
    "directory": (lambda d: d, [], ["is a directory"]),
    "empty": (_write("empty.pt", b""), [], ["empty (0 bytes)"]),
    "truncated zip": (_truncated, [], ["truncated or corrupt", "cut.pt"]),
    "truncated legacy": (lambda d: _truncated(d, legacy=True), [], ["truncated or corrupt"]),
    "garbage": (_write("junk.pth", b"not a checkpoint\n" * 8), [], ["truncated or corrupt"]),
    "resnet": (_saved("resnet.pth", {"model": _resnet_like()}), [], ["no 'layers.0.0.conv"]),
    "other safetensors": (_safetensors_other, [], ["does not look like a SepViT"]),
    "no state_dict": (_saved("meta.pt", {"epoch": 1}), [], ["found no state_dict", "'epoch'"]),
    "bad key": (
        _saved("k.pt", lambda: {"model": fixture_sd()}),
        ["--key", "ema"],
        ["no entry 'ema'", "'model'"],
    ),
    "stage count": (
        lambda d: FIXTURES / "two_stage_56.pt",
        ["--window-size", "7,7,14,7"],
        ["(7, 7, 14, 7) has 4 entries", "2 stages"],
    ),
    "pickled module": (
        _saved("whole.pt", lambda: sepvit_torch.SepViT.from_config(fixture_config("rect_gray"))),
        [],
        ["would execute code", "sepvit_torch.model.SepViT", "--unsafe-pickle"],
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_input_errors(tmp_path, capsys, name):
    make, extra, fragments = ERRORS[name]
    work = tmp_path / "work"
    work.mkdir()
    path = make(work)
    before = listing(work)
    status, out, err = cli(capsys, "torch2flax", path, "-o", work / "out", *extra)
    assert_failed(status, err, *fragments)
    assert listing(work) == before
    if path.parent == work:  # the default output (next to the input) too
        status, out, err = cli(capsys, "torch2flax", path, *extra)
        assert_failed(status, err, *fragments)
        assert listing(work) == before


def test_debug_shows_the_exception(tmp_path):
    from sepvit_jax.core.torch_io import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        main(["torch2flax", str(tmp_path / "nope.pt"), "--debug"])


def test_config_contradicting_the_weights(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_classes": 1000, "dim_head": 32, "heads": [1, 2]}))
    status, _, err = cli(capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "-o",
                         tmp_path / "o", "--config", config)  # fmt: skip
    assert_failed(status, err, "num_classes=1000", "num_classes=10")
    config.write_text("{not json")
    status, _, err = cli(capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "--config", config)
    assert_failed(status, err, "not valid JSON")
    config.write_text(json.dumps({"widht": 3}))
    status, _, err = cli(capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "--config", config)
    assert_failed(status, err, "unknown keys ['widht']")
    assert listing(tmp_path) == ["config.json"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    ckpt = FIXTURES / "two_stage_56.pt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", out)
    assert_failed(status, err, "already exists", "--overwrite")
    # Even with --overwrite, a folder that is not a checkpoint is never replaced.
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", out, "--overwrite")
    assert_failed(status, err, "refusing to replace")
    assert listing(out) == ["keep.txt"] and listing(tmp_path) == ["out"]
    # An earlier conversion is replaced with --overwrite only.
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "conv")
    assert status == 0, err
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "conv")
    assert_failed(status, err, "already exists")
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "conv", "--overwrite")
    assert status == 0, err
    assert listing(tmp_path) == ["conv", "out"]
    # flax2torch refuses to overwrite a file, too.
    (tmp_path / "model.pt").write_bytes(b"old")
    status, _, err = cli(capsys, "flax2torch", tmp_path / "conv", "-o", tmp_path / "model.pt")
    assert_failed(status, err, "already exists")
    assert (tmp_path / "model.pt").read_bytes() == b"old"
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "missing" / "out")
    assert_failed(status, err, "does not exist")


def test_unsafe_pickle_loads_a_pickled_module_with_a_warning(tmp_path, capsys):
    config = fixture_config("rect_gray")
    model = sepvit_torch.SepViT.from_config(config)
    model.load_state_dict(fixture_sd("rect_gray"))
    torch.save({"model": model, "epoch": 3}, tmp_path / "whole.pt")
    status, out, err = cli(
        capsys, "torch2flax", tmp_path / "whole.pt", "-o", tmp_path / "o", "--unsafe-pickle"
    )
    assert status == 0, err
    assert err.startswith("warning: ") and "unsafe" in err and "Traceback" not in err
    assert_bitwise(converted_state_dict(tmp_path / "o"), fixture_sd("rect_gray"))


def test_flax_side_errors(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    for command in ("flax2torch", "inspect"):
        status, _, err = cli(capsys, command, tmp_path / "plain")
        assert_failed(status, err, "not a sepvit_jax checkpoint directory")
        status, _, err = cli(capsys, command, tmp_path / "absent")
        assert_failed(status, err, "not found")
    assert listing(tmp_path) == ["plain"]
