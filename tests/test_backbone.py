"""The timm-style backbone API of both models: forward_features/head/intermediates, feature_info,
reset_classifier; the JAX model against itself and against sepvit_torch through the weight table.

Compiling is the cost here: each config's JAX results come from one jitted program returning
every variant at once (XLA merges the repeated stages), and the rest is checked in torch,
eagerly, or at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_jax.model
import sepvit_torch
from sepvit_jax import SepViTConfig, get_config
from sepvit_jax.checkpoint import from_state_dict, nnx_to_state_dict
from tests.helpers import assert_close, nchw_to_nhwc, nhwc_to_nchw

RTOL = 1e-5  # float32, JAX against torch

# Two stages at 56x56 (2x2 windows, then one); four stages at 64x64: 16x16 maps in windows of
# 4, then 8x8 and 4x4 in windows of 2, then one 2x2 window.
FOUR_STAGE = SepViTConfig(
    num_classes=5, dim=8, depth=(1, 1, 1, 1), heads=(1, 1, 2, 2), window_size=(4, 2, 2, 2),
    dim_head=4,
)  # fmt: skip
CASES = {"testing": (get_config("testing"), 56), "four_stage": (FOUR_STAGE, 64)}


def jax_variants(model, x):
    """Every API variant on one batch, for a single compilation."""
    final, maps = model.forward_intermediates(x)
    _, normed = model.forward_intermediates(x, norm=True)
    return dict(
        final=final,
        maps=maps,
        normed=normed,
        nchw=model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True),
        last_two=model.forward_intermediates(x, 2, intermediates_only=True),
        picked=model.forward_intermediates(x, [-1, 0, 0], intermediates_only=True),
        early=model.forward_intermediates(x, [0], intermediates_only=True, stop_early=True),
        early_final=model.forward_intermediates(x, [0], stop_early=True),
        features=model.features(x),
        forward_features=model.forward_features(x),
        head=model.forward_head(final),
        pre_logits=model.forward_head(final, pre_logits=True),
        logits=model(x),
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(config, torch model, JAX model with the same weights, NCHW input, JAX results)."""
    config, side = CASES[request.param]
    config.check_image_size(side, side)
    torch.manual_seed(0)
    torch_model = sepvit_torch.SepViT.from_config(config).eval()
    model = from_state_dict(config, torch_model.state_dict())
    model.eval()
    x = torch.randn(2, config.channels, side, side)
    results = nnx.jit(jax_variants)(model, jnp.asarray(nchw_to_nhwc(x)))
    return config, torch_model, model, x, jax.device_get(results)


def test_intermediates_are_the_stage_maps_and_match_torch(case):
    config, torch_model, _, x, got = case
    side = x.shape[-1]
    sizes = config.feature_map_sizes(side, side)
    assert [m.shape for m in got["maps"]] == [
        (2, h, w, c) for (h, w), c in zip(sizes, config.stage_dims, strict=True)
    ]
    for name in ("features", "nchw"):
        assert len(got[name]) == config.num_stages
    for jax_map, feature, nchw in zip(got["maps"], got["features"], got["nchw"], strict=True):
        assert np.array_equal(jax_map, feature)
        assert np.array_equal(nhwc_to_nchw(jax_map), nchw)
    assert np.array_equal(got["final"], got["maps"][-1])
    assert np.array_equal(got["forward_features"], got["maps"][-1])

    with torch.no_grad():
        final, maps = torch_model.forward_intermediates(x)
        features = torch_model.features(x)
        nhwc = torch_model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        logits = torch_model(x)
        pre_logits = torch_model.forward_head(final, pre_logits=True)
    assert torch.equal(final, maps[-1]) and torch.equal(torch_model.forward_features(x), final)
    for i, (jax_map, torch_map) in enumerate(zip(got["maps"], maps, strict=True)):
        assert torch.equal(torch_map, features[i])
        assert torch.equal(nhwc[i], torch_map.permute(0, 2, 3, 1))
        assert_close(jax_map, nchw_to_nhwc(torch_map), RTOL, f"stage {i}")
    assert_close(got["logits"], logits, RTOL, "logits")
    assert_close(got["head"], logits, RTOL, "forward_head")
    assert pre_logits.shape == got["pre_logits"].shape == (2, config.stage_dims[-1])
    assert_close(got["pre_logits"], pre_logits, RTOL, "pre_logits")


