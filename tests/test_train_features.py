"""The training options of issue 12: EMA of the parameters, mixup/cutmix in the step, drop path
and remat, and an exact resume with all of them on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sepvit_jax
from sepvit_jax import sharding
from sepvit_jax.core.config import get_config
from sepvit_jax.train import optim, state, steps
from sepvit_jax.train import run as run_module
from sepvit_jax.train.mixing import Mixing
from sepvit_jax.train.run import main
from sepvit_jax.train.settings import TrainConfig
from sepvit_jax.train.startup import init_compile_options
from sepvit_jax.train.weights import better_of
from tests.training import TIMING, read_rows, subprocess_env

CONFIG = get_config("testing")  # 3 channels, 10 classes; 56x56 inputs


def _batch(mesh, n=16, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    local = {
        "image": rng.standard_normal((n, 56, 56, 3), dtype=np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }
    return sharding.global_batch(local, sharding.batch_sharding(mesh))


def _same_layout(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    same_tree = jax.tree.structure(a) == jax.tree.structure(b)
    return same_tree and all(x == y for x, y in zip(leaves_a, leaves_b, strict=True))


def _host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(nnx.to_pure_dict(tree)))]


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh("data=1", devices=jax.devices()[:1])


# ---- EMA -------------------------------------------------------------------------------------


def _build(plan):
    return plan.build(init_compile_options(jax.devices()[0].platform))  # as train.py builds


@pytest.mark.slow
def test_ema_follows_the_parameters_and_changes_nothing_else(mesh):
    decay = 0.75
    trajectories = {}
    for ema in (False, True):
        optim_cfg = optim.OptimConfig(ema_decay=decay if ema else 0.0)
        optimizer = optax.sgd(0.1)
        plan = steps.plan_state(CONFIG, optimizer, mesh, seed=0, ema=ema)
        if ema:  # placed by the sharding rules exactly like the parameters
            assert _same_layout(plan.shardings["ema"], plan.shardings["params"])
        train_state = _build(plan)
        train_step = steps.make_train_step(plan.graphs, optimizer, optim_cfg, plan.shardings, mesh)
        seen = [_host(train_state["params"])]
        if ema:  # the average starts as the initial parameters
            assert all(
                np.array_equal(a, b)
                for a, b in zip(_host(train_state["ema"]), seen[0], strict=True)
            )
        for i in range(2):
            train_state, _ = train_step(train_state, _batch(mesh, seed=i))
            seen.append(_host(train_state["params"]))
        trajectories[ema] = seen
        if ema:
            expected = seen[0]
            for params in seen[1:]:
                expected = [
                    decay * e + (1 - decay) * p for e, p in zip(expected, params, strict=True)
                ]
            got = _host(train_state["ema"])
            # float32: the step computes e + (1 - d)(p - e), this test d*e + (1 - d)*p.
            scale = max(float(np.abs(e).max()) for e in expected)
            diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
            assert diff <= 4e-7 * scale
            assert (
                max(float(np.abs(g - p).max()) for g, p in zip(got, seen[-1], strict=True)) > 1e-3
            )
    # Keeping an average does not touch the parameters' own trajectory.
    for without, with_ema in zip(trajectories[False], trajectories[True], strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(without, with_ema, strict=True))


def test_better_of_prefers_the_ema_only_when_strictly_better():
    assert better_of({"test_accuracy": 0.5}) == ("params", {})
    tie = {"test_accuracy": 0.5, "ema_test_accuracy": 0.5}
    assert better_of(tie)[0] == "params"
    assert better_of({**tie, "ema_test_accuracy": 0.51}) == (
        "ema",
        {"test_accuracy": 0.5, "ema_test_accuracy": 0.51},
    )


@pytest.mark.slow
def test_ema_is_sharded_like_the_parameters_over_fsdp():
    # 8 simulated devices: the fsdp rule really shards sepvit_tiny's large kernels, and the
    # average is laid out exactly as the parameters (nothing is built: shapes only).
    code = """
