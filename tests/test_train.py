"""train.py end to end: the default run, several devices and processes, gradient accumulation,
the configuration. (Checkpoints and resume: test_train_resume.py; --init-from:
test_train_init_from.py; image folders and bad input: test_train_inputs.py.)

Most runs go through `sepvit_jax.train.run.main` in this process (one JAX runtime, one device);
the default run, several devices and several processes need real subprocesses.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import sepvit_jax
from sepvit_jax.train.config import TrainConfig, model_config, parse_args
from tests.training import (
    ROOT,
    SMALL,
    free_port,
    max_abs_difference,
    max_relative_difference,
    model_params,
    read_rows,
    subprocess_env,
    train,
)

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
        f"127.0.0.1:{free_port()}",
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


@pytest.mark.slow
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
