"""`sepvit_jax.list_models` / `create_model`, and the preprocessing record every saved model
carries, through save, the converter and (tests/test_train_*.py) training outputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

import sepvit_jax
from convert.cli import main as convert
from sepvit_jax.checkpoint import describe
from sepvit_jax.core.preprocessing import Preprocessing, imagenet
from tests.helpers import FIXTURES


def num_params(model) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_list_models_names_every_variant():
    assert sepvit_jax.list_models() == sorted(sepvit_jax.CONFIGS)
    assert "testing" in sepvit_jax.list_models()


def test_create_model_by_name_with_overrides():
    model = sepvit_jax.create_model("testing", num_classes=3, dropout=0.1, drop_path_rate=0.1)
    assert model.config == sepvit_jax.get_config("testing", num_classes=3, dropout=0.1)
    assert model.preprocessing == imagenet(model.config) and model.preprocessing.origin == "default"
    with pytest.raises(ValueError, match="unknown SepViT variant 'nope'"):
        sepvit_jax.create_model("nope")


def test_preprocessing_round_trips_through_save(tmp_path):
    model = sepvit_jax.create_model("testing")
    record = Preprocessing((112, 112), (0.5,) * 3, (0.25,) * 3, "bilinear", 0.9, "trained")
    describe(model, record, [f"class {i}" for i in range(10)])
    sepvit_jax.save(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "sepvit.json").read_text())
    assert meta["preprocessing"]["tiled_sizes"][:4] == [53, 54, 55, 56]  # for readers
    again = sepvit_jax.create_model("testing", checkpoint=tmp_path / "m")
    assert again.preprocessing == record and again.class_names[3] == "class 3"
    # A new head for other classes: zero-initialised, class names dropped.
    tuned = sepvit_jax.create_model("testing", checkpoint=tmp_path / "m", num_classes=4)
    assert tuned.config.num_classes == 4 and tuned.class_names is None
    assert not np.any(np.asarray(tuned.mlp_head.fc.kernel[...]))
    assert num_params(tuned) == num_params(again) - 6 * (32 + 1)  # 6 classes of 32 inputs


def test_preprocessing_round_trips_through_the_converter(tmp_path, capsys):
    out = tmp_path / "converted"
    args = ["torch2flax", str(FIXTURES / "two_stage_56.pt"), "-o", str(out), "--image-size", "112"]
    assert convert(args) == 0
    assert convert(["inspect", str(out)]) == 0
    assert "preprocessing (given): 112x112" in capsys.readouterr().out
    model = sepvit_jax.create_model(
        "testing", checkpoint=out, dim=16, dim_head=32, heads=(1, 2), window_size=7
    )
    assert model.preprocessing.image_size == (112, 112) and model.preprocessing.origin == "given"
    # A torch file directly: the defaults, since a torch checkpoint does not say.
    direct = sepvit_jax.create_model(
        "testing", checkpoint=FIXTURES / "two_stage_56.pt", dim_head=32, heads=(1, 2)
    )
    assert direct.preprocessing.origin == "default"


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    sepvit_jax.save(sepvit_jax.create_model("testing"), tmp_path / "m")
    with pytest.raises(ValueError, match=r"not a digits: it has dim=16 \(not 32\)"):
        sepvit_jax.create_model("digits", checkpoint=tmp_path / "m")
