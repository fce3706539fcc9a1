"""Every state_dict layout vit-pytorch has written, converted, verified and written back.

The fixtures were made by the releases themselves (tests/fixtures/make_layout_fixtures.py):
vit-pytorch 0.32.0 and 0.32.1 ('grouped' window-token projection; 0.32.0 with its unused
`to_patches`) and 1.4.2 (the last 'prenorm' release), float64 logits and gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sepvit_jax
import sepvit_torch
from sepvit_jax.checkpoint import directory_state_dict
from sepvit_jax.core.layouts import CURRENT, GROUPED, PRENORM, detect
from sepvit_jax.core.torch_io import read_state_dict
from tests.helpers import FIXTURES, assert_close

OLD_CASES = ("v0_32_0_grouped", "v0_32_1_grouped", "v1_4_2_prenorm")
LAYOUT_OF = {"v0_32_0_grouped": GROUPED, "v0_32_1_grouped": GROUPED, "v1_4_2_prenorm": PRENORM}
F64_RTOL = 1e-9


def load_case(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    with np.load(FIXTURES / f"{case}.npz") as npz:
        return meta, {name: npz[name] for name in npz.files}


def wrap(state_dict: dict[str, torch.Tensor], how: str):
    """The state_dict saved the way training code saves it."""
    if how == "ddp":
        return {f"module.{k}": v for k, v in state_dict.items()}
    if how == "lightning":
        return {"state_dict": {f"model.{k}": v for k, v in state_dict.items()}, "epoch": 3}
    if how == "training":
        optimizer = {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1}]}
        return {"model": state_dict, "optimizer": optimizer, "epoch": 7}
    if how == "ema":
        return {"model_ema": state_dict}
    if how in ("bfloat16", "float16"):
        return {k: v.to(getattr(torch, how)) for k, v in state_dict.items()}
    assert how == "raw"
    return state_dict


WRAPPERS = ("raw", "ddp", "lightning", "training", "ema", "bfloat16", "float16")


def convert(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, str]]:
    """(case, wrapper) -> (converted directory, stdout): every old layout in every wrapper,
    through the CLI: the raw files in a real subprocess (`python -m convert`), the wrapped ones
    through the same `main` in this process (a subprocess each would cost ~5 s of imports)."""
    from convert.cli import main

    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for case in OLD_CASES:
        original = torch.load(FIXTURES / f"{case}.pt", weights_only=True)
        for how in WRAPPERS:
            path, directory = root / f"{case}-{how}.pt", root / f"{case}-{how}"
            torch.save(wrap(original, how), path)
            if how == "raw":
                proc = convert("torch2flax", path, "-o", directory)
                assert proc.returncode == 0, proc.stderr
                out[case, how] = (directory, proc.stdout)
            else:
                key = ["--key", "model_ema"] if how == "ema" else []
                status = main(["torch2flax", str(path), "-o", str(directory), *key])
                assert status == 0, (case, how)
                out[case, how] = (directory, "")
    return out


@pytest.mark.parametrize("case", OLD_CASES)
def test_detection(case):
    assert detect(read_state_dict(FIXTURES / f"{case}.pt")) is LAYOUT_OF[case]
    assert detect(read_state_dict(FIXTURES / "two_stage_56.pt")) is CURRENT


@pytest.mark.slow
@pytest.mark.parametrize("case", OLD_CASES)
def test_every_wrapper_converts_to_the_same_weights(converted, case):
    _, arrays = load_case(case)
    raw_dir, stdout = converted[case, "raw"]
    assert f"'{LAYOUT_OF[case].name}' layout" in stdout
    if case == "v0_32_0_grouped":
        assert "expanded to block-diagonal; unused to_patches dropped (2 tensors)" in stdout
    meta = json.loads((raw_dir / "sepvit.json").read_text())
    assert meta["source"]["layout"]["name"] == LAYOUT_OF[case].name
    reference = directory_state_dict(raw_dir)[1]
    for how in WRAPPERS[1:]:
        got = directory_state_dict(converted[case, how][0])[1]
        for key, value in reference.items():
            want = value
            if how in ("bfloat16", "float16"):
                # Stored float32 after the round trip through the checkpoint's dtype.
                want = torch.from_numpy(value).to(getattr(torch, how)).float().numpy()
            assert np.array_equal(got[key], want), (how, key)


@pytest.mark.slow
@pytest.mark.parametrize("case", OLD_CASES)
def test_converted_jax_model_reproduces_the_old_release_float64(converted, case, x64):
    meta, arrays = load_case(case)
    model = sepvit_jax.load(converted[case, "raw"][0], dtype=jnp.float64, param_dtype=jnp.float64)
    model.eval()
    graphdef, state = nnx.split(model)

    def loss(images):
        logits = nnx.merge(graphdef, state)(images)
        return (logits * jnp.asarray(arrays["cotangent"])).sum(), logits

    images = jnp.asarray(arrays["input"].transpose(0, 2, 3, 1))
    (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(images)
    assert_close(logits, arrays["logits"], F64_RTOL, f"{case} logits")
    assert_close(np.asarray(grad).transpose(0, 3, 1, 2), arrays["grad_input"], F64_RTOL, "grad")


@pytest.mark.slow
def test_prenorm_goes_back_bitwise(converted, tmp_path):
    directory = converted["v1_4_2_prenorm", "raw"][0]
    back = tmp_path / "back.pt"
    proc = convert("flax2torch", directory, "-o", back, "--layout", "prenorm")
    assert proc.returncode == 0, proc.stderr
    original = torch.load(FIXTURES / "v1_4_2_prenorm.pt", weights_only=True)
    written = torch.load(back, weights_only=True)
    assert list(written) == list(original)  # names and order
    assert all(torch.equal(written[k], original[k]) for k in original)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["v0_32_0_grouped", "v0_32_1_grouped"])
def test_grouped_goes_to_todays_sepvit_and_back_while_block_diagonal(converted, case, tmp_path):
    from convert.cli import main

    meta, arrays = load_case(case)
    directory = converted[case, "raw"][0]
    current = tmp_path / "current.pt"
    assert main(["flax2torch", str(directory), "-o", str(current)]) == 0
    model = sepvit_torch.SepViT.from_config(sepvit_jax.load(directory).config).double().eval()
    weights = torch.load(current, weights_only=True)
    model.load_state_dict({k: v.double() for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(arrays["input"])).numpy()
    assert_close(logits, arrays["logits"], F64_RTOL, f"{case} logits through today's layout")
    # Back to the grouped layout (0.32.1's keys: the unused to_patches is not kept).
    grouped = tmp_path / "grouped.pt"
    assert main(["flax2torch", str(directory), "-o", str(grouped), "--layout", "grouped"]) == 0
    original = torch.load(FIXTURES / f"{case}.pt", weights_only=True)
    written = torch.load(grouped, weights_only=True)
    kept = [k for k in original if not k.startswith("to_patches.")]
    assert list(written) == kept and all(torch.equal(written[k], original[k]) for k in kept)


def test_grouped_is_one_way_once_the_projection_is_dense(tmp_path, capsys):
    from convert.cli import main

    directory = tmp_path / "dense"
    sepvit_jax.save(sepvit_jax.from_torch(FIXTURES / "v0_32_1_grouped.pt"), directory)
    # Fine-tuning fills the off-diagonal blocks: one of them is no longer zero.
    model = sepvit_jax.load(directory)
    proj = model.layers[0].transformer.layers[0].attn.window_tokens_to_qk.proj
    proj.kernel.set_value(proj.kernel.get_value().at[-1, 0].set(0.5))
    sepvit_jax.save(model, directory, overwrite=True)
    status = main(
        ["flax2torch", str(directory), "-o", str(tmp_path / "g.pt"), "--layout", "grouped"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "no longer block-diagonal" in err and "'prenorm'" in err
    assert not (tmp_path / "g.pt").exists()


@pytest.mark.parametrize("case", OLD_CASES)
def test_python_api_reads_old_layouts(case):
    meta, arrays = load_case(case)
    torch_model = sepvit_torch.load(FIXTURES / f"{case}.pt").double().eval()
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(arrays["input"])).numpy()
    assert_close(logits, arrays["logits"], 1e-10, "sepvit_torch.load")
    jax_model = sepvit_jax.from_torch(FIXTURES / f"{case}.pt")
    jax_model.eval()
    jax_logits = nnx.jit(lambda m, x: m(x))(jax_model, arrays["input"].transpose(0, 2, 3, 1))
    assert_close(jax_logits, arrays["logits"], 2e-5, "sepvit_jax.from_torch float32")


def test_damaged_old_checkpoint_names_the_layout_and_the_keys(tmp_path, capsys):
    from convert.cli import main

    original = torch.load(FIXTURES / "v1_4_2_prenorm.pt", weights_only=True)
    damaged = dict(original)
    damaged["layers.0.2.layers.1.0.fn.to_qkv.weights"] = damaged.pop(
        "layers.0.2.layers.1.0.fn.to_qkv.weight"
    )
    del damaged["layers.1.2.layers.0.1.fn.net.3.bias"]
    torch.save(damaged, tmp_path / "damaged.pt")
    status = main(["torch2flax", str(tmp_path / "damaged.pt"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    for fragment in (
        "vit-pytorch 0.32.2 to 1.4.2 'prenorm' layout",
        "missing keys (2): layers.0.2.layers.1.0.fn.to_qkv.weight, "
        "layers.1.2.layers.0.1.fn.net.3.bias",
        "unexpected keys (1): layers.0.2.layers.1.0.fn.to_qkv.weights",
    ):
        assert fragment in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_layout(capsys):
    from convert.cli import main

    assert main(["inspect", str(FIXTURES / "v0_32_0_grouped.pt")]) == 0
    out = capsys.readouterr().out
    assert "layout: vit-pytorch 0.32.0 to 0.32.1 'grouped' layout" in out
    assert main(["inspect", str(FIXTURES / "v1_4_2_prenorm.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == {"name": "prenorm", "vit_pytorch": "0.32.2 to 1.4.2"}
