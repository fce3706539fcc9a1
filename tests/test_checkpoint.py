"""The Python API of checkpoints: `sepvit_jax.save/load/from_torch`, `sepvit_torch.load`.

`save`/`load` write and read the same directory format as `convert torch2flax`; `from_torch`
and `sepvit_torch.load` read the same files as the CLI. The converted models are run against
the upstream golden logits, so the whole path (reading, config inference, layouts) is checked
to compute the same function, not just to copy numbers.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_jax
import sepvit_torch
from sepvit_jax import checkpoint
from sepvit_jax.checkpoint import from_state_dict, nnx_to_state_dict
from sepvit_jax.core.torch_io import CheckpointError
from tests.helpers import FIXTURES, assert_close, load_golden, nchw_to_nhwc

F32_RTOL = 2e-5


def small_model(param_dtype=jnp.float32, seed: int = 0):
    """A random `testing` SepViT, filled from torch's init (no eager JAX init: fast)."""
    config = sepvit_jax.get_config("testing")
    torch.manual_seed(seed)
    state_dict = sepvit_torch.SepViT.from_config(config).state_dict()
    return from_state_dict(config, state_dict, param_dtype=param_dtype)


def fixture_sd(case: str = "two_stage_56") -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)


def assert_same_params(a, b) -> None:
    sa, sb = nnx_to_state_dict(a), nnx_to_state_dict(b)
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and np.array_equal(sa[key], sb[key]), key


# ---- save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_load_round_trip(tmp_path, param_dtype):
    model = small_model(jnp.dtype(param_dtype))
    path = sepvit_jax.save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "params", "sepvit.json"]
    meta = json.loads((path / "sepvit.json").read_text())
    assert meta["param_dtype"] == param_dtype and meta["num_params"] == sum(
        v.size for v in nnx_to_state_dict(model).values()
    )
    loaded = sepvit_jax.load(path)
    assert loaded.config == model.config
    assert_same_params(loaded, model)
    # Another parameter dtype on request (exact from bfloat16 to float32).
    widened = sepvit_jax.load(path, param_dtype=jnp.float32)
    for key, value in nnx_to_state_dict(widened).items():
        assert value.dtype == np.float32
        assert np.array_equal(value, nnx_to_state_dict(model)[key].astype(np.float32)), key


def test_save_refuses_existing_and_foreign_directories(tmp_path):
    model = small_model()
    sepvit_jax.save(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists"):
        sepvit_jax.save(model, tmp_path / "ckpt")
    other = small_model(seed=1)
    sepvit_jax.save(other, tmp_path / "ckpt", overwrite=True)
    assert_same_params(sepvit_jax.load(tmp_path / "ckpt"), other)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="neither empty nor a sepvit_jax checkpoint"):
        sepvit_jax.save(model, tmp_path / "mine", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]


def test_failed_write_leaves_nothing(tmp_path):
    model = small_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def fail(tmp):
        assert (tmp / "params").is_dir()  # complete, but not yet in place
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError, match="verification failed"):
        checkpoint.write_checkpoint(tmp_path / "out", model.config, params, before_commit=fail)
    assert list(tmp_path.iterdir()) == []


def test_mixed_dtypes_are_refused(tmp_path):
    model = small_model()
    fc = model.mlp_head.fc
    fc.bias.set_value(fc.bias.get_value().astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="mixed parameter dtypes"):
        sepvit_jax.save(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_broken_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sepvit_jax.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        sepvit_jax.load(tmp_path / "empty")
    sepvit_jax.save(small_model(), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "dim": 32}))
    with pytest.raises(ValueError, match="does not fit the SepViT: mis-shaped keys"):
        sepvit_jax.load(tmp_path / "ckpt")


# ---- from_torch / sepvit_torch.load ----------------------------------------------------------