def test_indices_pick_stages_in_order(case):
    config, torch_model, _, x, got = case
    last = config.num_stages - 1
    maps = got["maps"]
    assert [m.shape for m in got["last_two"]] == [m.shape for m in maps[-2:]]
    assert all(np.array_equal(a, b) for a, b in zip(got["last_two"], maps[-2:], strict=True))
    # [-1, 0, 0]: stage order, each stage once (as timm).
    assert len(got["picked"]) == 2
    assert np.array_equal(got["picked"][0], maps[0])
    assert np.array_equal(got["picked"][1], maps[last])
    with torch.no_grad():
        everything = torch_model.features(x)
        for indices, expected in [(1, [last]), ([-1, 0, 0], [0, last]), (None, range(last + 1))]:
            picked = torch_model.forward_intermediates(x, indices, intermediates_only=True)
            assert len(picked) == len(expected)
            assert all(torch.equal(p, everything[i]) for p, i in zip(picked, expected, strict=True))


def test_norm_normalises_only_the_last_stage_with_the_head_norm(case):
    config, torch_model, model, x, got = case
    *earlier, last = got["normed"]
    assert all(np.array_equal(a, b) for a, b in zip(earlier, got["maps"], strict=False))
    raw = got["maps"][-1]
    mean = raw.mean(-1, keepdims=True)
    var = raw.var(-1, keepdims=True)
    scale, bias = model.mlp_head.norm.scale[...], model.mlp_head.norm.bias[...]
    assert_close(last, (raw - mean) / np.sqrt(var + 1e-5) * scale + bias, RTOL, "normed")
    with torch.no_grad():
        normed = torch_model.forward_intermediates(x, norm=True, intermediates_only=True)
    assert_close(last, nchw_to_nhwc(normed[-1]), RTOL, "normed, torch")
    assert all(
        torch.equal(a, b) for a, b in zip(normed, torch_model.features(x)[:-1], strict=False)
    )


def test_stop_early_runs_no_later_stage(case, monkeypatch):
    config, torch_model, model, x, got = case
    assert len(got["early"]) == 1 and np.array_equal(got["early"][0], got["maps"][0])
    # Without intermediates_only the final features need every stage: stop_early is moot.
    final, early = got["early_final"]
    assert np.array_equal(final, got["final"]) and np.array_equal(early[0], got["maps"][0])

    ran = []
    stage_call = sepvit_jax.model.Stage.__call__
    monkeypatch.setattr(
        sepvit_jax.model.Stage, "__call__", lambda self, y: ran.append(self) or stage_call(self, y)
    )
    x_nhwc = jnp.asarray(nchw_to_nhwc(x))
    nnx.eval_shape(
        lambda m, y: m.forward_intermediates(y, [0], intermediates_only=True, stop_early=True),
        model,
        x_nhwc,
    )
    assert len(ran) == 1
    ran.clear()
    nnx.eval_shape(lambda m, y: m.forward_intermediates(y, [0]), model, x_nhwc)
    assert len(ran) == config.num_stages

    calls = []
    hooks = [
        stage[2].register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, stage in enumerate(torch_model.layers)
    ]
    with torch.no_grad():
        early = torch_model.forward_intermediates(x, [0], intermediates_only=True, stop_early=True)
    for hook in hooks:
        hook.remove()
    assert calls == [0] and torch.equal(early[0], torch_model.features(x)[0])


