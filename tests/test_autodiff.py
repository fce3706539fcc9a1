"""Every JAX transformation on the model: forward mode (jvp, jacfwd, linearize, hessian) against
finite differences and reverse mode, and the training step's lean backward passes against plain
autodiff (sepvit_jax.kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sepvit_jax import SepViT, SepViTConfig, get_config
from sepvit_jax.kernels import lean_backward
from tests.helpers import assert_close

# name -> (config, input side): two stages (4 windows, then 1), and four (16, 16, 4, 1).
CASES = {
    "testing": (get_config("testing"), 56),
    "four_stages": (
        SepViTConfig(
            num_classes=5, dim=8, depth=(1, 1, 1, 1), heads=(1, 2, 2, 2), dim_head=8,
            window_size=(4, 2, 2, 2),
        ),
        64,
    ),
}  # fmt: skip
# The fast tier (-m "not slow") runs the two-stage case; the full suite both.
PARAMS = ["testing", pytest.param("four_stages", marks=pytest.mark.slow)]


def forward(case: str):
    """(f(images) -> logits in float64 eval mode, images, a direction, a cotangent)."""
    config, side = CASES[case]
    model = SepViT.from_config(config, rngs=nnx.Rngs(0), dtype=jnp.float64, param_dtype=jnp.float64)
    model.eval()
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, side, side, config.channels)))
    direction = jnp.asarray(rng.standard_normal(images.shape))
    cotangent = jnp.asarray(rng.standard_normal((2, config.num_classes)))
    return (lambda x: nnx.merge(graphdef, state)(x)), images, direction, cotangent


@pytest.mark.parametrize("case", PARAMS)
def test_jvp_and_linearize_match_finite_differences_and_reverse_mode(case, x64):
    f, x, v, cotangent = forward(case)
    f = jax.jit(f)  # each transformation then compiles once instead of dispatching op by op
    logits, tangent = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))(x, v)
    eps = 1e-6
    central = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert_close(tangent, central, 1e-7, "jvp vs finite differences")
    _, linear = jax.linearize(f, x)
    assert_close(linear(v), tangent, 1e-12, "linearize vs jvp")
    # <J v, c> == <v, J^T c>: forward and reverse mode agree.
    gradient = jax.grad(lambda x: (f(x) * cotangent).sum())(x)
    assert float((tangent * cotangent).sum()) == pytest.approx(float((gradient * v).sum()), 1e-10)


@pytest.mark.parametrize("case", PARAMS)
def test_jacfwd_and_hessian(case, x64):
    f, x, v, cotangent = forward(case)
    f = jax.jit(f)

    def along(t):  # the logits along a line through the input space: cheap Jacobians
        return f(x + t[0] * v + t[1] * x)

    t = jnp.zeros(2)
    assert_close(jax.jacfwd(along)(t), jax.jacrev(along)(t), 1e-10, "jacfwd vs jacrev")
    score = lambda t: (along(t) * cotangent).sum()  # noqa: E731
    hessian = jax.hessian(score)(t)
    eps = 1e-4
    for i in range(2):
        step = jnp.zeros(2).at[i].set(eps)
        column = (jax.grad(score)(t + step) - jax.grad(score)(t - step)) / (2 * eps)
        assert_close(hessian[:, i], column, 1e-6, f"hessian column {i}")


@pytest.mark.parametrize("case", PARAMS)
def test_lean_backward_gives_the_autodiff_gradients(case, x64):
    f, x, _, cotangent = forward(case)
    plain = jax.jit(jax.grad(lambda x: (f(x) * cotangent).sum()))(x)

    def lean(x):  # the switch is read while tracing, so it sits inside the jitted function
        with lean_backward():
            return (f(x) * cotangent).sum()

    assert_close(jax.jit(jax.grad(lean))(x), plain, 1e-12, "lean vs plain backward")
    with lean_backward(), pytest.raises(TypeError, match="custom_vjp"):
        jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(x)  # the lean kernels are reverse-mode only