def test_from_torch_save_load_computes_the_upstream_function(tmp_path):
    """rect_gray (1 channel, 56x112 input: 2x4 then 1x2 windows) through from_torch, save and
    load, against upstream's logits."""
    _, arrays = load_golden("rect_gray")
    converted = sepvit_jax.from_torch(FIXTURES / "rect_gray.pt", dropout=0.1)
    assert converted.config.window_size == 7 and converted.config.channels == 1
    sepvit_jax.save(converted, tmp_path / "ckpt")
    model = sepvit_jax.load(tmp_path / "ckpt")
    assert_same_params(model, converted)
    assert model.config.dropout == 0.1
    # The dropout RNG streams are real keys (one per stream), not eval_shape's abstract shapes.
    keys = [jax.random.key_data(k) for k in jax.tree.leaves(nnx.state(model, nnx.RngKey))]
    assert keys and all(isinstance(k, jax.Array) for k in keys)
    assert len({tuple(np.asarray(k).tolist()) for k in keys}) == len(keys)
    model.eval()
    x = jnp.asarray(nchw_to_nhwc(arrays["input"]), jnp.float32)
    with jax.default_matmul_precision("highest"):
        logits = nnx.jit(lambda m, images: m(images))(model, x)
    assert_close(np.asarray(logits), arrays["logits"], F32_RTOL, "logits")


def test_sepvit_torch_load_computes_the_upstream_function():
    _, arrays = load_golden("three_stage_112")
    model = sepvit_torch.load(FIXTURES / "three_stage_112.pt").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(arrays["input"]).float())
    assert_close(logits.numpy(), arrays["logits"], F32_RTOL, "logits")


def test_from_torch_in_memory_wrappings_and_overrides():
    sd = fixture_sd()
    reference = sepvit_jax.from_torch(sd)
    wrapped = {"model": {f"module.{k}": v.bfloat16() for k, v in sd.items()}, "epoch": 3}
    from_bf16 = sepvit_jax.from_torch(wrapped, window_size=7, dropout=0.1)
    assert from_bf16.config == reference.config.replace(dropout=0.1)
    for key, value in nnx_to_state_dict(from_bf16).items():
        assert np.array_equal(value, sd[key].bfloat16().float().numpy()), key
    module = sepvit_torch.SepViT.from_config(reference.config)
    module.load_state_dict(sd)
    assert_same_params(sepvit_jax.from_torch(module), reference)
    ema = sepvit_jax.from_torch({"model": sd, "model_ema": sd}, key="model_ema")
    assert_same_params(ema, reference)
    low = sepvit_jax.from_torch(sd, param_dtype=jnp.bfloat16)
    assert {v.dtype.name for v in nnx_to_state_dict(low).values()} == {"bfloat16"}


def test_from_torch_errors():
    sd = fixture_sd()
    with pytest.raises(CheckpointError, match="num_classes=5 but the weights have num_classes=10"):
        sepvit_jax.from_torch(sd, num_classes=5)
    with pytest.raises(CheckpointError, match="several SepViT state_dicts"):
        sepvit_jax.from_torch({"model": sd, "model_ema": dict(sd)})
    with pytest.raises(CheckpointError, match="does not look like a SepViT"):
        sepvit_jax.from_torch({"conv1.weight": torch.zeros(3, 3, 7, 7)})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        sepvit_jax.from_torch({**sd, "mlp_head.3.weight": torch.zeros(1)})


def test_sepvit_torch_load_of_a_directory(tmp_path):
    for param_dtype in (jnp.float32, jnp.bfloat16):
        model = small_model(param_dtype)
        sepvit_jax.save(model, tmp_path / str(param_dtype.dtype))
        loaded = sepvit_torch.load(tmp_path / str(param_dtype.dtype))
        assert loaded.config == model.config
        for key, value in nnx_to_state_dict(model).items():
            got = loaded.state_dict()[key]
            assert got.dtype == torch.float32
            assert np.array_equal(got.numpy(), value.astype(np.float32)), key
    with pytest.raises(CheckpointError, match="config.json fixes the config"):
        sepvit_torch.load(tmp_path / "float32", window_size=14)