# (indices for S stages, the error's pattern for S stages)
BAD_INDICES = {
    "last_0": (lambda s: 0, lambda s: rf"indices=0: the last n stages needs 1 <= n <= {s}"),
    "last_too_many": (lambda s: s + 1, lambda s: rf"indices={s + 1}: .* needs 1 <= n <= {s}"),
    "past_the_end": (
        lambda s: [0, s],
        lambda s: rf"stage index {s} is out of range for {s} stages \(-{s} to {s - 1}\)",
    ),
    "before_the_start": (lambda s: [-s - 1], lambda s: rf"stage index -{s + 1} is out of range"),
    "empty": (lambda s: [], lambda s: r"indices names no stage"),
    "float": (lambda s: [0.0], lambda s: r"stage indices must be ints, got 0.0"),
    "bool": (lambda s: [True], lambda s: r"stage indices must be ints, got True"),
}


def shape_only_models(config):
    """Both models without weights: the argument checks raise before any computation."""
    model = nnx.eval_shape(lambda: sepvit_jax.model.SepViT.from_config(config, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        return model, sepvit_torch.SepViT.from_config(config)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bad", sorted(BAD_INDICES))
def test_bad_indices_raise_in_both(name, bad):
    config, side = CASES[name]
    model, torch_model = shape_only_models(config)
    indices, message = (f(config.num_stages) for f in BAD_INDICES[bad])
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(jnp.zeros((1, side, side, 3)), indices)
    with pytest.raises(ValueError, match=message):
        torch_model.forward_intermediates(torch.zeros(1, 3, side, side), indices)


def test_bad_output_fmt_raises_in_both():
    model, torch_model = shape_only_models(get_config("testing"))
    with pytest.raises(ValueError, match=r'output_fmt must be "NHWC" or "NCHW", got \'NLC\''):
        model.forward_intermediates(jnp.zeros((1, 56, 56, 3)), output_fmt="NLC")
    with pytest.raises(ValueError, match=r"output_fmt must be"):
        torch_model.forward_intermediates(torch.zeros(1, 3, 56, 56), output_fmt="NLC")


def test_feature_info_matches_the_maps(case):
    config, torch_model, model, x, got = case
    side = x.shape[-1]
    expected = [
        dict(num_chs=config.dim * 2**i, reduction=4 * 2**i, module=f"layers.{i}")
        for i in range(config.num_stages)
    ]
    assert model.feature_info == torch_model.feature_info == expected
    for info, jax_map in zip(model.feature_info, got["maps"], strict=True):
        assert jax_map.shape[-1] == info["num_chs"]
        assert side // jax_map.shape[1] == info["reduction"]
    # `module` names the stage in both: the torch submodule and the NNX path.
    torch_modules = dict(torch_model.named_modules())
    nnx_paths = {".".join(map(str, path)) for path, _ in nnx.iter_graph(model)}
    for info in expected:
        assert info["module"] in torch_modules and info["module"] in nnx_paths


def test_reset_classifier_in_both():
    config = get_config("testing")
    torch.manual_seed(0)
    torch_model = sepvit_torch.SepViT.from_config(config).eval()
    model = from_state_dict(config, torch_model.state_dict())
    before = nnx_to_state_dict(model)

    model.reset_classifier(3, rngs=nnx.Rngs(1))
    torch_model.reset_classifier(3)
    assert model.config == torch_model.config == config.replace(num_classes=3)
    after = nnx_to_state_dict(model)  # the weight table follows the new config
    assert after["mlp_head.2.weight"].shape == (3, config.stage_dims[-1])
    assert after["mlp_head.2.weight"].dtype == np.float32
    assert all(np.array_equal(before[k], after[k]) for k in before if "mlp_head.2" not in k)
    assert tuple(torch_model.state_dict()["mlp_head.2.weight"].shape) == (3, 32)

    # The new heads carry the same weights once copied; the models then agree again.
    model = from_state_dict(torch_model.config, torch_model.state_dict())
    model.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = torch_model(x)
    assert expected.shape == (2, 3)
    assert_close(nnx.jit(lambda m, y: m(y))(model, nchw_to_nhwc(x)), expected, RTOL, "logits")

    for bad in (0, -2):
        with pytest.raises(ValueError, match=r"num_classes must be a positive int"):
            model.reset_classifier(bad, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=r"num_classes must be a positive int"):
            torch_model.reset_classifier(bad)
    assert model.config.num_classes == torch_model.config.num_classes == 3
