"""The weight table: complete, bijective, bitwise round trips, and every error reported at once."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_torch
from sepvit_jax import CONFIGS, SepViT, get_config
from sepvit_jax.checkpoint import from_state_dict, nnx_to_state_dict, state_dict_to_nnx
from sepvit_jax.core.table import weight_table
from tests.helpers import GOLDEN_CASES, golden_params, load_golden


def abstract_model(config):
    return nnx.eval_shape(lambda: SepViT.from_config(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_matches_both_models_exactly(name):
    """Each torch key and each Flax parameter appears in exactly one row, shapes agreeing."""
    config = CONFIGS[name]
    rows = weight_table(config)
    with torch.device("meta"):
        torch_shapes = {
            k: tuple(v.shape)
            for k, v in sepvit_torch.SepViT.from_config(config).state_dict().items()
        }
    assert [r.torch_key for r in rows] == list(torch_shapes)  # same keys, same order

    flax_params = dict(nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param)))
    assert sorted(r.flax_path for r in rows) == sorted(flax_params)
    for row in rows:
        flax_shape = tuple(flax_params[row.flax_path].shape)
        torch_shape = row.transform.to_torch(np.empty(flax_shape, np.int8)).shape
        assert torch_shape == torch_shapes[row.torch_key], row


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_round_trip_is_bitwise(case):
    config, arrays = load_golden(case)
    state_dict = {k: v.astype(np.float32) for k, v in golden_params(arrays).items()}
    model = state_dict_to_nnx(SepViT.from_config(config, rngs=nnx.Rngs(1)), state_dict)
    back = nnx_to_state_dict(model)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_round_trip_from_torch_tensors_bfloat16_and_float64():
    config = get_config("testing")
    source = sepvit_torch.SepViT.from_config(config).state_dict()
    as_bf16 = {k: v.to(torch.bfloat16) for k, v in source.items()}
    model = from_state_dict(config, as_bf16)
    back = nnx_to_state_dict(model)
    for key, value in as_bf16.items():
        assert np.array_equal(back[key], value.float().numpy()), key  # bf16 -> f32 is exact
    with jax.enable_x64(True):
        model64 = from_state_dict(
            config,
            {k: v.double() for k, v in source.items()},
            dtype=np.float64,
            param_dtype=np.float64,
        )
        back64 = nnx_to_state_dict(model64)
    assert all(v.dtype == np.float64 for v in back64.values())
    assert all(np.array_equal(back64[k], source[k].double().numpy()) for k in source)


def test_every_problem_reported_together_and_model_untouched():
    config = get_config("testing")
    model = SepViT.from_config(config, rngs=nnx.Rngs(0))
    before = nnx_to_state_dict(model)
    bad = dict(before)
    del bad["layers.0.0.conv.weight"]
    del bad["mlp_head.2.bias"]
    bad["layers.0.2.layers.0.0.window_tokens"] = np.zeros(5, np.float32)
    bad["layers.1.1.proj.weight"] = np.zeros((32, 3, 3, 1), np.float32)
    bad["classifier.weight"] = np.zeros(3, np.float32)
    bad["layers.0.3.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        state_dict_to_nnx(model, bad)
    message = str(info.value)
    for expected in (
        "missing keys (2): layers.0.0.conv.weight, mlp_head.2.bias",
        "unexpected keys (2): classifier.weight, layers.0.3.extra",
        "layers.0.2.layers.0.0.window_tokens: checkpoint (5,), model expects (16,)",
        "layers.1.1.proj.weight: checkpoint (32, 3, 3, 1), model expects (32, 1, 3, 3)",
    ):
        assert expected in message, message
    after = nnx_to_state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_transforms_are_not_guessed_from_rank():
    """Depthwise PEG kernels and 3-D Conv1d weights each get their own transform."""
    rows = {r.torch_key: r.transform.name for r in weight_table(get_config("testing"))}
    assert rows["layers.0.1.proj.weight"] == "conv2d"
    assert rows["layers.0.0.conv.weight"] == "conv2d"
    assert rows["layers.0.2.layers.0.0.to_qkv.weight"] == "conv1d_1x1"
    assert rows["layers.0.2.layers.0.0.window_tokens_to_qk.3.weight"] == "conv1d_1x1"
    assert rows["layers.0.2.layers.0.1.net.1.weight"] == "conv2d_1x1"
    assert rows["layers.0.2.norm.g"] == "chan_norm"
    assert rows["mlp_head.2.weight"] == "linear"