import jax, json, optax
from sepvit_jax import sharding
from sepvit_jax.core.config import get_config
from sepvit_jax.train import steps
mesh = sharding.make_mesh("data=2,fsdp=4")
plan = steps.plan_state(get_config("sepvit_tiny"), optax.adamw(1e-3), mesh, seed=0, ema=True)
ema, params = plan.shardings["ema"], plan.shardings["params"]
same = jax.tree.structure(ema) == jax.tree.structure(params) and all(
    a == b for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))
specs = [str(s.spec) for s in jax.tree.leaves(plan.shardings["ema"])]
print("RESULT " + json.dumps({"same": same, "fsdp": sum("fsdp" in s for s in specs)}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["same"] and result["fsdp"] > 0


# ---- mixup / cutmix --------------------------------------------------------------------------


def test_mixing_draws_from_seed_and_step_only(mesh):
    batch = _batch(mesh)

    def mixer(seed):
        mixing = Mixing(0.8, 1.0, 0.5, seed=seed)
        return jax.jit(lambda b, k: mixing(b, k, 10, 0.1))

    mix = {seed: mixer(seed) for seed in (3, 4)}
    first, again, second = mix[3](batch, 0), mix[3](batch, 0), mix[3](batch, 1)
    other_seed = mix[4](batch, 0)
    assert all(np.array_equal(first[k], again[k]) for k in ("image", "target"))
    assert not np.array_equal(first["target"], second["target"])
    assert not np.array_equal(first["target"], other_seed["target"])
    targets = np.asarray(first["target"])
    assert targets.shape == (16, 10) and np.allclose(targets.sum(-1), 1.0, rtol=0, atol=1e-6)
    assert targets.min() >= 0.1 / 10 - 1e-7  # label smoothing folded in


@pytest.mark.slow
def test_the_step_trains_on_soft_targets_and_scores_their_argmax(mesh):
    mixing = Mixing(0.8, 1.0, 0.5, seed=0)
    optim_cfg = optim.OptimConfig()
    optimizer = optim.make_optimizer(optim_cfg)
    plan = steps.plan_state(CONFIG, optimizer, mesh, seed=0)
    train_state = _build(plan)
    params, rest = train_state["params"], train_state["rest"]
    batch = _batch(mesh)
    # What the step should see: the batch mixed for step 0, the model before the update.
    mixed = jax.jit(lambda b: mixing(b, 0, 10, optim_cfg.label_smoothing))(batch)
    logits = jax.jit(lambda p, r, x: nnx.merge(plan.graphs.eval, p, r)(x))(
        params, rest, mixed["image"]
    )
    targets = np.asarray(mixed["target"])
    accuracy = float(np.mean(np.asarray(logits).argmax(-1) == targets.argmax(-1)))
    loss = float(optim.soft_cross_entropy(logits, targets).mean())
    train_step = steps.make_train_step(
        plan.graphs, optimizer, optim_cfg, plan.shardings, mesh, mixing=mixing
    )
    _, metrics = train_step(train_state, batch)
    assert float(metrics["accuracy"]) == accuracy
    # Two XLA programs computing the same float32 loss (fusion differs): agree to ~1e-6.
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)


# ---- drop path and remat ---------------------------------------------------------------------


def test_drop_path_and_remat_reach_the_model():
    options = steps.ModelOptions(drop_path_rate=0.1, remat=True)
    model = nnx.eval_shape(lambda: state._build(CONFIG, "float32", jax.random.key(0), options))
    stages = [layer.transformer for layer in model.layers]
    assert all(t.remat for t in stages)
    # timm's schedule: 0 at the first of the 2 blocks (no layer), the full rate at the last.
    rates = [block.drop_path for t in stages for block in t.layers]
    assert rates[0] is None and rates[-1] is not None
    plain = nnx.eval_shape(
        lambda: state._build(CONFIG, "float32", jax.random.key(0), steps.ModelOptions())
    )
    assert all(
        block.drop_path is None for layer in plain.layers for block in layer.transformer.layers
    )


# ---- an exact resume with everything on ------------------------------------------------------

FEATURES = ["--ema-decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path-rate", "0.1"]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """`straight`: 7 steps; `split`: stopped at 5, its step-5 checkpoint lost, resumed from 3
    (the resuming invocation exports the EMA whatever the accuracies say, see below)."""
    root = tmp_path_factory.mktemp("runs")
    # Batch 256: 5 steps an epoch, so evaluation and a reshuffle come after the resume point;
    # dropout and drop path on, so the RNG state must be restored; 2 micro-batches.
    args = ["--model", "testing,dropout=0.1", "--batch-size", "256", "--steps", "7", *FEATURES]
    args += ["--grad-accum", "2", "--checkpoint-every", "3", "--log-every", "1"]
    args += ["--runs-dir", str(root)]
    assert main([*args, "--run-name", "straight"]) == 0
    assert main([*args, "--run-name", "split", "--stop-at-step", "5"]) == 0
    shutil.rmtree(root / "split" / "checkpoints" / "5")
    # The exported parameters are whichever evaluated better; force the EMA here, so that
    # both ways out are exercised (`straight` takes the natural choice).
    forced = lambda result: ("ema", {"test_accuracy": 0.0, "ema_test_accuracy": 1.0})  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "better_of", forced)
        assert main([*args, "--run-name", "split", "--resume"]) == 0
    return root


