"""train.py end to end: the default run, resume, signals, --init-from, imagefolder, bad input.

Most runs go through `sepvit_jax.train.run.main` in this process (one JAX runtime, one device);
the default run, SIGTERM, several devices and several processes need real subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sepvit_jax
from sepvit_jax.train.config import TrainConfig, model_config, parse_args
from sepvit_jax.train.run import main
from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parent.parent
# A small model and batch: 56x56 digits, 2x2 windows of 7 then one window.
SMALL = ["--model", "testing", "--batch-size", "16", "--image-size", "56"]


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), **extra)
    return env


def train(tmp_path: Path, name: str, *args: str) -> int:
    return main([*SMALL, "--runs-dir", str(tmp_path), "--run-name", name, *args])


def model_params(run_dir: Path) -> list[np.ndarray]:
    """The exported final parameters of a run, as numpy leaves in a fixed order."""
    model = sepvit_jax.load(run_dir / "model")
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


def max_abs_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def max_relative_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest difference relative to the largest magnitude of `b` (for small gradients)."""
    return max_abs_difference(a, b) / max(float(np.abs(x).max()) for x in b)


# Keys of a metrics row that measure this invocation's speed, not the training.
TIMING = ("time", "images_per_sec")


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the default run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_reaches_098_and_writes_the_run_directory(tmp_path):
    # The README's main job, exactly (`python train.py`), only with the runs somewhere else.
    proc = subprocess.run(
        [sys.executable, "train.py", "--runs-dir", str(tmp_path), "--run-name", "default"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"^final test accuracy: (\d\.\d{4})$", proc.stdout, re.M)
    assert len(found) == 1, proc.stdout
    accuracy = float(found[0])
    assert accuracy >= 0.98, proc.stdout
    assert len(re.findall(r"^epoch \d+/8 ", proc.stdout, re.M)) == 8
    assert "\r" not in proc.stderr + proc.stdout  # piped: no progress bar, one line an epoch

    run_dir = tmp_path / "default"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "digits" and config["epochs"] == 8
    assert config["resolved"]["model"]["channels"] == 1
    rows = read_rows(run_dir)
    evals = [r for r in rows if "test_accuracy" in r]
    assert len(evals) == 8 and evals[-1]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = 8 * (1437 // 32)  # 8 epochs of the 1,437 training images, batch 32
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())[-1] == steps

    # The exported model is a sepvit_jax checkpoint that reproduces the reported accuracy.
    from sepvit_jax.data import DataConfig, eval_batches

    model = sepvit_jax.load(run_dir / "model")
    model.eval()
    forward = jax.jit(lambda x: model(x))
    correct = count = 0
    for batch in eval_batches(DataConfig(), batch_size=120):
        predicted = np.asarray(forward(batch["image"])).argmax(-1)
        correct += int(((predicted == batch["label"]) & batch["mask"]).sum())
        count += int(batch["mask"].sum())
    assert count == 360
    assert correct / count == pytest.approx(accuracy, abs=1e-4)


# ---- sharding and hosts ------------------------------------------------------------------------


@pytest.mark.slow
def test_meshes_give_the_one_device_parameters():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_steps.py")],
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert set(result["meshes"]) == {"data=8", "data=4,fsdp=2", "data=2,fsdp=4"}
    for spec, mesh in result["meshes"].items():
        assert mesh["max_abs_diff"] <= 1e-5, (spec, mesh)
        # fsdp > 1 really shards the large kernels (and data=8 shards nothing).
        assert bool(mesh["fsdp_sharded"]) == ("fsdp" in spec), (spec, mesh)
    assert result["init_from_max_abs_diff"] == 0.0
    error = result["bad_batch_error"]
    assert "global batch size 12 is not divisible by the data-parallel size 8" in error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    # lr 1e-3 as in the mesh test: Adam moves a parameter by about lr * g / (|g| + eps), so on
    # near-zero gradients the float32 noise of a different reduction order (2 devices instead of
    # 1) shows up as up to ~1% of lr.
    args = [*SMALL, "--steps", "3", "--lr", "1e-3", "--runs-dir", str(tmp_path)]
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    multi = [
        "--run-name",
        "two",
        "--coordinator-address",
        f"127.0.0.1:{_free_port()}",
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, *multi, "--process-id", str(i)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Only process 0 reports.
    assert "final test accuracy" in outputs[0][0] and "final test accuracy" not in outputs[1][0]
    assert train(tmp_path, "one", "--steps", "3", "--lr", "1e-3") == 0

    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["resolved"]["process_count"] == 2 and config["resolved"]["mesh"]["data"] == 2
    diff = max_abs_difference(model_params(tmp_path / "two"), model_params(tmp_path / "one"))
    assert diff <= 1e-5
    assert len(read_rows(tmp_path / "two")) == len(read_rows(tmp_path / "one")) == 1


def test_gradient_accumulation_matches_one_big_batch():
    import optax

    from sepvit_jax import sharding
    from sepvit_jax.core.config import SepViTConfig
    from sepvit_jax.train import optim, steps

    # SGD with lr 1: one step moves the parameters by exactly minus the gradient, so this
    # compares the gradient of 2 micro-batches of 8 with that of the batch of 16.
    cfg = SepViTConfig(num_classes=10, dim=16, depth=(1,), heads=2, dim_head=8)
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((16, 56, 56, 3), dtype=np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))
    updates, losses = [], []
    for accum in (1, 2):
        optim_cfg = optim.OptimConfig(grad_accum=accum)
        optimizer = optax.sgd(1.0)
        plan = steps.plan_state(cfg, optimizer, mesh, seed=0)
        state = plan.build()
        before = jax.tree.leaves(jax.device_get(nnx.to_pure_dict(state["params"])))
        step = steps.make_train_step(plan.graphs, optimizer, optim_cfg, plan.shardings, mesh)
        state, metrics = step(state, batch)
        after = jax.tree.leaves(jax.device_get(nnx.to_pure_dict(state["params"])))
        updates.append([a - b for a, b in zip(after, before, strict=True)])
        losses.append(float(metrics["loss"]))
    assert max_relative_difference(updates[1], updates[0]) <= 1e-5
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


# ---- checkpoints -------------------------------------------------------------------------------


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


# ---- --init-from, imagefolder, bfloat16 --------------------------------------------------------


@pytest.fixture(scope="module")
def converted_rect_gray(tmp_path_factory) -> Path:
    """The upstream rect_gray fixture (5 classes, 1 channel) through the converter."""
    out = tmp_path_factory.mktemp("converted") / "rect_gray_flax"
    sepvit_jax.save(sepvit_jax.from_torch(FIXTURES / "rect_gray.pt"), out)
    return out


def test_init_from_a_converted_checkpoint(tmp_path, capsys, converted_rect_gray):
    # Digits has 10 classes: the converted body is kept and a zero head is made. lr 0: the
    # exported model is exactly the initial state.
    args = ["--init-from", str(converted_rect_gray), "--steps", "2", "--lr", "0"]
    args += ["--image-size", "56"]  # the converted record names 224, the converter's default
    assert main(["--batch-size", "16", "--runs-dir", str(tmp_path), "--run-name", "ft", *args]) == 0
    assert "new zero-initialised 10-class head" in capsys.readouterr().err
    source = nnx.to_pure_dict(nnx.state(sepvit_jax.load(converted_rect_gray), nnx.Param))
    tuned = nnx.to_pure_dict(nnx.state(sepvit_jax.load(tmp_path / "ft" / "model"), nnx.Param))
    head = tuned.pop("mlp_head")
    source_head = source.pop("mlp_head")
    assert jax.tree.all(jax.tree.map(np.array_equal, tuned, source))
    assert np.array_equal(head["norm"]["scale"], source_head["norm"]["scale"])
    assert head["fc"]["kernel"].shape == (32, 10) and not np.any(head["fc"]["kernel"])
    # --eval-only on the converted weights: a zero head predicts class 0 for all 360 images.
    args = ["--init-from", str(converted_rect_gray), "--eval-only", "--runs-dir", str(tmp_path)]
    assert main([*args, "--run-name", "ev", "--image-size", "56"]) == 0
    assert "final test accuracy: 0.1000" in capsys.readouterr().out
    assert not (tmp_path / "ev").exists()
    # The fine-tuning run continues from its own checkpoint (the converted architecture, not the
    # default model) and --eval-only evaluates that checkpoint.
    more = ["--runs-dir", str(tmp_path), "--run-name", "ft"]
    first = read_rows(tmp_path / "ft")[-1]
    assert main([*more, "--resume", "--steps", "6", "--lr", "1e-2", "--warmup-steps", "0"]) == 0
    last = read_rows(tmp_path / "ft")[-1]
    assert last["step"] == 6 and abs(last["test_loss"] - first["test_loss"]) > 1e-3  # it trained
    capsys.readouterr()
    assert main([*more, "--eval-only"]) == 0
    assert f"test loss {last['test_loss']:.4f}" in capsys.readouterr().out


def test_init_from_refuses_a_channel_mismatch(tmp_path, capsys):
    three_channels = tmp_path / "two_stage_56_flax"
    sepvit_jax.save(sepvit_jax.from_torch(FIXTURES / "two_stage_56.pt"), three_channels)
    assert train(tmp_path, "x", "--init-from", str(three_channels), "--steps", "1") == 2
    assert "takes 3 input channels but the data has 1" in capsys.readouterr().err


def make_image_tree(root: Path, *, train_per_class=8, val_per_class=4, corrupt=0) -> Path:
    """Two classes of generated JPEGs (reddish vs bluish noise) and `corrupt` broken files."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for label, cls in enumerate(("red", "blue")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (40 + i, 48, 3), dtype=np.uint8)
                pixels[..., 0 if label == 0 else 2] += 120
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    for i in range(corrupt):
        (root / "train" / "red" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


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


def test_a_new_run_refuses_a_directory_with_checkpoints(tmp_path, capsys):
    assert train(tmp_path, "once", "--steps", "1") == 0
    assert train(tmp_path, "once", "--steps", "1") == 2
    assert "already has checkpoints; pass --resume" in capsys.readouterr().err


# ---- configuration -----------------------------------------------------------------------------


def test_weight_decay_applies_to_kernels_only():
    from sepvit_jax.checkpoint import abstract_model
    from sepvit_jax.core.config import get_config
    from sepvit_jax.train import optim

    params = nnx.state(abstract_model(get_config("testing")), nnx.Param)
    mask = optim.decay_mask(params)
    decayed = {
        jax.tree_util.keystr(path[:-1], simple=True, separator="/")
        for path, on in jax.tree_util.tree_leaves_with_path(mask)
        if on
    }
    stage = {
        "patch_embed/conv/kernel",
        "peg/proj/kernel",
        "transformer/layers/0/attn/to_qkv/kernel",
        "transformer/layers/0/attn/window_tokens_to_qk/proj/kernel",
        "transformer/layers/0/attn/to_out/kernel",
        "transformer/layers/0/ff/fc1/kernel",
        "transformer/layers/0/ff/fc2/kernel",
    }
    expected = {f"layers/{i}/{name}" for i in range(2) for name in stage} | {"mlp_head/fc/kernel"}
    assert decayed == expected


def test_flags_override_the_config_file(tmp_path):
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"lr": 0.01, "epochs": 3, "model": "sepvit_lite"}))
    cfg = parse_args(["--config", str(run_json), "--epochs", "5", "--dtype", "bfloat16"])
    assert cfg == TrainConfig(lr=0.01, epochs=5, model="sepvit_lite", dtype="bfloat16")
    run_json.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        parse_args(["--config", str(run_json)])
    with pytest.raises(ValueError, match="lr must be float"):
        parse_args(["--lr", "fast"])


def test_model_spec_forms():
    named = model_config("sepvit_tiny", num_classes=10, channels=1)
    assert named.dim == 96 and named.num_classes == 10 and named.channels == 1
    tweaked = model_config("digits,dim=48,depth=2-2,window_size=7", num_classes=10, channels=1)
    assert tweaked.dim == 48 and tweaked.depth == (2, 2) and tweaked.heads == (1, 2)
    explicit = model_config("dim=32,depth=1-1,heads=1-2", num_classes=3, channels=3)
    assert explicit.heads == (1, 2) and explicit.num_classes == 3
    as_json = model_config('{"dim": 8, "depth": [1], "heads": 1}', num_classes=2, channels=1)
    assert as_json.depth == (1,)
    with pytest.raises(ValueError, match="is not key=value"):
        model_config("digits,wide", num_classes=10, channels=1)
