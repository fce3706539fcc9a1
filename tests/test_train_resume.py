"""train.py's checkpoints: epoch checkpoints, bitwise resume, the best checkpoints kept, SIGTERM,
a NaN loss keeping the last good checkpoint, a new run refusing an old run's directory."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sepvit_jax.train.run import main
from tests.training import (
    ROOT,
    SMALL,
    TIMING,
    model_params,
    read_rows,
    subprocess_env,
    train,
)

# ---- checkpoints -------------------------------------------------------------------------------


@pytest.mark.slow
def test_epoch_checkpoints_are_a_minute_apart_and_lr_is_logged(tmp_path, monkeypatch):
    from sepvit_jax.train import loop

    # testing model, batch 16: 1437 // 16 = 89 steps an epoch, 2 epochs.
    assert train(tmp_path, "default", "--epochs", "2") == 0
    saved = lambda name: sorted(int(p.name) for p in (tmp_path / name / "checkpoints").iterdir())  # noqa: E731
    assert saved("default") == [178]  # the first epoch ended seconds after the start
    monkeypatch.setattr(loop, "MIN_SECONDS_BETWEEN_EPOCH_CHECKPOINTS", 0.0)
    assert train(tmp_path, "every-epoch", "--epochs", "2") == 0
    assert saved("every-epoch") == [89, 178]
    # The logged learning rate is the one the step used: linear warm-up over the first epoch.
    rows = {r["step"]: r for r in read_rows(tmp_path / "default")}
    assert rows[89]["lr"] == pytest.approx(2e-3 * 88 / 89, rel=1e-6)
    assert rows[178]["lr"] < 1e-6  # cosine decay to --min-lr-ratio 0


@pytest.mark.slow
def test_resume_continues_bitwise(tmp_path):
    # Batch 256: 5 steps per epoch, so the runs cross an epoch boundary (evaluation, reshuffle)
    # after the resume point; dropout on, so the RNG state must be restored too; 2 micro-batches.
    args = ["--model", "testing,dropout=0.1", "--batch-size", "256", "--steps", "7"]
    args += ["--grad-accum", "2", "--checkpoint-every", "3", "--log-every", "1"]
    args += ["--runs-dir", str(tmp_path)]
    assert main([*args, "--run-name", "straight"]) == 0
    assert main([*args, "--run-name", "split", "--stop-at-step", "5"]) == 0
    checkpoints = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["3", "5"]
    assert not (tmp_path / "split" / "model").exists()  # only a finished run exports
    # As if the process had died before saving step 5: the resume starts from step 3, and the
    # rows logged for steps 4 and 5 are written again, not twice.
    shutil.rmtree(checkpoints / "5")
    assert main([*args, "--run-name", "split", "--resume"]) == 0
    straight, split = model_params(tmp_path / "straight"), model_params(tmp_path / "split")
    assert all(np.array_equal(a, b) for a, b in zip(straight, split, strict=True))
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert untimed(read_rows(tmp_path / "split")) == untimed(read_rows(tmp_path / "straight"))
    # Resuming a finished run does nothing and says so.
    assert main([*args, "--run-name", "split", "--resume"]) == 0


def test_best_checkpoints_survive_a_resume(tmp_path):
    from sepvit_jax.train.checkpoints import Checkpoints

    state = {"x": np.zeros(3, np.float32)}
    accuracies = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.5, 6: 0.4}
    ckpts = Checkpoints(tmp_path, keep=2)
    for step, accuracy in accuracies.items():
        ckpts.save(step, state, metrics={"test_accuracy": accuracy})
    ckpts.close()
    assert sorted(ckpts.manager.all_steps()) == [1, 5, 6]  # the best 2 and the last 2
    ckpts = Checkpoints(tmp_path, keep=2)  # a resumed run's manager
    ckpts.save(7, state, metrics={"test_accuracy": 0.2})
    ckpts.save(8, state)  # mid-epoch: no metrics
    ckpts.close()
    assert sorted(ckpts.manager.all_steps()) == [1, 5, 7, 8]


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, "--steps", "100000", "--log-every", "1"]
    cmd += ["--runs-dir", str(tmp_path), "--run-name", "term"]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM: saved a checkpoint at step" in err
    saved = int(re.search(r"saved a checkpoint at step (\d+)", err).group(1))
    assert max(int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir()) == saved
    assert read_rows(tmp_path / "term")[-1]["step"] == saved
    # The checkpoint loads: evaluate it, then continue it for two more steps.
    assert main(["--runs-dir", str(tmp_path), "--run-name", "term", "--eval-only"]) == 0
    more = ["--runs-dir", str(tmp_path), "--run-name", "term", "--resume"]
    assert main([*more, "--steps", str(saved + 2)]) == 0
    assert read_rows(tmp_path / "term")[-1]["step"] == saved + 2


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # An absurd learning rate: the step-2 update (lr 5e29 after warm-up) makes step 3 NaN.
    args = ["--lr", "1e30", "--warmup-steps", "2", "--clip-norm", "0", "--checkpoint-every", "1"]
    assert train(tmp_path, "nan", "--steps", "6", *args) == 3
    err = capsys.readouterr().err
    assert "error: non-finite training loss (nan" in err
    step = int(re.search(r"at step (\d+)", err).group(1))
    kept = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert kept and max(kept) == step - 1
    assert f"the last good checkpoint is step {step - 1}" in err
    assert not (tmp_path / "nan" / "model").exists()


@pytest.mark.slow
def test_a_new_run_refuses_a_directory_with_checkpoints(tmp_path, capsys):
    assert train(tmp_path, "once", "--steps", "1") == 0
    assert train(tmp_path, "once", "--steps", "1") == 2
    assert "already has checkpoints; pass --resume" in capsys.readouterr().err
