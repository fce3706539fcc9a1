"""The `convert` CLI on the golden fixtures, end to end: torch2flax (with --verify), flax2torch
back, bitwise, and inspect; real subprocesses for the representative paths (both console
scripts and `python -m convert`), `convert.cli.main` in-process for the other fixtures."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sepvit_torch
from convert import verify
from convert.cli import main
from tests.helpers import (
    FIXTURES,
    GOLDEN_CASES,
    assert_bitwise,
    assert_failed,
    cli,
    config_table,
    converted_state_dict,
    fixture_config,
    fixture_sd,
    listing,
    run,
)

# ---- the fixtures through real subprocesses ------------------------------------------------


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory):
    """`convert torch2flax two_stage_56.pt --verify` through the `convert` console script."""
    out = tmp_path_factory.mktemp("cli") / "two_stage_flax"
    proc = run("torch2flax", FIXTURES / "two_stage_56.pt", "-o", out, "--verify", script="convert")
    return proc, out


def test_torch2flax_fixture_with_verify_subprocess(two_stage_run):
    proc, out = two_stage_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr
    stdout = proc.stdout
    # The config, where each value came from, the parameter count, the verification.
    table = config_table(stdout)
    assert table["num_classes"] == ("10", "weights") and table["depth"] == ("1,1", "weights")
    assert table["window_size"] == ("7", "default") and table["dtype"] == ("float32", "default")
    assert table["dropout"] == ("0.0", "default") and len(table) == 10
    assert "parameters: 39,482" in stdout
    diff = float(stdout.split("max rel diff ")[1].split()[0])
    assert "max abs diff" in stdout and diff <= verify.VERIFY_RTOL and "): ok" in stdout
    assert sorted(os.listdir(out)) == ["config.json", "params", "sepvit.json"]
    assert listing(out.parent) == ["two_stage_flax"]  # no temporary sibling left
    config = json.loads((out / "config.json").read_text())
    assert config == {**fixture_config("two_stage_56").to_dict(), "depth": [1, 1], "heads": [1, 2]}
    assert_bitwise(converted_state_dict(out), fixture_sd())


def test_flax2torch_round_trip_is_bitwise_subprocess(two_stage_run, tmp_path):
    _, directory = two_stage_run
    back = tmp_path / "back.pt"
    proc = run("flax2torch", directory, "-o", back, script="sepvit-convert")
    assert proc.returncode == 0, proc.stderr
    loaded = torch.load(back, weights_only=True)
    original = fixture_sd()
    assert list(loaded) == list(original)  # same keys, same (module) order
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    model = sepvit_torch.SepViT.from_config(fixture_config("two_stage_56"))
    model.load_state_dict(loaded, strict=True)


def test_inspect_json_subprocess():
    proc = run("inspect", FIXTURES / "rect_gray.pt", "--json", "--image-size", "56,112")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"] == {**fixture_config("rect_gray").to_dict(), "depth": [1, 1]}
    assert info["sources"]["window_size"] == "default" and info["sources"]["dim"] == "weights"
    assert info["num_params"] == sum(v.numel() for v in fixture_sd("rect_gray").values())
    assert info["dtypes"] == {"float32": len(fixture_sd("rect_gray"))}
    assert [(s["feature_map"], s["windows"]) for s in info["stages"]] == [
        ([14, 28], 8),
        ([7, 14], 2),
    ]


# ---- the other fixtures, in-process ---------------------------------------------------------


@pytest.fixture(scope="session")
def fixture_dirs(tmp_path_factory):
    """Each golden fixture converted with --verify in-process: case -> (status, stdout, dir)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("fixtures")
    results = {}
    for case in GOLDEN_CASES[1:]:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            status = main(
                ["torch2flax", str(FIXTURES / f"{case}.pt"), "-o", str(root / case), "--verify"]
            )
        results[case] = (status, buffer.getvalue(), root / case)
    return results


@pytest.mark.parametrize("case", GOLDEN_CASES[1:])
def test_torch2flax_fixtures_round_trip_in_process(fixture_dirs, tmp_path, capsys, case):
    status, _, directory = fixture_dirs[case]
    assert status == 0
    assert_bitwise(converted_state_dict(directory), fixture_sd(case))
    for fmt in ("pt", "safetensors"):
        back = tmp_path / f"back.{fmt}"
        status, out, err = cli(capsys, "flax2torch", directory, "-o", back)
        assert status == 0, err
        if fmt == "pt":
            loaded = torch.load(back, weights_only=True)
        else:
            from safetensors.torch import load_file

            loaded = load_file(back)
        assert_bitwise({k: v.numpy() for k, v in loaded.items()}, fixture_sd(case))
        model = sepvit_torch.SepViT.from_config(fixture_config(case))
        model.load_state_dict(loaded, strict=True)


@pytest.mark.parametrize("case", GOLDEN_CASES[1:])
def test_verify_fixture_in_process(fixture_dirs, case):
    status, out, _ = fixture_dirs[case]
    assert status == 0
    diff = float(out.split("max rel diff ")[1].split()[0])
    assert diff <= verify.VERIFY_RTOL and "): ok" in out


def test_verify_mismatch_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def mismatch(cfg, state_dict, flax_model, **kwargs):
        return verify.Verification(max_abs=0.5, max_rel=0.1, image_size=(53, 53), batch=2)

    import convert.verify

    monkeypatch.setattr(convert.verify, "verify", mismatch)
    status, out, err = cli(
        capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "-o", tmp_path / "o", "--verify"
    )
    assert_failed(status, err, "verification failed", "nothing was written", expected=1)
    assert "MISMATCH" in out
    assert listing(tmp_path) == []


def test_inspect_text_and_directory(tmp_path, capsys, fixture_dirs):
    _, _, directory = fixture_dirs["three_stage_112"]
    status, out, err = cli(capsys, "inspect", FIXTURES / "three_stage_112.pt")
    assert status == 0, err
    assert "stages at a 224x224 input:" in out and "parameters: 242,615" in out
    assert "float32 (84 tensors)" in out
    status, out, err = cli(capsys, "inspect", directory, "--json", "--image-size", "112")
    assert status == 0, err
    info = json.loads(out)
    assert info["format"] == "sepvit_jax" and info["num_params"] == 242_615
    assert [s["windows"] for s in info["stages"]] == [16, 4, 1]
    assert info["dtypes"] == {"float32": 84}
