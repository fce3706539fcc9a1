"""Self-describing models (issue 13): what model/ records of its input and classes, and
--init-from / --eval-only taking the image size from a checkpoint's record."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import sepvit_jax
from sepvit_jax.checkpoint import abstract_model, write_checkpoint
from sepvit_jax.core.config import get_config
from sepvit_jax.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, imagenet
from sepvit_jax.data import DataConfig
from sepvit_jax.data import digits as digits_data
from sepvit_jax.train import describe
from sepvit_jax.train.run import main
from tests.helpers import FIXTURES
from tests.training import make_image_tree, read_rows, train

CONFIG = get_config("testing")  # 3 channels; 56 and 112 both tile its windows


@pytest.fixture(scope="module")
def params():
    # Random weights of the right shapes, without initialising a model (no JAX compilation).
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(CONFIG), nnx.Param))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: 0.02 * rng.standard_normal(x.shape, np.float32), shapes)


@pytest.fixture(scope="module")
def converted_112(tmp_path_factory, params):
    """A testing-variant model as a converter writes one that was told `--image-size 112`."""
    out = tmp_path_factory.mktemp("converted") / "testing_112"
    write_checkpoint(out, CONFIG, params, preprocessing=imagenet(CONFIG, 112))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("data") / "images")


def _imagefolder(tree, tmp_path) -> list[str]:
    return ["--data", "imagefolder", "--data-dir", str(tree), "--runs-dir", str(tmp_path)]


@pytest.mark.slow
def test_init_from_trains_at_the_recorded_size_and_exports_a_described_model(
    tmp_path, capsys, converted_112, images
):
    argv = [*_imagefolder(images, tmp_path), "--init-from", str(converted_112)]
    assert main([*argv, "--run-name", "ft", "--steps", "1", "--batch-size", "8"]) == 0
    assert f"image size 112 from the preprocessing record of {converted_112}" in (
        capsys.readouterr().err
    )
    run_dir = tmp_path / "ft"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == 112
    # `model` names what ran: the architecture of the weights (a --model spec), and the path.
    assert config["model"] == json.loads(json.dumps({**CONFIG.to_dict(), "num_classes": 2}))
    assert config["resolved"]["init_from"] == str(converted_112.absolute())
    meta = json.loads((run_dir / "model" / "sepvit.json").read_text())
    record = meta["preprocessing"]
    assert record["image_size"] == [112, 112] and record["origin"] == "trained"
    assert (tuple(record["mean"]), tuple(record["std"])) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (record["interpolation"], record["crop_fraction"]) == ("bilinear", 0.875)
    assert meta["class_names"] == ["blue", "red"]  # the class folders, in label order
    model = sepvit_jax.load(run_dir / "model")
    assert model.preprocessing.image_size == (112, 112) and model.class_names == ("blue", "red")


@pytest.mark.slow
def test_eval_only_init_from_evaluates_at_the_recorded_size(
    tmp_path, capsys, converted_112, images
):
    argv = [*_imagefolder(images, tmp_path), "--init-from", str(converted_112), "--eval-only"]
    assert main([*argv, "--run-name", "ev"]) == 0
    out = capsys.readouterr()
    assert "image size 112 from the preprocessing record" in out.err
    assert "final test accuracy: " in out.out
    assert main([*argv, "--run-name", "ev", "--image-size", "56"]) == 0  # the flag wins
    assert "preprocessing record" not in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_a_record_that_cannot_be_trained_on_is_one_clear_error(tmp_path, capsys, params, images):
    rect = tmp_path / "rect"
    write_checkpoint(rect, CONFIG, params, preprocessing=imagenet(CONFIG, (112, 56)))
    argv = [*_imagefolder(images, tmp_path), "--run-name", "x"]
    assert main([*argv, "--init-from", str(rect)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records 112x56 images; training takes square ones" in err
    assert main([*argv, "--init-from", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from ") and "not found" in err and err.count("\n") == 1


def test_the_digits_record_reproduces_the_pipeline():
    # Apply the record to the raw 8x8 digits (pixels / 16, bilinear upsampling, then mean and
    # std): exactly the arrays the digits pipeline feeds the model.
    record = describe.preprocessing(DataConfig(image_size=56), channels=1)
    assert record.image_size == (56, 56) and record.crop_fraction == 1.0
    assert record.interpolation == "bilinear" and record.origin == "trained"
    raw, _ = digits_data.raw()
    m = digits_data.bilinear_matrix(8, 56)
    up = m @ (raw / 16.0) @ m.T
    prepared = ((up - record.mean[0]) / record.std[0]).astype(np.float32)[..., None]
    train_idx, eval_idx = digits_data.split_indices()
    arrays = digits_data.arrays(56)
    assert np.array_equal(prepared[train_idx], arrays["train"][0])
    assert np.array_equal(prepared[eval_idx], arrays["eval"][0])


# ---- --init-from, imagefolder, bfloat16 --------------------------------------------------------


@pytest.fixture(scope="module")
def converted_rect_gray(tmp_path_factory) -> Path:
    """The upstream rect_gray fixture (5 classes, 1 channel) through the converter."""
    out = tmp_path_factory.mktemp("converted") / "rect_gray_flax"
    sepvit_jax.save(sepvit_jax.from_torch(FIXTURES / "rect_gray.pt"), out)
    return out


@pytest.mark.slow
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
