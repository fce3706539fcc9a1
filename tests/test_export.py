"""`sepvit_jax.export` (module `sepvit_jax.stablehlo`) and `convert export`: serialized JAX
programs of SepViT, and lowering the TPU and CUDA programs (forward and sharded training step)
on this CPU-only machine.

The model is the `testing` variant at 56x56 with random weights (no init compile); one program,
exported once for cpu, cuda and tpu with a symbolic batch, serves most tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import sepvit_jax
from convert import export as export_command
from sepvit_jax import stablehlo as exporting
from sepvit_jax.checkpoint import model_from_params
from sepvit_jax.core import table
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parent.parent
CONFIG = sepvit_jax.get_config("testing")


def random_model(config=CONFIG, seed: int = 0, **dtypes):
    rng = np.random.default_rng(seed)
    params: dict = {}
    for row in table.weight_table(config):
        node = params
        for part in row.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[row.flax_path[-1]] = 0.1 * rng.standard_normal(row.flax_shape, np.float32)
    return model_from_params(config, params, **dtypes)


def images(batch: int, seed: int = 1, side: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, side, side, 3), np.float32)


def reference_logits(model, x) -> np.ndarray:
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, x))


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def expected(model) -> np.ndarray:
    """The NNX model's logits for `images(3)` (examples are independent: `images(1)` is its
    first row), compiled once."""
    return reference_logits(model, images(3))


@pytest.fixture(scope="module")
def program(model, tmp_path_factory) -> Path:
    return exporting.export(model, tmp_path_factory.mktemp("export") / "sepvit.jax", image_size=56)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---- the program file ----------------------------------------------------------------------


@pytest.mark.slow
def test_program_runs_with_jax_and_numpy_only(expected, program, tmp_path):
    np.savez(tmp_path / "in.npz", one=images(1), three=images(3))
    code = textwrap.dedent(f"""
        import sys
        import jax, numpy as np
        exported = jax.export.deserialize(bytearray(open({str(program)!r}, "rb").read()))
        inputs = np.load({str(tmp_path / "in.npz")!r})
        np.savez({str(tmp_path / "out.npz")!r},
                 **{{k: np.asarray(exported.call(inputs[k])) for k in inputs.files}})
        assert "flax" not in sys.modules and "sepvit_jax" not in sys.modules, sorted(sys.modules)
        print(exported.platforms, exported.in_avals)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "('cpu', 'cuda', 'tpu') (ShapedArray(float32[b,56,56,3]),)" in proc.stdout
    with np.load(tmp_path / "out.npz") as out:
        assert out["one"].shape == (1, CONFIG.num_classes)
        assert_close(out["one"], expected[:1], 1e-5, "batch 1")
        assert_close(out["three"], expected, 1e-5, "batch 3")


def test_sidecar(program):
    sidecar = json.loads(exporting.sidecar_path(program).read_text())
    assert sidecar["input"] == {
        "name": "images", "shape": ["b", 56, 56, 3], "dtype": "float32", "layout": "NHWC"
    }  # fmt: skip
    assert sidecar["output"] == {"name": "logits", "shape": ["b", 10], "dtype": "float32"}
    assert sidecar["config"] == CONFIG.to_dict() | {"depth": [1, 1], "heads": [1, 2]}
    record = sidecar["preprocessing"]
    assert record["image_size"] == [56, 56] and record["origin"] == "default"
    assert record["mean"] == [0.485, 0.456, 0.406] and 56 in record["tiled_sizes"]
    assert sidecar["platforms"] == ["cpu", "cuda", "tpu"]
    assert sidecar["compute_dtype"] == "float32"
    assert sidecar["jax_version"] == jax.__version__
    assert sidecar["program"]["bytes"] == program.stat().st_size
    assert sorted(p.name for p in program.parent.iterdir()) == [
        program.name,
        program.name + ".json",
    ]


def test_load_exported_checks_its_input(expected, program):
    run = exporting.load_exported(program)
    assert run.input_shape == (None, 56, 56, 3) and run.metadata["platforms"][0] == "cpu"
    assert_close(run(images(3)), expected, 1e-5, "load_exported")
    for bad in (images(2, side=64), images(2)[..., :2], images(2)[0]):
        with pytest.raises(
            ValueError, match=r"takes NHWC images of shape \(any batch, 56, 56, 3\)"
        ):
            run(bad)
    with pytest.raises(ValueError, match="preprocessed float images, got uint8"):
        run(np.zeros((1, 56, 56, 3), np.uint8))


@pytest.mark.slow
def test_fixed_batch_bfloat16_program(model, expected, tmp_path):
    path = exporting.export(
        model, tmp_path / "b3.jax", image_size=(56, 56), batch=3, dtype="bfloat16",
        platforms="cpu",
    )  # fmt: skip
    sidecar = json.loads(exporting.sidecar_path(path).read_text())
    assert sidecar["input"]["shape"] == [3, 56, 56, 3] and sidecar["compute_dtype"] == "bfloat16"
    run = exporting.load_exported(path)
    assert run.input_shape == (3, 56, 56, 3)
    logits = run(images(3))
    assert logits.dtype == np.float32
    assert_close(logits, expected, 3e-2, "bfloat16 program")
    assert not np.array_equal(logits, expected)  # computed in bfloat16 indeed
    with pytest.raises(ValueError, match=r"shape \(3, 56, 56, 3\), got \(2, 56, 56, 3\)"):
        run(images(2))
    # The model itself keeps its compute dtype.
    assert model.mlp_head.fc.dtype == np.float32


