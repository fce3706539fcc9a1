"""Both packages against upstream vit-pytorch's golden float64 outputs and gradients.

Fixtures (tests/fixtures, made by upstream SepViT in float64 with every norm and bias
randomised): inputs, logits, the cotangent of `sum(logits * cotangent)`, and the gradients of
the input and of every state_dict tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_torch
from sepvit_jax.checkpoint import from_state_dict, nnx_to_state_dict
from tests.helpers import (
    FIXTURES,
    GOLDEN_CASES,
    assert_close,
    golden_params,
    load_golden,
    nchw_to_nhwc,
    nhwc_to_nchw,
)

TORCH_F64_RTOL = 1e-10
JAX_F64_RTOL = 1e-9
F32_RTOL = 2e-5


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_torch_reproduces_upstream_float64(case):
    config, arrays = load_golden(case)
    model = sepvit_torch.SepViT.from_config(config).double()
    params = {k: torch.from_numpy(v) for k, v in golden_params(arrays).items()}
    model.load_state_dict(params, strict=True)
    assert list(model.state_dict()) == list(params), "state_dict key order differs from upstream"

    x = torch.from_numpy(arrays["input"]).requires_grad_(True)
    logits = model(x)
    (logits * torch.from_numpy(arrays["cotangent"])).sum().backward()

    assert_close(logits.detach().numpy(), arrays["logits"], TORCH_F64_RTOL, "logits")
    assert_close(x.grad.numpy(), arrays["grad_input"], TORCH_F64_RTOL, "grad_input")
    for name, param in model.named_parameters():
        grad = np.zeros(param.shape) if param.grad is None else param.grad.numpy()
        assert_close(grad, arrays[f"grad/{name}"], TORCH_F64_RTOL, f"grad/{name}")


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_jax_reproduces_upstream_float64(case, x64):
    config, arrays = load_golden(case)
    model = from_state_dict(
        config, golden_params(arrays), dtype=jnp.float64, param_dtype=jnp.float64
    )
    graphdef, params = nnx.split(model)
    cotangent = jnp.asarray(arrays["cotangent"])

    @jax.jit
    def logits_and_grads(params, x):
        def loss(params, x):
            logits = nnx.merge(graphdef, params)(x)
            return jnp.sum(logits * cotangent), logits

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    x = jnp.asarray(nchw_to_nhwc(arrays["input"]))
    assert x.dtype == jnp.float64
    (param_grads, input_grad), logits = logits_and_grads(params, x)

    assert_close(logits, arrays["logits"], JAX_F64_RTOL, "logits")
    assert_close(nhwc_to_nchw(input_grad), arrays["grad_input"], JAX_F64_RTOL, "grad_input")
    grads = nnx_to_state_dict(nnx.merge(graphdef, param_grads))
    assert set(grads) == set(golden_params(arrays, "grad/"))
    for name, grad in grads.items():
        assert_close(grad, arrays[f"grad/{name}"], JAX_F64_RTOL, f"grad/{name}")


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_float32_checkpoint_through_torch_load(case):
    """The `.pt` as users save it: real torch.load, strict load, float32 logits in both."""
    config, arrays = load_golden(case)
    state_dict = torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state_dict.values())

    torch_model = sepvit_torch.SepViT.from_config(config).eval()
    torch_model.load_state_dict(state_dict, strict=True)
    x = arrays["input"].astype(np.float32)
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(x)).numpy()

    jax_model = from_state_dict(config, state_dict)
    with jax.default_matmul_precision("highest"):
        jax_logits = jax.jit(lambda m, x: m(x))(jax_model, jnp.asarray(nchw_to_nhwc(x)))

    assert jax_logits.dtype == jnp.float32
    assert_close(torch_logits, arrays["logits"], F32_RTOL, "torch float32 vs upstream float64")
    assert_close(jax_logits, arrays["logits"], F32_RTOL, "jax float32 vs upstream float64")
    assert_close(jax_logits, torch_logits, F32_RTOL, "jax vs torch float32")
