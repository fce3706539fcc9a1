"""sepvit_jax.linen: the Linen SepViT computes the NNX model's function on the same weights.

Weights for the NNX side are set from numpy (no initializer compiled), and each side compiles one
program (logits and gradients together), as eager dispatch compiles op by op: slow on CPU.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx, traverse_util

import sepvit_jax
from sepvit_jax import SepViTConfig, get_config
from sepvit_jax.linen import SepViT, linen_variables_to_nnx, nnx_to_linen_variables
from sepvit_jax.train.startup import init_compile_options
from tests.helpers import assert_close

CONFIG = get_config("testing")
# Four stages at 128x128: stage maps 32, 16, 8, 4, each tiled by its window.
FOUR_STAGES = SepViTConfig(
    num_classes=10, dim=8, depth=(1, 1, 1, 1), heads=1, dim_head=8, window_size=(4, 2, 1, 1)
)


def random_nnx_model(config: SepViTConfig, seed: int = 0) -> sepvit_jax.SepViT:
    """An NNX SepViT with random weights set from numpy (built abstractly: nothing compiled)."""
    model = nnx.eval_shape(lambda: sepvit_jax.SepViT.from_config(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        var.set_value(jnp.asarray(rng.standard_normal(shape, np.float32) * 0.3))
    nnx.update(model, params)
    model.eval()
    return model


def flat(tree) -> dict:
    """{"a/0/b": leaf} of a Linen tree or an NNX State."""
    if isinstance(tree, nnx.State):
        items = [(path, var.get_value()) for path, var in nnx.to_flat_state(tree)]
    else:
        items = traverse_util.flatten_dict(tree).items()
    return {"/".join(map(str, path)): value for path, value in items}


def images(size: int, batch: int = 2, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.fixture(scope="module")
def nnx_model():
    return random_nnx_model(CONFIG)


def loss(logits):
    return jnp.mean(logits**2)


@pytest.fixture(scope="module")
def both_runs(nnx_model):
    """(logits, grads of loss) from Linen `apply` and from the NNX model: one program each."""
    x = images(56)
    linen_model = SepViT(CONFIG, deterministic=True)  # the attribute; test_dropout: the argument

    @jax.jit
    def linen_run(params, x):
        def f(p):
            logits = linen_model.apply({"params": p}, x)
            return loss(logits), logits

        grads, logits = jax.grad(f, has_aux=True)(params)
        return logits, grads

    @nnx.jit
    def nnx_run(model, x):
        def f(m):
            logits = m(x)
            return loss(logits), logits

        grads, logits = nnx.grad(f, has_aux=True)(model)
        return logits, grads

    linen_logits, linen_grads = linen_run(nnx_to_linen_variables(nnx_model)["params"], x)
    nnx_logits, nnx_grads = nnx_run(nnx_model, x)
    return linen_logits, flat(linen_grads), nnx_logits, flat(nnx.state(nnx_grads, nnx.Param))


def test_logits_match_nnx(both_runs):
    linen_logits, _, nnx_logits, _ = both_runs
    assert linen_logits.shape == (2, 10)
    assert_close(linen_logits, nnx_logits, 1e-6, "linen vs nnx logits")


def test_grads_through_apply_match_nnx_grad(both_runs):
    _, got, _, want = both_runs
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert_close(got[name], value, 1e-5, name)  # exact zeros where NNX has them
    # Only the window-token path of the last stage (one 7x7 window: its window attention is a
    # softmax over one entry) has zero gradients.
    zero = {name for name, value in want.items() if not np.abs(value).max() > 0}
    assert zero and all(name.startswith("layers/1/") and "window_tokens" in name for name in zero)


def test_weights_round_trip_bitwise(nnx_model):
    variables = nnx_to_linen_variables(nnx_model)
    # readable names: the NNX paths, list indices as strings
    params = variables["params"]
    assert params["layers"]["0"]["patch_embed"]["conv"]["kernel"].shape == (7, 7, 3, 16)
    assert "to_qkv" in params["layers"]["1"]["transformer"]["layers"]["0"]["attn"]
    assert flat(variables["params"]).keys() == flat(nnx.state(nnx_model, nnx.Param)).keys()

    back = linen_variables_to_nnx(CONFIG, variables)
    assert isinstance(back, sepvit_jax.SepViT)
    before, after = flat(nnx.state(nnx_model)), flat(nnx.state(back))
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert value.dtype == after[name].dtype and np.array_equal(value, after[name]), name
    # int list indices (as a checkpoint library may restore them) are accepted too
    as_ints = traverse_util.unflatten_dict(
        {
            tuple(int(k) if k.isdigit() else k for k in path): v
            for path, v in traverse_util.flatten_dict(params).items()
        }
    )
    again = flat(nnx.state(linen_variables_to_nnx(CONFIG, {"params": as_ints})))
    assert all(np.array_equal(v, again[k]) for k, v in before.items())


def test_init_gives_the_nnx_parameters(nnx_model):
    x = images(56)
    init = partial(SepViT(CONFIG).init, x=x, deterministic=True)
    shapes = jax.eval_shape(init, jax.random.key(0))
    assert set(shapes) == {"params"}
    linen_shapes = {k: (v.shape, v.dtype) for k, v in flat(shapes["params"]).items()}
    nnx_shapes = {k: (v.shape, v.dtype) for k, v in flat(nnx.state(nnx_model, nnx.Param)).items()}
    assert linen_shapes == nnx_shapes
    assert sum(np.prod(s) for s, _ in linen_shapes.values()) == 21_962  # the pinned NNX count
    # bfloat16 parameters and compute
    bf16 = SepViT(CONFIG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = jax.eval_shape(partial(bf16.init_with_output, x=x, deterministic=True), jax.random.key(0))
    assert out[0].dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(out[1])} == {jnp.dtype(jnp.bfloat16)}

    # as a submodule of a larger Linen model: its parameters under the submodule's name
    class WithBackbone(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(3)(SepViT(CONFIG, deterministic=True, name="backbone")(x))

    nested = jax.eval_shape(partial(WithBackbone().init, x=x), jax.random.key(0))["params"]
    assert set(nested) == {"backbone", "Dense_0"}
    assert flat(nested["backbone"]).keys() == linen_shapes.keys()


@pytest.mark.slow
def test_four_stages_from_linen_init():
    FOUR_STAGES.check_image_size(128, 128)
    x = images(128, batch=1)
    linen_model = SepViT(FOUR_STAGES)
    # A real init, compiled for compile time (as train.py's init): 92 -> 16 s on a busy CPU.
    init = jax.jit(partial(linen_model.init_with_output, deterministic=True))
    options = init_compile_options(jax.default_backend())
    init_logits, variables = init.lower(jax.random.key(0), x).compile(options)(jax.random.key(0), x)
    # init's output is the NNX model's forward on the weights init made and stored
    logits = jax.jit(partial(linen_model.apply, deterministic=True))(variables, x)
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    assert_close(logits, init_logits, 1e-6, "four stages: apply vs init")
    model = linen_variables_to_nnx(FOUR_STAGES, variables)
    widths = [stage.peg.proj.kernel.shape[-1] for stage in model.layers]
    assert widths == [8, 16, 32, 64]
    # and the trip back: the arrays init made, bitwise
    back = flat(nnx_to_linen_variables(model)["params"])
    assert all(np.array_equal(v, back[k]) for k, v in flat(variables["params"]).items())


def test_dropout_uses_the_dropout_stream():
    config = get_config("testing", dropout=0.3)
    variables = nnx_to_linen_variables(random_nnx_model(config))
    x = images(56, batch=1)
    apply = jax.jit(partial(SepViT(config).apply, deterministic=False))
    first = apply(variables, x, rngs={"dropout": jax.random.key(0)})
    assert np.array_equal(first, apply(variables, x, rngs={"dropout": jax.random.key(0)}))
    assert not np.allclose(first, apply(variables, x, rngs={"dropout": jax.random.key(1)}))
    with pytest.raises(ValueError, match="dropout"):
        SepViT(config).apply(variables, x, deterministic=False)  # no key: refused, not fixed
    with pytest.raises(ValueError, match="deterministic"):
        SepViT(config).apply(variables, x)  # neither attribute nor argument
    # the NNX model made from these variables has real dropout keys, seeded from dropout_rng
    model = linen_variables_to_nnx(config, variables, dropout_rng=3)
    keys = jax.tree.leaves(nnx.state(model, nnx.RngKey))
    assert len(keys) == 8 and all(isinstance(k, jax.Array) for k in keys)  # 2 stages x 4
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(model)))


def test_bad_variables_raise():
    variables = nnx_to_linen_variables(random_nnx_model(CONFIG))
    params = dict(variables["params"])
    del params["mlp_head"]
    with pytest.raises(ValueError, match="missing.*mlp_head/fc/bias"):
        linen_variables_to_nnx(CONFIG, {"params": params})
    with pytest.raises(ValueError, match="shape"):
        linen_variables_to_nnx(get_config("testing", num_classes=5), variables)
    with pytest.raises(ValueError, match="param_dtype"):
        linen_variables_to_nnx(CONFIG, variables, param_dtype=jnp.bfloat16)