def test_load_exported_refuses_a_foreign_or_mismatched_file(program, tmp_path):
    junk = tmp_path / "junk.jax"
    junk.write_bytes(b"not a program")
    with pytest.raises(ValueError, match="not a serialized jax.export program") as err:
        exporting.load_exported(junk)
    one_line(err)
    stale = tmp_path / "stale.jax"
    stale.write_bytes(program.read_bytes() + b"\0")
    exporting.sidecar_path(stale).write_text(exporting.sidecar_path(program).read_text())
    with pytest.raises(ValueError, match="describes another program"):
        exporting.load_exported(stale)


# ---- bad requests: one line, before any work, nothing written -------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 60}, r"stage 0 has a 15x15 feature map.*nearest sizes that tile: "
                             r"height 56 or 112, width 56 or 112"),
        ({"image_size": (56, 70)}, r"nearest sizes that tile: width 56 or 112$"),
        ({"image_size": "56"}, "image_size must be a positive int or"),
        ({"image_size": (56, 0)}, "image_size must be a positive int or"),
        ({"image_size": 56, "platforms": ("cpu", "gpu")}, r"unknown platform 'gpu'.*'cuda'"),
        ({"image_size": 56, "platforms": "cpu,tpu,metal"}, "unknown platform 'metal'"),
        ({"image_size": 56, "platforms": ()}, "no platform given"),
        ({"image_size": 56, "dtype": "int8"}, "unsupported compute dtype 'int8'"),
        ({"image_size": 56, "batch": 0}, "batch must be a positive int"),
    ],
)  # fmt: skip
def test_bad_requests_are_one_line_and_write_nothing(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        exporting.export(model, tmp_path / "out.jax", **kwargs)
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(model, program):
    before = program.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite") as err:
        exporting.export(model, program, image_size=56)
    one_line(err)
    assert program.read_bytes() == before


# ---- convert export ------------------------------------------------------------------------


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    export_command.add_parser(parser.add_subparsers(dest="name", required=True), [common])
    return parser.parse_args(["export", *argv])


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    """A saved model whose preprocessing record says it was trained at 56x56."""
    directory = sepvit_jax.save(model, tmp_path_factory.mktemp("ckpt") / "model_flax")
    meta = json.loads((directory / "sepvit.json").read_text())
    meta["preprocessing"].update(image_size=[56, 56], origin="trained", mean=[0.5] * 3)
    (directory / "sepvit.json").write_text(json.dumps(meta))
    return directory


def test_convert_export_command(expected, checkpoint, tmp_path, capsys):
    args = cli(str(checkpoint), "-o", str(tmp_path / "m.jax"), "--platforms", "cpu,tpu")
    assert args.command == "convert.export"
    assert export_command.run(args) == 0
    assert "input: float32 NHWC (any batch, 56, 56, 3)" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "m.jax.json").read_text())
    assert sidecar["platforms"] == ["cpu", "tpu"] and sidecar["input"]["shape"][1:] == [56, 56, 3]
    # The directory's record travels along (default image size included).
    assert sidecar["preprocessing"]["origin"] == "trained"
    assert sidecar["preprocessing"]["mean"] == [0.5] * 3
    run = exporting.load_exported(tmp_path / "m.jax")
    assert_close(run(images(3)), expected, 1e-5, "convert export")


@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["--image-size", "60"], ValueError, "nearest sizes that tile: height 56 or 112"),
        (["--platforms", "cpu,gpu"], ValueError, "unknown platform 'gpu'"),
        (["--batch", "2", "-o", "/nonexistent/m.jax"], FileNotFoundError, "does not exist"),
    ],
)
def test_convert_export_bad_input_before_loading(checkpoint, tmp_path, argv, error, message):
    args = cli(str(checkpoint), "-o", str(tmp_path / "m.jax"), *argv)
    with pytest.raises(error, match=message) as err:
        export_command.run(args)
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_convert_export_flags():
    args = cli("d", "-o", "f", "--image-size", "56,112", "--batch", "8", "--dtype", "bfloat16")
    assert (args.image_size, args.batch, args.dtype) == ((56, 112), 8, "bfloat16")
    assert cli("d", "-o", "f").platforms == "cpu,cuda,tpu"
    for bad in (["--batch", "0"], ["--image-size", "1,2,3"], ["--dtype", "float64"]):
        with pytest.raises(SystemExit):
            cli("d", "-o", "f", *bad)


# ---- the accelerators' programs, lowered here -----------------------------------------------


@pytest.mark.slow
def test_accelerator_programs_lower():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lower_for_accelerators.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    programs = result["programs"]
    failed = {name: p["error"] for name, p in programs.items() if not p["ok"]}
    assert not failed, failed
    assert len(programs) == 6
    for name, p in programs.items():
        platform = name.split("/")[1]
        # The forwards' platforms are `Exported.platforms`; the train step's come from a private
        # attribute of the lowering, reported empty if JAX drops it.
        assert p["platforms"] in ([platform], [] if "train" in name else None), name
        assert p["main"] and p["stablehlo_ops"] > 100, name
        # No custom call a serialized program could not carry (jax.export checks the forwards).
        assert set(p["custom_calls"]) <= {"shape_assertion"}, (name, p["custom_calls"])
        if name.startswith("train_step"):
            assert p["num_partitions"] == [8] and p["mesh"] == ['["data"=2, "fsdp"=4]'], name
            assert p["fsdp_shardings"] > 0, name  # the state's fsdp-sharded arrays
        else:
            assert p["num_partitions"] == [1] and p["fsdp_shardings"] == 0, name
    assert any("ff']['fc1']['kernel']" in path for path in result["fsdp_sharded"])
