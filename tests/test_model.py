"""The models' behaviour: config, named variants, bad input, dropout, jit/grad/vmap, features."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_torch
from sepvit_jax import CONFIGS, SepViT, SepViTConfig, get_config
from sepvit_jax.checkpoint import from_state_dict, nnx_to_state_dict
from tests.helpers import FIXTURES

# Pinned parameter counts of every named variant (the same in torch and Flax).
PARAM_COUNTS = {
    "sepvit_lite": 4_014_728,
    "sepvit_tiny": 34_404_936,
    "sepvit_small": 50_960_456,
    "sepvit_base": 90_196_008,
    "digits": 94_954,
    "testing": 21_962,
}


def small_model(**overrides) -> SepViT:
    return SepViT.from_config(get_config("testing", **overrides), rngs=nnx.Rngs(0))


@nnx.jit
def apply(model, x):
    """One compiled call (eager NNX dispatches and compiles op by op: slow for tests)."""
    return model(x)


@pytest.fixture(scope="module")
def model():
    model = small_model()
    model.eval()
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_pinned_in_both_frameworks(name):
    config = CONFIGS[name]
    abstract = nnx.eval_shape(lambda: SepViT.from_config(config, rngs=nnx.Rngs(0)))
    flax_count = sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):
        torch_count = sum(p.numel() for p in sepvit_torch.SepViT.from_config(config).parameters())
    assert flax_count == torch_count == PARAM_COUNTS[name]


def test_named_variants_have_the_paper_widths():
    assert (CONFIGS["sepvit_lite"].dim, CONFIGS["sepvit_lite"].depth) == (32, (1, 2, 6, 2))
    assert CONFIGS["sepvit_tiny"].heads == (3, 6, 12, 24)
    assert CONFIGS["sepvit_small"].depth == (1, 2, 14, 2)
    assert (CONFIGS["sepvit_base"].dim, CONFIGS["sepvit_base"].heads) == (128, (4, 8, 16, 32))
    assert all(c.dim_head == 32 for n, c in CONFIGS.items() if n.startswith("sepvit"))


def test_config_json_round_trip(tmp_path):
    config = SepViTConfig(
        num_classes=3, dim=8, depth=(1, 2), heads=(1, 2), window_size=(4, 2), ff_mult=2.5
    )
    assert SepViTConfig.from_json(config.to_json()) == config
    (tmp_path / "c.json").write_text(config.to_json())
    assert SepViTConfig.from_json(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match=r"unknown SepViT config keys \['bogus'\]"):
        SepViTConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_sepvit_torch_does_not_import_jax():
    """A torch-only user loads a checkpoint into the torch model without JAX."""
    code = (
        "import sys, sepvit_torch, sepvit_jax.core.infer, sepvit_jax.core.torch_io; "
        f"sepvit_torch.load({str(FIXTURES / 'two_stage_56.pt')!r}); print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


BAD_CONFIGS = [
    (dict(depth=[1, 1]), r"depth must be a tuple"),
    (dict(depth=1), r"depth must be a tuple"),
    (dict(heads=(1, 2, 3)), r"heads has 3 entries .* depth \(1, 1\) has 2 stages"),
    (dict(window_size=(7,)), r"window_size has 1 entries"),
    (dict(dim=0), r"dim must be a positive int, got 0"),
    (dict(dim_head=-4), r"dim_head must be a positive int, got -4"),
    (dict(depth=(1, 0)), r"depth\[1\] must be a positive int, got 0"),
    (dict(heads=(1, 0)), r"heads\[1\] must be a positive int, got 0"),
    (dict(window_size=0), r"window_size must be a positive int, got 0"),
    (dict(num_classes=0), r"num_classes must be a positive int"),
    (dict(channels=0), r"channels must be a positive int"),
    (dict(ff_mult=0.01), r"ff_mult=0.01 gives a feed-forward width of 0"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS)
def test_bad_config_raises_in_both_packages(overrides, message):
    kwargs = {**get_config("testing").to_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        sepvit_torch.SepViT(**kwargs)
    with pytest.raises(ValueError, match=message):
        SepViT(**kwargs, rngs=nnx.Rngs(0))


BAD_INPUTS = [
    ((2, 56, 56), r"expected a 4-D .* image batch, got shape .*3-D"),
    ((2, 56, 56, 3, 1), r"expected a 4-D"),
    ((2, 56, 56, 1), r"expected 3 input channels"),
    (
        (2, 60, 56, 3),
        r"input 60x56: stage 0 has a 15x14 feature map, which is not divisible by "
        r"its window size 7",
    ),
    (
        (1, 84, 84, 3),
        r"stage 1 has a 11x11 feature map, which is not divisible by its window "
        r"size 7",
    ),
]


@pytest.mark.parametrize("shape, message", BAD_INPUTS)
def test_bad_input_raises_before_compute_in_both_packages(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model(jnp.zeros(shape))
    with pytest.raises(ValueError, match=message):
        apply(model, jnp.zeros(shape))  # at trace time, before XLA compiles anything
    nchw = shape[:1] + shape[-1:] + shape[1:-1] if len(shape) == 4 else shape
    torch_message = message.replace("NHWC", "NCHW")
    with pytest.raises(ValueError, match=torch_message):
        sepvit_torch.SepViT.from_config(get_config("testing"))(torch.zeros(nchw))


def test_dropout_follows_train_and_eval():
    x = jax.random.normal(jax.random.key(0), (2, 56, 56, 3))
    model = small_model(dropout=0.3)
    model.eval()
    assert np.array_equal(apply(model, x), apply(model, x))  # eval: deterministic

    model.train()
    first, second = apply(model, x), apply(model, x)
    assert not np.allclose(first, second)  # each call draws a new mask
    model.eval()
    assert not np.allclose(first, apply(model, x))

    replay = small_model(dropout=0.3)  # same rngs -> same masks in the same order
    replay.train()
    assert np.array_equal(apply(replay, x), first) and np.array_equal(apply(replay, x), second)


def test_works_under_jit_grad_and_vmap(model):
    x = jax.random.normal(jax.random.key(1), (3, 56, 56, 3))
    jitted = apply(model, x)
    assert jitted.shape == (3, 10) and np.isfinite(jitted).all()

    @nnx.jit
    def loss_and_grads(model, x):
        return nnx.value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))(model, x)

    loss, grads = loss_and_grads(model, x)
    np.testing.assert_allclose(loss, jnp.mean(jitted**2), rtol=1e-5)
    grad_leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(grad_leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(np.isfinite(g).all() for g in grad_leaves)
    assert any(np.abs(g).max() > 0 for g in grad_leaves)

    # vmap over an extra leading axis of inputs: each slice is one batch.
    mapped = nnx.jit(lambda m, xs: jax.vmap(m)(xs))(model, jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(mapped[0], jitted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mapped[1], apply(model, 2 * x), rtol=1e-5, atol=1e-6)


def test_features_give_every_stage_map():
    model = SepViT(
        num_classes=4,
        dim=8,
        depth=(1, 1, 1),
        heads=2,
        window_size=(2, 2, 1),
        dim_head=4,
        rngs=nnx.Rngs(0),
    )
    maps = nnx.jit(lambda m, x: m.features(x))(model, jnp.zeros((2, 32, 48, 3)))
    assert [m.shape for m in maps] == [(2, 8, 12, 8), (2, 4, 6, 16), (2, 2, 3, 32)]
    torch_model = sepvit_torch.SepViT.from_config(model.config)
    torch_maps = torch_model.features(torch.zeros(2, 3, 32, 48))
    assert [tuple(m.shape) for m in torch_maps] == [(2, 8, 8, 12), (2, 16, 4, 6), (2, 32, 2, 3)]


def test_bfloat16_compute_with_float32_params(model):
    low_model = from_state_dict(model.config, nnx_to_state_dict(model), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (2, 56, 56, 3))
    low = apply(low_model, x)
    assert low.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low_model, nnx.Param)))
    high = apply(model, x)
    assert float(jnp.abs(low.astype(jnp.float32) - high).max()) < 0.1 * float(jnp.abs(high).max())
