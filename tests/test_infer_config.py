"""Config inference from the weights (infer_config, resolve_config): the golden fixtures, flags,
non-integral ff_mult, and shapes that contradict each other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.infer import infer_config, resolve_config
from sepvit_jax.core.torch_io import CheckpointError, read_state_dict
from tests.helpers import FIXTURES, GOLDEN_CASES, fixture_sd


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return fixture_sd()


# ---- infer_config --------------------------------------------------------------------------


def _expected_config(case: str) -> SepViTConfig:
    kwargs = json.loads((FIXTURES / f"{case}.json").read_text())["sepvit_kwargs"]
    # The fixtures come from upstream, whose blocks always use window size 7 and dim_head 32.
    return SepViTConfig.from_dict({**kwargs, "window_size": 7, "dim_head": 32})


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_infer_config_fixtures(case):
    resolved = resolve_config(read_state_dict(FIXTURES / f"{case}.pt"))
    config, sources = resolved.config, resolved.sources
    assert config == _expected_config(case)
    # Types matter too (heads int vs tuple, ff_mult int), not only ==.
    assert type(config.heads) is type(_expected_config(case).heads)
    assert type(config.ff_mult) is int
    assert sources["window_size"] == "default" and sources["dropout"] == "default"
    for field in ("num_classes", "dim", "depth", "heads", "dim_head", "ff_mult", "channels"):
        assert sources[field] == "weights"


def test_infer_config_from_torch_tensors_and_flags(sd):
    resolved = resolve_config(sd, flags={"window_size": (7, 7), "dropout": 0.1})
    assert resolved.config.window_size == 7 and resolved.config.dropout == 0.1
    assert resolved.sources["window_size"] == "flag" and resolved.sources["dropout"] == "flag"
    config = infer_config(sd, window_size=[7, 4])
    assert config.window_size == (7, 4)
    config = infer_config(sd, window_size=14)
    assert config.window_size == 14
    with pytest.raises(CheckpointError, match=r"window_size \(7, 7, 7\) has 3 entries.*2 stages"):
        infer_config(sd, window_size=(7, 7, 7))


def _shapes(case: str = "three_stage_112") -> dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, np.float32) for k, v in fixture_sd(case).items()}


def _set_ff(state, inner_of):
    for key in list(state):
        if key.endswith(".1.net.1.weight"):
            d = state[key].shape[1]
            state[key] = np.zeros((inner_of(d), d, 1, 1), np.float32)
            state[key.replace("weight", "bias")] = np.zeros((inner_of(d),), np.float32)
            state[key.replace("net.1.weight", "net.4.weight")] = np.zeros(
                (d, inner_of(d), 1, 1), np.float32
            )


@pytest.mark.parametrize("ff_mult", [1.3, 2.5, 3])
def test_infer_non_integral_ff_mult(ff_mult):
    state = _shapes()
    _set_ff(state, lambda d: int(d * ff_mult))
    config = resolve_config(state).config
    assert config.ff_mult == ff_mult and type(config.ff_mult) is type(ff_mult)
    dims = config.stage_dims
    assert [config.ff_inner_dim(i) for i in range(3)] == [int(d * ff_mult) for d in dims]


def _replace(state, key, shape):
    state[key] = np.zeros(shape, np.float32)
    return state


CONTRADICTIONS = {
    "stage width": (
        lambda s: _replace(s, "layers.1.0.conv.weight", (40, 24, 3, 3)),
        r"layers.1.0.conv.weight: checkpoint \(40, 24, 3, 3\), model expects \(48, 24, 3, 3\)",
    ),
    "dim_head": (
        lambda s: _replace(s, "layers.2.2.layers.0.0.window_tokens_to_qk.0.weight", (16,)),
        r"layers.2.2.layers.0.0.window_tokens_to_qk.0.weight: checkpoint \(16,\), model "
        r"expects \(32,\)",
    ),
    "ff_mult": (
        lambda s: _replace(
            _replace(s, "layers.1.2.layers.0.1.net.1.weight", (192, 48, 1, 1)),
            "layers.1.2.layers.0.1.net.4.weight",
            (48, 192, 1, 1),
        ),
        r"'layers.1.2.layers.0.1.net.1.weight' has 192 rows.*ff_mult",
    ),
    "heads within a stage": (
        lambda s: _replace(s, "layers.0.2.layers.1.0.to_qkv.weight", (288, 24, 1)),
        r"layers.0.2.layers.1.0.to_qkv.weight: checkpoint \(288, 24, 1\), model expects "
        r"\(192, 24, 1\)",
    ),
    "qkv not a multiple": (
        lambda s: _replace(s, "layers.0.2.layers.0.0.to_qkv.weight", (100, 24, 1)),
        r"'layers.0.2.layers.0.0.to_qkv.weight' has 100 rows, not a multiple of 3 \* dim_head",
    ),
    "head width": (
        lambda s: _replace(s, "mlp_head.2.weight", (7, 24)),
        r"mlp_head.2.weight: checkpoint \(7, 24\), model expects \(7, 96\)",
    ),
    "missing key": (
        lambda s: {k: v for k, v in s.items() if not k.endswith("1.2.layers.0.0.to_out.0.weight")},
        r"missing keys \(1\): layers.1.2.layers.0.0.to_out.0.weight",
    ),
    "stage gap": (
        lambda s: {k: v for k, v in s.items() if not k.startswith("layers.1.")},
        r"stages \[0, 2\] but not \[1\]",
    ),
    "block gap": (
        lambda s: {k: v for k, v in s.items() if not k.startswith("layers.0.2.layers.0.")},
        r"layers.0 blocks \[1\] but not \[0\]",
    ),
}


@pytest.mark.parametrize("name", list(CONTRADICTIONS))
def test_infer_contradictory_shapes_raise(name):
    corrupt, pattern = CONTRADICTIONS[name]
    with pytest.raises(CheckpointError, match=pattern):
        resolve_config(corrupt(_shapes()))
