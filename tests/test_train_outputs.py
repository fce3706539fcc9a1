"""What a run shows and writes (issue 13): metrics rows with time and throughput, the curves,
progress bars only on a terminal, the notes and hints; and the persistent compilation cache."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from sepvit_jax.train.run import main
from tests.training import ROOT, read_rows, subprocess_env

# Batch 256: 5 steps an epoch, 1437 - 5 * 256 = 157 images left out of each epoch.
ARGS = ["--model", "testing", "--batch-size", "256", "--steps", "7", "--log-every", "1"]


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    """A run stopped at step 4 by --stop-at-step, then resumed to its end: (dir, outputs)."""
    root = tmp_path_factory.mktemp("runs")
    args = [*ARGS, "--runs-dir", str(root), "--run-name", "r"]
    outputs = []
    for extra in (["--stop-at-step", "4"], ["--resume"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main([*args, *extra]) == 0
        outputs.append((out.getvalue(), err.getvalue()))
    return root / "r", outputs


@pytest.mark.slow
def test_rows_carry_time_and_throughput_rounded(stopped_and_resumed):
    run_dir, _ = stopped_and_resumed
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    for row in rows:
        assert row["time"] > 0 and row["images_per_sec"] > 0
        floats = [v for v in row.values() if isinstance(v, float)]
        assert all(float(f"{v:.6g}") == v for v in floats), row  # 6 significant digits
    # Seconds since the start of each invocation: increasing within one.
    assert rows[0]["time"] < rows[1]["time"] < rows[2]["time"] < rows[3]["time"]
    assert rows[4]["time"] < rows[5]["time"] < rows[6]["time"]
    assert {"test_accuracy", "test_loss"} <= rows[4].keys()  # step 5 ends epoch 1


@pytest.mark.slow
def test_curves_have_three_panels(stopped_and_resumed):
    run_dir, _ = stopped_and_resumed
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (1300, 350)  # three 4.3-inch panels at 100 dpi (two were 900)


@pytest.mark.slow
def test_notes_hints_and_no_bar_off_a_terminal(stopped_and_resumed):
    run_dir, ((out1, err1), (out2, err2)) = stopped_and_resumed
    skipped = "each epoch trains on 1280 and skips 157"
    assert err1.count(skipped) == 1 and err2.count(skipped) == 1  # once per invocation
    assert (
        f"stopped at step 4 of 7 (--stop-at-step): saved a checkpoint in "
        f"{(run_dir / 'checkpoints').absolute()}; continue with --resume --run-name r"
    ) in err1
    assert "final test accuracy" not in out1 and "final test accuracy: " in out2
    assert "\r" not in out1 + err1 + out2 + err2  # captured: not a terminal, no progress bars
    epochs = lambda out: [line.split("  ")[0] for line in out.splitlines() if line[:5] == "epoch"]  # noqa: E731
    assert epochs(out1) == [] and epochs(out2) == ["epoch 1/2", "epoch 2/2"]


@pytest.mark.slow
def test_progress_bars_on_a_terminal(tmp_path):
    # stderr on a pseudo-terminal (100 columns: a fresh one has 0, and tqdm draws nothing in
    # no room): tqdm draws (and redraws with \r) a bar per epoch.
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, "--steps", "2"]
    cmd += ["--runs-dir", str(tmp_path), "--run-name", "tty"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=follower, text=True
    )
    os.close(follower)
    drawn = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(leader, 4096):
            drawn += chunk
    os.close(leader)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0
    assert b"\repoch 1/1:" in drawn and b"/2 [" in drawn  # "epoch 1/1: ... 0/2 [00:00<?"
    assert "\r" not in out  # stdout is a pipe: one line an epoch


# ---- the persistent compilation cache --------------------------------------------------------

# Runs train.py's library entry in a fresh interpreter and counts JAX's cache events.
COUNTING = """
import json, sys
from jax import monitoring
events = {}
def count(name, **kwargs):
    events[name] = events.get(name, 0) + 1
monitoring.register_event_listener(count)
from sepvit_jax.train.run import main
status = main(sys.argv[1:])
print("EVENTS " + json.dumps(events))
sys.exit(status)
"""


def _cache_events(tmp_path, cache, name) -> dict:
    # Without the test session's cache settings: train.py's own defaults decide.
    env = {
        k: v
        for k, v in subprocess_env().items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    }
    argv = ["--model", "testing", "--batch-size", "16", "--steps", "2", "--compile-cache", cache]
    argv += ["--runs-dir", str(tmp_path), "--run-name", name]
    proc = subprocess.run(
        [sys.executable, "-c", COUNTING, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = json.loads(proc.stdout.split("EVENTS ", 1)[1])
    return {k.rsplit("/", 1)[-1]: v for k, v in events.items() if "compilation_cache" in k}


@pytest.mark.slow
def test_a_second_run_reads_every_program_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    first = _cache_events(tmp_path, str(cache), "first")
    entries = sorted(p.name for p in cache.glob("*-cache"))
    # Every program was compiled and written, the small ones too (the init, train and eval
    # steps, and the one-op probe of the init's compiler options, at least).
    assert first.get("cache_hits", 0) == 0 and first["cache_misses"] >= 4
    assert len(entries) == first["cache_misses"]
    second = _cache_events(tmp_path, str(cache), "second")
    assert second.get("cache_misses", 0) == 0
    assert second["cache_hits"] == first["cache_misses"]
    assert sorted(p.name for p in cache.glob("*-cache")) == entries  # nothing new written
    off = _cache_events(tmp_path, "none", "off")
    assert "cache_hits" not in off and "cache_misses" not in off
