"""train.py's settings without training: recipes and their precedence, --help, the learning-rate
schedule's new ends, the compilation cache's directory, and bad values of the new flags."""

from __future__ import annotations

import json
import re

import numpy as np
import optax
import pytest

from sepvit_jax.train import compile_cache, recipes
from sepvit_jax.train.config import TrainConfig, build_parser, parse_args
from sepvit_jax.train.optim import OptimConfig, make_schedule
from sepvit_jax.train.run import main

TINY = ["--recipe", "imagenet_sepvit_tiny"]

# ---- recipes ---------------------------------------------------------------------------------


def test_a_recipe_sets_the_official_settings():
    cfg = parse_args(TINY)
    assert (cfg.model, cfg.data, cfg.image_size, cfg.epochs) == (
        "sepvit_tiny",
        "imagefolder",
        224,
        300,
    )
    assert cfg.batch_size == 1024 and cfg.lr == pytest.approx(5e-4 * 1024 / 512)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr) == (5.0, 1e-6, 1e-5)
    assert (cfg.weight_decay, cfg.clip_norm, cfg.label_smoothing) == (0.05, 5.0, 0.1)
    assert cfg.randaugment == "rand-m9-mstd0.5-inc1" and cfg.random_erasing == 0.25
    assert (cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.8, 1.0, 0.5)
    assert cfg.repeated_aug == 3 and cfg.ema_decay == 0.0 and cfg.drop_path_rate == 0.2
    rates = {name: parse_args(["--recipe", name]).drop_path_rate for name in recipes.RECIPES}
    assert rates == {
        "imagenet_sepvit_lite": 0.1,
        "imagenet_sepvit_tiny": 0.2,
        "imagenet_sepvit_small": 0.3,
        "imagenet_sepvit_base": 0.5,
    }
    # The schedule it resolves to, for 1,251 steps an epoch (ImageNet-1k at batch 1024).
    optim = cfg.optim_config(1251)
    assert optim.warmup_steps == 5 * 1251 and optim.total_steps == 300 * 1251


def test_flags_beat_config_beat_recipe(tmp_path):
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"epochs": 30, "mixup": 0.2, "recipe": "imagenet_sepvit_base"}))
    cfg = parse_args(["--config", str(run_json), "--mixup", "0.5", "--batch-size", "256"])
    assert cfg.recipe == "imagenet_sepvit_base" and cfg.model == "sepvit_base"
    assert (cfg.epochs, cfg.mixup, cfg.batch_size) == (30, 0.5, 256)
    assert cfg.lr == pytest.approx(5e-4 * 256 / 512)  # scaled by the resolved batch
    assert cfg.cutmix == 1.0  # the recipe's, untouched
    # An explicit lr is not rescaled; an explicit --min-lr-ratio drops the recipe's --min-lr,
    # which would otherwise win over it.
    cfg = parse_args([*TINY, "--lr", "3e-3", "--min-lr-ratio", "0.1", "--batch-size", "64"])
    assert cfg.lr == 3e-3 and cfg.min_lr is None and cfg.optim_config(10).min_lr is None
    # The flag names a recipe over a config file's.
    assert parse_args(["--config", str(run_json), *TINY]).model == "sepvit_tiny"


def test_a_resumed_recipe_run_keeps_its_saved_values(tmp_path):
    # A run's config.json records every resolved value: on --resume they all stand above the
    # recipe (which would otherwise, e.g., put the batch back to 1024 and rescale the lr).
    saved = TrainConfig().replace(recipe="imagenet_sepvit_tiny", batch_size=64, lr=1e-4, epochs=3)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(
        json.dumps({**json.loads(saved.to_json()), "resolved": {"total_steps": 1}})
    )
    cfg = parse_args(["--resume", "--runs-dir", str(tmp_path), "--run-name", "r"])
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.model) == (64, 1e-4, 3, "digits")
    assert cfg.resume and cfg.recipe == "imagenet_sepvit_tiny"


def test_help_lists_the_recipes_and_each_default_once():
    flat = " ".join(build_parser().format_help().split())
    for name, (model, rate, _) in recipes.MODELS.items():
        assert f"{name}: --model {model} --drop-path-rate {rate}" in flat
    assert "--randaugment rand-m9-mstd0.5-inc1" in flat and "liwei109/SepViT" in flat
    assert not re.search(r"\(default[^)]*\) \(default", flat), flat
    assert "(default: the data's name, the date and the time)" in flat


def test_a_json_model_spec_is_written_as_an_object_and_read_back(tmp_path):
    cfg = TrainConfig(model='{"dim": 16, "depth": [1], "heads": 1}')
    written = json.loads(cfg.to_json())
    assert written["model"] == {"dim": 16, "depth": [1], "heads": 1}
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    assert json.loads(parse_args(["--config", str(path)]).model) == written["model"]


# ---- the learning-rate schedule --------------------------------------------------------------


def test_default_schedule_is_unchanged_and_the_new_ends_apply():
    # The default run (44 steps an epoch, 8 epochs, one warm-up epoch) gets exactly optax's
    # warm-up + cosine from 0 to 0, as before the new settings existed.
    default = TrainConfig().optim_config(44)
    assert default.warmup_steps == 44 and default.total_steps == 352
    before = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 44, 352, 0.0)
    ours = make_schedule(default)
    assert all(float(ours(s)) == float(before(s)) for s in range(353))
    # DeiT's ends: warm up from 1e-6, decay to 1e-5.
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, total_steps=100, warmup_init_lr=1e-6, min_lr=1e-5)
    schedule = make_schedule(cfg)
    float32 = 1e-3 * 2**-22  # float32 rounding of arithmetic on values of the peak's size
    assert float(schedule(0)) == pytest.approx(1e-6, abs=float32)
    assert float(schedule(10)) == pytest.approx(1e-3, abs=float32)
    assert float(schedule(100)) == pytest.approx(1e-5, abs=float32)
    assert np.all(np.diff([float(schedule(s)) for s in range(10, 101)]) <= 0)


# ---- the compilation cache's directory -------------------------------------------------------


def test_compile_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve("auto") == tmp_path / "xdg" / "sepvit_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("auto") == tmp_path / "home" / ".cache" / "sepvit_jax" / "xla"
    # An explicit environment wins over our default; a flag wins over both.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.resolve("auto") == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compile_cache.resolve("none") is None and compile_cache.resolve("None") is None


# ---- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
        (["--drop-path-rate", "-0.1"], "--drop-path-rate must be in [0, 1), got -0.1"),
        (["--mixup", "-1"], "--mixup must be >= 0, got -1.0"),
        (["--mixup-switch-prob", "1.5"], "--mixup-switch-prob must be in [0, 1], got 1.5"),
        (["--min-lr=-1e-5"], "--min-lr must be >= 0"),
        (["--recipe", "imagenet_resnet"], "unknown recipe 'imagenet_resnet'; known: imagenet_"),
        (["--resume"], "--resume needs --run-name NAME: the run (a directory under --runs-dir"),
        (["--image-size", "60"], "the nearest sizes that tile: 56 or 112"),
        (["--randaugment", "rand-m9"], "applies to the imagefolder dataset only"),
    ],
)
def test_bad_new_settings_are_one_clear_error(tmp_path, capsys, args, message):
    argv = ["--model", "testing", "--runs-dir", str(tmp_path), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not any(tmp_path.iterdir())  # nothing written
