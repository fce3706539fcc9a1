"""`python -m benchmarks --quick` through a real subprocess: the table's shape and the JSON rows.

Never asserts a speed: the figures only have to be there and be positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("config", "mode", "framework", "device", "batch", "img_per_s", "compile_s")
FIGURES = ("img_per_s", "img_per_s_min", "img_per_s_max", "compile_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--device",
        "cpu",  # the same smoke test on every machine, GPU or not
        "--json",
        str(out / "bench.json"),
        "--markdown",
        str(out / "bench.md"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


@pytest.mark.slow
def test_quick_json_has_every_row_with_positive_figures(quick):
    _, data, _ = quick
    rows = data["rows"]
    combos = {(r["config"], r["mode"], r["framework"]) for r in rows}
    expected = {
        ("digits", mode, fw) for mode in ("forward", "train") for fw in ("jax", "torch_eager")
    }
    assert combos == expected and len(rows) == len(expected)
    for row in rows:
        assert not row.get("error"), row
        for field in (*ROW_FIELDS, "peak_mem_mb"):
            assert field in row, (field, row)
        for field in FIGURES:
            assert row[field] > 0, (field, row)
        assert row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"]
        assert row["repeats"] >= 5 and row["device"] == "cpu"
    assert len({(r["batch"], r["dtype"], r["threads"]) for r in rows}) == 1  # same on both sides


@pytest.mark.slow
def test_quick_ratios_present_and_consistent(quick):
    _, data, _ = quick
    speed = {(r["mode"], r["framework"]): r["img_per_s"] for r in data["rows"]}
    assert {(r["config"], r["mode"]) for r in data["ratios"]} == {
        ("digits", "forward"),
        ("digits", "train"),
    }
    for entry in data["ratios"]:
        mode = entry["mode"]
        assert entry["jax_over_torch_eager"] > 0
        assert entry["jax_over_torch_eager"] == pytest.approx(
            speed[(mode, "jax")] / speed[(mode, "torch_eager")]
        )
        assert entry["jax_over_torch_compile"] is None  # --quick leaves torch.compile out
    meta = data["meta"]
    assert meta["versions"]["jax"] and meta["versions"]["torch"] and meta["date"]
    assert meta["complete"] is True and meta["measured"] == meta["planned"] == 4
    assert data["conversion"] is None


@pytest.mark.slow
def test_quick_markdown_table_shape(quick):
    proc, data, md = quick
    assert proc.stdout == md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:5] == ["config", "mode", "framework", "batch", "img/s median [min–max]"]
    assert "jax / torch eager" in header and "jax / torch.compile" in header
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert len(body) == len(data["rows"])
    assert all(len(cells) == len(header) for cells in body)
    for cells in body:
        if cells[2] == "jax":
            assert cells[header.index("jax / torch eager")].endswith("x")
    assert "Versions:" in md and "Machine:" in md


def test_a_failing_measurement_becomes_an_error_row():
    from benchmarks.__main__ import measure

    spec = dict(config="digits", mode="forward", framework="nope", device="cpu", threads=1)
    row = measure(spec, timeout=120)
    assert "unknown framework" in row["error"] and row["framework"] == "nope"


def test_repeats_below_five_are_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeats", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "at least 5" in proc.stderr


def test_flops_count_of_the_lowered_programs():
    """The FLOPs behind MFU: positive, proportional to the batch, a train step ~3 forwards."""
    from benchmarks.throughput import jax_step, step_flops

    def flops(mode, batch):
        jitted, args, _ = jax_step(dict(config="testing", mode=mode, dtype="float32", batch=batch))
        return step_flops(jitted.lower(*args))

    forward, train = flops("forward", 4), flops("train", 4)
    assert forward > 0 and 2.0 < train / forward < 4.0, (forward, train)
    assert flops("forward", 8) == pytest.approx(2 * forward, rel=1e-3)


def test_partial_results_are_marked_incomplete():
    from benchmarks import report

    meta = report.machine_info()
    meta.update(device="cpu", dtype="float32", threads=2, repeats=5, complete=False)
    meta.update(measured=1, planned=4)
    row = dict(
        config="digits",
        mode="train",
        framework="jax",
        batch=64,
        img_per_s=10.0,
        img_per_s_min=9.0,
        img_per_s_max=11.0,
        compile_s=1.0,
        peak_mem_mb=100.0,
    )
    md = report.markdown(meta, [row], report.ratios([row]), None)
    assert "Incomplete:** 1 of 4 measurements" in md
