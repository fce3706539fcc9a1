"""Stochastic depth (`drop_path_rate`, both models) and rematerialisation (`remat`, JAX).

Drop path: timm's per-block schedule, one draw per sample and branch with 1/keep scaling in
training, identity in eval, nothing changed at rate 0 (state, state_dict, config), JAX and torch
the same function in eval mode. Remat: the same gradients, RNG masks included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_jax
import sepvit_torch
from sepvit_jax import SepViT, SepViTConfig, get_config
from sepvit_jax.checkpoint import nnx_to_state_dict, state_dict_to_nnx
from sepvit_jax.layers import drop_path_layer
from sepvit_torch.model import drop_path
from tests.helpers import assert_close, nchw_to_nhwc

CONFIG = get_config("testing")  # blocks: stage 0 block 0, stage 1 block 0


def jax_block_rates(model: SepViT) -> list[float]:
    return [
        0.0 if block.drop_path is None else block.drop_path.rate
        for stage in model.layers
        for block in stage.transformer.layers
    ]


def torch_block_rates(model: sepvit_torch.SepViT) -> list[float]:
    return [rate for stage in model.layers for rate in stage[2].drop_path_rates]


@pytest.mark.parametrize("depth, rate", [((1, 1), 0.5), ((2, 3, 1), 0.3), ((1,), 0.2)])
def test_schedule_rises_linearly_over_all_blocks(depth, rate):
    config = get_config("testing", depth=depth, heads=1, window_size=1)
    model = nnx.eval_shape(
        lambda: SepViT.from_config(config, rngs=nnx.Rngs(0), drop_path_rate=rate)
    )
    with torch.device("meta"):
        torch_model = sepvit_torch.SepViT.from_config(config, drop_path_rate=rate)
    rates = jax_block_rates(model)
    assert rates == torch_block_rates(torch_model)  # bit-identical Python floats
    np.testing.assert_allclose(rates, torch.linspace(0, rate, sum(depth)).tolist(), atol=1e-7)
    assert rates[0] == 0.0 and (len(rates) == 1 or rates[-1] == rate)


@pytest.mark.parametrize("rate", [1.0, -0.1, "0.1", True])
def test_bad_rate_raises_in_both(rate):
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), drop_path_rate=rate)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        sepvit_torch.SepViT.from_config(CONFIG, drop_path_rate=rate)


@pytest.mark.slow
def test_rate_zero_changes_nothing_and_rate_changes_no_weight(tmp_path):
    plain = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0))
    zero = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), drop_path_rate=0.0)
    assert nnx.graphdef(zero) == nnx.graphdef(plain)
    state, zero_state = nnx.state(plain), nnx.state(zero)
    assert jax.tree.structure(zero_state) == jax.tree.structure(state)
    assert all(map(np.array_equal, jax.tree.leaves(zero_state), jax.tree.leaves(state)))
    assert not jax.tree.leaves(nnx.state(zero, nnx.RngState))  # no RNG stream, as before
    assert zero.config == CONFIG and "drop_path_rate" not in CONFIG.to_dict()

    # With a rate, the same seed still gives the same weights; only drop-path RNG streams appear.
    some = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), drop_path_rate=0.4)
    assert some.config == CONFIG
    params, some_params = nnx_to_state_dict(plain), nnx_to_state_dict(some)
    assert all(np.array_equal(params[k], some_params[k]) for k in params)
    rng_paths = [path for path, _ in nnx.to_flat_state(nnx.state(some, nnx.RngState))]
    assert rng_paths and all("drop_path" in path for path in rng_paths)
    loaded = sepvit_jax.load(sepvit_jax.save(some, tmp_path / "model"))  # checkpoints as before
    assert SepViTConfig.from_json(tmp_path / "model" / "config.json") == CONFIG
    assert all(np.array_equal(params[k], v) for k, v in nnx_to_state_dict(loaded).items())

    torch.manual_seed(0)
    torch_plain = sepvit_torch.SepViT.from_config(CONFIG).state_dict()
    torch.manual_seed(0)
    torch_some = sepvit_torch.SepViT.from_config(CONFIG, drop_path_rate=0.4).state_dict()
    assert list(torch_plain) == list(torch_some)
    assert all(torch.equal(torch_plain[k], torch_some[k]) for k in torch_plain)


def test_eval_mode_is_identity_and_jax_matches_torch():
    torch.manual_seed(0)
    torch_model = sepvit_torch.SepViT.from_config(CONFIG, drop_path_rate=0.5).eval()
    reference = sepvit_torch.SepViT.from_config(CONFIG).eval()
    reference.load_state_dict(torch_model.state_dict(), strict=True)
    model = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), drop_path_rate=0.5)
    state_dict_to_nnx(model, torch_model.state_dict())
    model.eval()

    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        expected = torch_model(x)
        assert torch.equal(expected, reference(x))  # eval: drop path off
        torch_model.train()
        assert not torch.allclose(torch_model(x), expected)  # train: on
    assert_close(nnx.jit(lambda m, y: m(y))(model, nchw_to_nhwc(x)), expected, 1e-5, "logits")


@pytest.mark.parametrize("rate", [0.25, 0.6])
def test_one_draw_per_sample_scaled_by_one_over_keep(rate):
    """Each sample's branch is all zero (probability `rate`) or all 1/keep; the mean stays 1."""
    batch, keep = 8192, 1.0 - rate
    layer = drop_path_layer(rate, nnx.Rngs(dropout=3))
    jax_out = np.asarray(layer(jnp.ones((batch, 2, 3, 4))))
    torch.manual_seed(3)
    torch_out = drop_path(torch.ones(batch, 4, 2, 3), rate, training=True).numpy()
    sigma = np.sqrt(rate * keep / batch)
    for out in (jax_out, torch_out):
        per_sample = out.reshape(batch, -1)
        assert np.all(per_sample == per_sample[:, :1])  # one draw for the whole sample
        values = set(np.unique(per_sample).tolist())
        assert values <= {0.0, np.float32(1 / keep).item()}
        dropped = np.mean(per_sample[:, 0] == 0)
        assert abs(dropped - rate) < 5 * sigma, dropped
        assert abs(per_sample.mean() - 1.0) < 5 * sigma / keep
    assert np.array_equal(drop_path(torch.ones(3, 2), rate, training=False), torch.ones(3, 2))
    assert drop_path_layer(0.0, nnx.Rngs(0)) is None


