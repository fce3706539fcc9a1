"""train.py's inputs: image folders (unreadable images skipped and reported, or too many of
them refused) and every bad flag or folder as one clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.training import (
    make_image_tree,
    read_rows,
    train,
)


@pytest.mark.slow
def test_imagefolder_run_skips_and_reports_an_unreadable_image(tmp_path, capsys):
    tree = make_image_tree(tmp_path / "images", corrupt=1)
    args = ["--data", "imagefolder", "--data-dir", str(tree), "--batch-size", "8"]
    args += ["--max-bad-fraction", "0.1", "--dtype", "bfloat16"]
    assert train(tmp_path, "imagefolder", *args, "--epochs", "2") == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "broken0.jpg" in err
    rows = read_rows(tmp_path / "imagefolder")
    assert [r["step"] for r in rows if "test_accuracy" in r] == [2, 4]  # 17 images // 8
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    config = json.loads((tmp_path / "imagefolder" / "config.json").read_text())
    assert config["resolved"]["model"]["num_classes"] == 2


@pytest.mark.slow
def test_imagefolder_aborts_past_the_unreadable_limit(tmp_path, capsys):
    tree = make_image_tree(tmp_path / "images", corrupt=2)  # 2 of 18 > 1%
    args = ["--data", "imagefolder", "--data-dir", str(tree), "--batch-size", "8"]
    assert train(tmp_path, "bad", *args, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert re.search(r"error: \d+ of the 18 images in .*train are unreadable", err), err


# ---- bad input ---------------------------------------------------------------------------------


def _mismatched_tree(root: Path) -> Path:
    make_image_tree(root)
    (root / "val" / "green").mkdir()
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "imagefolder", "--data-dir", "{tmp}/nowhere"], "does not exist"),
        (["--data", "imagefolder", "--data-dir", "{tmp}/empty"], "must contain train/CLASS"),
        (["--data", "imagefolder", "--data-dir", "{tmp}/mismatch"], "only in val: ['green']"),
        (["--image-size", "60"], "stage 0 has a 15x15 feature map, which is not divisible by"),
        (["--grad-accum", "3"], "global batch size 16 is not divisible by --grad-accum 3"),
        (["--model", "resnet50"], "unknown model 'resnet50'"),
        (["--mesh", "data=3"], "has 3 devices but 1 are available"),
        (["--batch-size", "4096"], "larger than the 1437 training examples"),
        (["--resume"], "--resume needs --run-name of an existing run"),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--eval-only"], "has no checkpoint; name a run with --run-name or give weights"),
        (["--model", "digits,heads=1-2-3"], "heads has 3 entries (1, 2, 3) but depth (1, 1)"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    _mismatched_tree(tmp_path / "mismatch")
    args = [a.format(tmp=tmp_path) for a in args]
    assert train(tmp_path, "r", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "r" / "checkpoints").exists()