def _final_state(run_dir) -> dict:
    return ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "7" / "state")


def _exported(run_dir) -> list[np.ndarray]:
    model = sepvit_jax.load(run_dir / "model")
    return _host(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_resume_with_ema_mixup_and_drop_path_is_bitwise(resumed_runs):
    straight, split = _final_state(resumed_runs / "straight"), _final_state(resumed_runs / "split")
    leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s)]  # noqa: E731
    assert jax.tree.structure(straight) == jax.tree.structure(split)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(straight), leaves(split), strict=True))
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    rows = untimed(read_rows(resumed_runs / "straight"))
    assert untimed(read_rows(resumed_runs / "split")) == rows
    evals = [r for r in rows if "test_accuracy" in r]
    assert [r["step"] for r in evals] == [5, 7]
    assert all({"ema_test_accuracy", "ema_test_loss"} <= r.keys() for r in evals)


@pytest.mark.slow
def test_the_export_is_the_chosen_parameters_and_says_so(resumed_runs):
    for name in ("straight", "split"):
        run_dir = resumed_runs / name
        config = json.loads((run_dir / "config.json").read_text())
        meta = json.loads((run_dir / "model" / "sepvit.json").read_text())
        chosen = config["resolved"]["exported"]["parameters"]
        assert meta["source"]["parameters"] == chosen
        final = _final_state(run_dir)
        expected = [
            np.asarray(x) for x in jax.tree.leaves(final["ema" if chosen == "ema" else "params"])
        ]
        assert all(np.array_equal(a, b) for a, b in zip(_exported(run_dir), expected, strict=True))
        # The settings are recorded under their flag names.
        assert (config["ema_decay"], config["mixup"], config["cutmix"]) == (0.9, 0.8, 1.0)
        assert config["drop_path_rate"] == 0.1 and config["remat"] is False
    assert json.loads((resumed_runs / "split" / "config.json").read_text())["resolved"][
        "exported"
    ] == {"parameters": "ema", "test_accuracy": 0.0, "ema_test_accuracy": 1.0}
    # The natural choice: the EMA only if it evaluated strictly better at the last step.
    last = read_rows(resumed_runs / "straight")[-1]
    natural = "ema" if last["ema_test_accuracy"] > last["test_accuracy"] else "raw"
    straight = json.loads((resumed_runs / "straight" / "config.json").read_text())
    assert straight["resolved"]["exported"]["parameters"] == natural


def test_a_resume_cannot_add_the_moving_average(tmp_path, capsys):
    # A run started without EMA (its config.json and a checkpoint directory are all that is
    # read before the refusal: nothing compiles).
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints" / "1").mkdir(parents=True)
    saved = json.loads(TrainConfig(model="testing").to_json())
    (run_dir / "config.json").write_text(json.dumps({**saved, "resolved": {}}))
    argv = ["--runs-dir", str(tmp_path), "--run-name", "r", "--resume", "--ema-decay", "0.9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was started with --ema-decay 0.0" in err