def branch_outcomes(out, x, attn, ff, keep):
    """Per sample, which of the branches (attention, feed-forward) the block kept.

    Candidates: x1 = x + m_a * attn(x) / keep, out = x1 + m_f * ff(x1) / keep, m in {0, 1}.
    """
    x_kept = x + attn(x) / keep
    candidates = {
        (0, 0): x,
        (0, 1): x + ff(x) / keep,
        (1, 0): x_kept,
        (1, 1): x_kept + ff(x_kept) / keep,
    }
    outcomes = []
    for i in range(out.shape[0]):
        matches = [k for k, c in candidates.items() if np.allclose(out[i], c[i], atol=1e-5)]
        assert len(matches) == 1, (i, matches)
        outcomes.append(matches[0])
    return np.array(outcomes)


def check_outcome_statistics(outcomes, keep):
    sigma = np.sqrt(keep * (1 - keep) / len(outcomes))
    assert abs(outcomes[:, 0].mean() - keep) < 5 * sigma  # attention branch kept
    assert abs(outcomes[:, 1].mean() - keep) < 5 * sigma  # feed-forward branch kept
    both = np.mean(outcomes[:, 0] * outcomes[:, 1])
    assert abs(both - keep**2) < 5 * sigma  # independent draws


def test_each_branch_of_a_block_is_dropped_per_sample():
    """The last block (rate 0.5 of 0.5) in training: both models, each branch on its own."""
    rate, batch = 0.5, 512
    keep = 1.0 - rate
    x = np.random.default_rng(0).standard_normal((batch, 7, 7, 32)).astype(np.float32)

    model = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), drop_path_rate=rate)
    block = model.layers[1].transformer.layers[0]
    assert block.drop_path.rate == rate
    out = nnx.jit(lambda b, y: b(y))(block, x)  # training mode: drop path on
    attn_fn = nnx.jit(lambda b, y: b.attn(y))  # no dropout: the branches are deterministic
    ff_fn = nnx.jit(lambda b, y: b.ff(y))
    outcomes = branch_outcomes(
        np.asarray(out),
        x,
        lambda y: np.asarray(attn_fn(block, y)),
        lambda y: np.asarray(ff_fn(block, y)),
        keep,
    )
    check_outcome_statistics(outcomes, keep)

    torch.manual_seed(0)
    transformer = sepvit_torch.SepViT.from_config(CONFIG, drop_path_rate=rate).layers[1][2]
    ((attn_t, ff_t),) = transformer.layers
    assert transformer.drop_path_rates == (rate,)

    def run(module, y):
        with torch.no_grad():
            nchw = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2)))
            return module(nchw).numpy().transpose(0, 2, 3, 1)

    transformer.train()  # the last stage has no norm: the transformer is its one block
    outcomes = branch_outcomes(
        run(transformer, x), x, lambda y: run(attn_t, y), lambda y: run(ff_t, y), keep
    )
    check_outcome_statistics(outcomes, keep)


def loss_and_grads(model, x):
    return nnx.value_and_grad(lambda m, y: jnp.mean(m(y) ** 2))(model, x)


@pytest.mark.slow
def test_remat_gives_the_same_gradients_and_masks():
    """Training mode with drop path: nnx.remat replays each block's RNG draws when recomputing.

    (Config dropout would test the same replay at twice the compile time.)
    """
    x = jax.random.normal(jax.random.key(1), (4, 56, 56, 3))
    results = []
    for remat in (False, True):
        model = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), drop_path_rate=0.6, remat=remat)
        loss, grads = nnx.jit(loss_and_grads)(model, x)
        rng_counts = jax.tree.leaves(nnx.state(model, nnx.RngCount))
        results.append((loss, nnx.to_pure_dict(nnx.state(grads, nnx.Param)), rng_counts))
    (loss, grads, counts), (remat_loss, remat_grads, remat_counts) = results
    assert any(counts) and all(map(np.array_equal, counts, remat_counts))  # drew alike
    # Bitwise equal on XLA:CPU; 1e-6 leaves room for another backend's fusion choices.
    assert_close(remat_loss, loss, 1e-6, "loss")
    for (path, g), (remat_path, remat_g) in zip(
        jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(remat_grads), strict=True
    ):
        assert path == remat_path
        assert_close(remat_g, g, 1e-6, jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", [False, True])
def test_remat_checkpoints_every_block(remat):
    model = SepViT.from_config(CONFIG, rngs=nnx.Rngs(0), remat=remat)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, y: nnx.merge(graphdef, s)(y))(state, jnp.zeros((1, 56, 56, 3)))
    # jax.checkpoint's primitive: "remat2" in JAX 0.10, "checkpoint" in some releases.
    checkpoints = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("remat2", "checkpoint")]
    assert len(checkpoints) == (sum(CONFIG.depth) if remat else 0)
