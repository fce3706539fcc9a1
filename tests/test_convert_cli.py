"""The `convert` CLI end to end: real subprocesses for the representative paths (both console
scripts and `python -m convert`), `convert.cli.main` in-process for the many variants.

Every checkpoint is a real file written the way training code writes it: the golden fixtures,
wrapper dicts, a realistic PyTorch Lightning checkpoint, EMA copies, DDP/compile prefixes,
float16/bfloat16 tensors, safetensors, pickled modules, and malicious pickles. Every failing
command must exit with its status, print one `error: ...` line, no traceback, and leave no
output (nor temporary sibling) behind.
"""

from __future__ import annotations

import argparse
import builtins
import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

import sepvit_torch
from convert import verify
from convert.cli import main
from sepvit_jax.checkpoint import directory_state_dict
from sepvit_jax.core.infer import CONFIG_FIELDS
from tests.helpers import FIXTURES, GOLDEN_CASES

BIN = Path(sys.executable).parent


def fixture_sd(case: str = "two_stage_56") -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)


def fixture_config(case: str):
    from sepvit_jax.core.infer import infer_config

    return infer_config(fixture_sd(case))


def run(*args, script: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The CLI in a child process: a console script from the venv, or `python -m convert`."""
    if script is None:
        cmd = [sys.executable, "-m", "convert"]
    else:
        exe = BIN / script
        if not exe.exists():
            pytest.skip(f"console script {script} is not installed next to {sys.executable}")
        cmd = [str(exe)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env
    )


def cli(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_failed(status: int, err: str, *fragments: str, expected: int = 2) -> str:
    """Exit `expected`, exactly one `error:` line (besides `warning:` lines), no traceback."""
    assert status == expected, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def config_table(stdout: str) -> dict[str, tuple[str, str]]:
    """The printed config: field -> (value, source)."""
    fields = {*CONFIG_FIELDS, "dtype"}
    rows = [line.split() for line in stdout.splitlines()]
    return {r[0]: (r[1], r[2]) for r in rows if len(r) >= 3 and r[0] in fields}


def listing(directory: Path) -> list[str]:
    """Every entry, hidden temporaries included."""
    return sorted(os.listdir(directory))


def converted_state_dict(directory: Path) -> dict[str, np.ndarray]:
    return directory_state_dict(directory)[1]


def assert_bitwise(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        value = np.asarray(got[key])
        assert value.dtype == expected.dtype, (key, value.dtype, expected.dtype)
        assert np.array_equal(value, expected), key


# ---- the fixtures through real subprocesses ------------------------------------------------


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory):
    """`convert torch2flax two_stage_56.pt --verify` through the `convert` console script."""
    out = tmp_path_factory.mktemp("cli") / "two_stage_flax"
    proc = run("torch2flax", FIXTURES / "two_stage_56.pt", "-o", out, "--verify", script="convert")
    return proc, out


def test_torch2flax_fixture_with_verify_subprocess(two_stage_run):
    proc, out = two_stage_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr
    stdout = proc.stdout
    # The config, where each value came from, the parameter count, the verification.
    table = config_table(stdout)
    assert table["num_classes"] == ("10", "weights") and table["depth"] == ("1,1", "weights")
    assert table["window_size"] == ("7", "default") and table["dtype"] == ("float32", "default")
    assert table["dropout"] == ("0.0", "default") and len(table) == 10
    assert "parameters: 39,482" in stdout
    diff = float(stdout.split("max rel diff ")[1].split()[0])
    assert "max abs diff" in stdout and diff <= verify.VERIFY_RTOL and "): ok" in stdout
    assert sorted(os.listdir(out)) == ["config.json", "params", "sepvit.json"]
    assert listing(out.parent) == ["two_stage_flax"]  # no temporary sibling left
    config = json.loads((out / "config.json").read_text())
    assert config == {**fixture_config("two_stage_56").to_dict(), "depth": [1, 1], "heads": [1, 2]}
    assert_bitwise(converted_state_dict(out), fixture_sd())


def test_flax2torch_round_trip_is_bitwise_subprocess(two_stage_run, tmp_path):
    _, directory = two_stage_run
    back = tmp_path / "back.pt"
    proc = run("flax2torch", directory, "-o", back, script="sepvit-convert")
    assert proc.returncode == 0, proc.stderr
    loaded = torch.load(back, weights_only=True)
    original = fixture_sd()
    assert list(loaded) == list(original)  # same keys, same (module) order
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    model = sepvit_torch.SepViT.from_config(fixture_config("two_stage_56"))
    model.load_state_dict(loaded, strict=True)


def test_inspect_json_subprocess():
    proc = run("inspect", FIXTURES / "rect_gray.pt", "--json", "--image-size", "56,112")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"] == {**fixture_config("rect_gray").to_dict(), "depth": [1, 1]}
    assert info["sources"]["window_size"] == "default" and info["sources"]["dim"] == "weights"
    assert info["num_params"] == sum(v.numel() for v in fixture_sd("rect_gray").values())
    assert info["dtypes"] == {"float32": len(fixture_sd("rect_gray"))}
    assert [(s["feature_map"], s["windows"]) for s in info["stages"]] == [
        ([14, 28], 8),
        ([7, 14], 2),
    ]


class _Touch:
    """Unpickling calls builtins.open(marker, "w"): creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _System:
    """Unpickling runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["zip", "legacy_pickle"])
def test_malicious_pickle_refused_and_never_runs_subprocess(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if kind == "zip":  # torch.save of an object whose unpickling calls open()
        torch.save({"state_dict": fixture_sd(), "extra": _Touch(marker)}, path)
    else:  # a raw pickle (protocol 5: STACK_GLOBAL) whose unpickling runs a shell command
        path.write_bytes(pickle.dumps({"model": _System(marker)}, protocol=5))
    before = listing(tmp_path)
    proc = run("torch2flax", path)
    line = assert_failed(proc.returncode, proc.stderr, "would execute code", str(path))
    assert ("io.open" if kind == "zip" else "system") in line
    assert "--unsafe-pickle" in line
    assert not marker.exists()
    assert listing(tmp_path) == before  # and no evil_flax/ output


def test_error_exits_subprocess(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"state_dict": _resnet_like()}, resnet)
    proc = run("torch2flax", resnet)
    assert_failed(proc.returncode, proc.stderr, "does not look like a SepViT", "'conv1.weight'")
    proc = run("inspect", tmp_path / "missing.pt", script="sepvit-convert")
    assert_failed(proc.returncode, proc.stderr, "not found", "missing.pt")
    assert listing(tmp_path) == ["resnet.pth"]


# ---- the other fixtures, in-process ---------------------------------------------------------


@pytest.fixture(scope="session")
def fixture_dirs(tmp_path_factory):
    """Each golden fixture converted with --verify in-process: case -> (status, stdout, dir)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("fixtures")
    results = {}
    for case in GOLDEN_CASES[1:]:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            status = main(
                ["torch2flax", str(FIXTURES / f"{case}.pt"), "-o", str(root / case), "--verify"]
            )
        results[case] = (status, buffer.getvalue(), root / case)
    return results


@pytest.mark.parametrize("case", GOLDEN_CASES[1:])
def test_torch2flax_fixtures_round_trip_in_process(fixture_dirs, tmp_path, capsys, case):
    status, _, directory = fixture_dirs[case]
    assert status == 0
    assert_bitwise(converted_state_dict(directory), fixture_sd(case))
    for fmt in ("pt", "safetensors"):
        back = tmp_path / f"back.{fmt}"
        status, out, err = cli(capsys, "flax2torch", directory, "-o", back)
        assert status == 0, err
        if fmt == "pt":
            loaded = torch.load(back, weights_only=True)
        else:
            from safetensors.torch import load_file

            loaded = load_file(back)
        assert_bitwise({k: v.numpy() for k, v in loaded.items()}, fixture_sd(case))
        model = sepvit_torch.SepViT.from_config(fixture_config(case))
        model.load_state_dict(loaded, strict=True)


@pytest.mark.parametrize("case", GOLDEN_CASES[1:])
def test_verify_fixture_in_process(fixture_dirs, case):
    status, out, _ = fixture_dirs[case]
    assert status == 0
    diff = float(out.split("max rel diff ")[1].split()[0])
    assert diff <= verify.VERIFY_RTOL and "): ok" in out


def test_verify_mismatch_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def mismatch(cfg, state_dict, flax_model, **kwargs):
        return verify.Verification(max_abs=0.5, max_rel=0.1, image_size=(53, 53), batch=2)

    import convert.verify

    monkeypatch.setattr(convert.verify, "verify", mismatch)
    status, out, err = cli(
        capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "-o", tmp_path / "o", "--verify"
    )
    assert_failed(status, err, "verification failed", "nothing was written", expected=1)
    assert "MISMATCH" in out
    assert listing(tmp_path) == []


# ---- wrappings, prefixes, suffixes and dtypes ------------------------------------------------


class LitClassifier(torch.nn.Module):
    """What a LightningModule's state_dict looks like: the net under an attribute (`model.`),
    optionally an EMA copy (`model_ema.`), and a stateless loss."""

    def __init__(self, state_dict, attr: str = "model", ema: bool = False):
        super().__init__()
        net = sepvit_torch.SepViT.from_config(fixture_config("two_stage_56"))
        net.load_state_dict(state_dict)
        setattr(self, attr, net)
        if ema:
            self.model_ema = copy.deepcopy(net)
            with torch.no_grad():
                for p in self.model_ema.parameters():
                    p.mul_(0.5)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)


def lightning_checkpoint(module: torch.nn.Module) -> dict:
    """The entries Lightning 2.x writes (all readable weights-only), with real optimizer and
    scheduler states after one step."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-4, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    sum(p.square().sum() for p in module.parameters()).backward()
    optimizer.step()
    scheduler.step()
    ckpt_cb = "ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max', 'every_n_train_steps': 0, "
    ckpt_cb += "'every_n_epochs': 1, 'train_time_interval': None}"
    progress = {"ready": 4, "started": 4, "processed": 4, "completed": 3}
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": module.state_dict(),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 120},
                "epoch_progress": {"total": dict(progress), "current": dict(progress)},
            },
            "validate_loop": {"state_dict": {}, "batch_progress": {"total": dict(progress)}},
        },
        "callbacks": {
            ckpt_cb: {
                "monitor": "val/acc",
                "best_model_score": torch.tensor(0.91),
                "best_model_path": "/runs/a/epoch=2.ckpt",
                "current_score": torch.tensor(0.91),
                "dirpath": "/runs/a",
                "best_k_models": {"/runs/a/epoch=2.ckpt": torch.tensor(0.91)},
                "kth_best_model_path": "/runs/a/epoch=2.ckpt",
                "kth_value": torch.tensor(0.91),
                "last_model_path": "",
            },
            "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}": {
                "wait_count": 0,
                "stopped_epoch": 0,
                "best_score": torch.tensor(0.42),
                "patience": 5,
            },
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"num_classes": 10, "lr": 3e-4, "depth": (1, 1), "ema": False},
    }


def _prefixed(prefix: str):
    return lambda sd: ({prefix + k: v for k, v in sd.items()}, sd, [])


def _lightning(attr: str):
    def build(sd):
        module = LitClassifier(sd, attr=attr)
        ckpt = lightning_checkpoint(module)
        return ckpt, getattr(module, attr).state_dict(), []

    return build


def _lightning_ema(sd):
    module = LitClassifier(sd, ema=True)
    ckpt = lightning_checkpoint(module)
    return ckpt, module.model_ema.state_dict(), ["--key", "state_dict.model_ema"]


def _timm(sd):
    ema = {k: v * 0.5 for k, v in sd.items()}
    ckpt = {
        "epoch": 30,
        "arch": "sepvit",
        "state_dict": sd,
        "state_dict_ema": ema,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "version": 2,
        "args": argparse.Namespace(lr=0.1, model="sepvit", epochs=30),  # timm saves its args
        "metric": np.float64(81.5),
    }
    return ckpt, ema, ["--key", "state_dict_ema"]


WRAPPINGS = {
    "raw.pth": lambda sd: (sd, sd, []),
    "state_dict.pt": lambda sd: ({"state_dict": sd, "epoch": 7}, sd, []),
    "model.bin": lambda sd: ({"model": sd, "optimizer": {"state": {}}}, sd, []),
    "model_state_dict.pt": lambda sd: ({"model_state_dict": sd, "loss": 0.3}, sd, []),
    "ddp.pt": _prefixed("module."),
    "compiled.pt": _prefixed("_orig_mod."),
    "ddp_compiled.pt": _prefixed("module._orig_mod."),
    "lightning.ckpt": _lightning("model"),
    "lightning_net.ckpt": _lightning("net"),
    "lightning_ema.ckpt": _lightning_ema,
    "ema.pt": lambda sd: (
        {"model": sd, "model_ema": {k: -v for k, v in sd.items()}},
        {k: -v for k, v in sd.items()},
        ["--key", "model_ema"],
    ),
    "timm_ema.pth.tar": _timm,
    "legacy.pt": lambda sd: (sd, sd, []),
}


@pytest.mark.parametrize("name", list(WRAPPINGS))
def test_wrappings_convert(tmp_path, capsys, name):
    obj, expected, extra = WRAPPINGS[name](fixture_sd())
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not name.startswith("legacy"))
    status, out, err = cli(capsys, "torch2flax", path, "-o", tmp_path / "out", *extra)
    assert status == 0, err
    assert "error" not in err and "Traceback" not in err
    assert_bitwise(converted_state_dict(tmp_path / "out"), expected)


@pytest.mark.parametrize("name", ["lightning_ema.ckpt", "ema.pt", "timm_ema.pth.tar"])
def test_ambiguous_wrappings_list_candidates(tmp_path, capsys, name):
    obj, _, extra = WRAPPINGS[name](fixture_sd())
    path = tmp_path / name
    torch.save(obj, path)
    status, _, err = cli(capsys, "torch2flax", path)
    expected = {
        "lightning_ema.ckpt": ("'state_dict.model'", "'state_dict.model_ema'"),
        "ema.pt": ("'model'", "'model_ema'"),
        "timm_ema.pth.tar": ("'state_dict'", "'state_dict_ema'"),
    }[name]
    assert_failed(status, err, "several SepViT state_dicts", "--key", *expected)
    assert listing(tmp_path) == [name]


def test_lightning_extra_keys_are_dropped_with_a_warning(tmp_path, capsys):
    module = LitClassifier(fixture_sd())
    module.criterion.register_buffer("class_weights", torch.ones(10))  # not SepViT's
    ckpt = lightning_checkpoint(module)
    torch.save(ckpt, tmp_path / "lit.ckpt")
    status, _, err = cli(capsys, "inspect", tmp_path / "lit.ckpt", "--json")
    assert status == 0, err
    assert "warning: " in err and "'criterion.class_weights'" in err


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("source", ["float16", "bfloat16"])
def test_half_precision_sources(tmp_path, capsys, source, fmt):
    sd = {k: v.to(getattr(torch, source)) for k, v in fixture_sd().items()}
    path = tmp_path / f"half.{fmt}"
    if fmt == "pt":
        torch.save({"model": sd}, path)
    else:
        save_safetensors({f"model.{k}": v for k, v in sd.items()}, str(path))
    status, out, err = cli(capsys, "torch2flax", path, "-o", tmp_path / "f32")
    assert status == 0, err
    assert f"stored dtypes: {source}" in out
    got = converted_state_dict(tmp_path / "f32")  # float32 by default: exact widening
    assert_bitwise(got, {k: v.float() for k, v in sd.items()})
    # --dtype keeps the stored precision; flax2torch writes it back bitwise.
    status, out, err = cli(capsys, "torch2flax", path, "-o", tmp_path / "d", "--dtype", source)
    assert status == 0, err
    assert config_table(out)["dtype"] == (source, "flag")
    status, out, err = cli(capsys, "flax2torch", tmp_path / "d", "-o", tmp_path / "back.pt")
    assert status == 0, err
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    model = sepvit_torch.SepViT.from_config(fixture_config("two_stage_56"))
    model.load_state_dict(back, strict=True)


def test_bfloat16_output_of_float32_weights(tmp_path, capsys):
    status, out, err = cli(
        capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "-o", tmp_path / "bf", "--dtype",
        "bfloat16",
    )  # fmt: skip
    assert status == 0, err
    meta = json.loads((tmp_path / "bf" / "sepvit.json").read_text())
    assert meta["param_dtype"] == "bfloat16"
    got = converted_state_dict(tmp_path / "bf")
    for key, value in fixture_sd().items():
        assert got[key].dtype.name == "bfloat16"
        assert np.array_equal(got[key].astype(np.float32), value.bfloat16().float().numpy()), key


def test_window_size_and_config_file(tmp_path, capsys):
    path = FIXTURES / "three_stage_112.pt"
    status, out, err = cli(
        capsys, "torch2flax", path, "-o", tmp_path / "a", "--window-size", "7,7,3"
    )
    assert status == 0, err
    assert config_table(out)["window_size"] == ("7,7,3", "flag")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["window_size"] == [7, 7, 3]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"window_size": 14, "num_classes": 7, "dtype": "float16"}))
    status, out, err = cli(capsys, "torch2flax", path, "-o", tmp_path / "b", "--config", config)
    assert status == 0, err
    table = config_table(out)
    assert table["window_size"] == ("14", "config") and table["dtype"] == ("float16", "config")
    assert table["num_classes"] == ("7", "weights")


# ---- errors ----------------------------------------------------------------------------------


def _resnet_like():
    return {
        "conv1.weight": torch.zeros(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "bn1.num_batches_tracked": torch.tensor(0),
        "fc.weight": torch.zeros(10, 8),
        "fc.bias": torch.zeros(10),
    }


def _truncated(tmp_path: Path, legacy: bool = False) -> Path:
    torch.save(fixture_sd(), tmp_path / "full.pt", _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "full.pt").unlink()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pt"


def _write(name: str, data: bytes):
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return make


def _saved(name: str, obj):
    def make(tmp_path: Path) -> Path:
        torch.save(obj() if callable(obj) else obj, tmp_path / name)
        return tmp_path / name

    return make


def _safetensors_other(tmp_path: Path) -> Path:
    save_safetensors({"embed.weight": torch.zeros(4, 2)}, str(tmp_path / "lm.safetensors"))
    return tmp_path / "lm.safetensors"


# name -> (make the input, extra args, fragments of the error line)
ERRORS = {
    "missing": (lambda d: d / "nope.pt", [], ["checkpoint not found", "nope.pt"]),
    "directory": (lambda d: d, [], ["is a directory"]),
    "empty": (_write("empty.pt", b""), [], ["empty (0 bytes)"]),
    "truncated zip": (_truncated, [], ["truncated or corrupt", "cut.pt"]),
    "truncated legacy": (lambda d: _truncated(d, legacy=True), [], ["truncated or corrupt"]),
    "garbage": (_write("junk.pth", b"not a checkpoint\n" * 8), [], ["truncated or corrupt"]),
    "resnet": (_saved("resnet.pth", {"model": _resnet_like()}), [], ["no 'layers.0.0.conv"]),
    "other safetensors": (_safetensors_other, [], ["does not look like a SepViT"]),
    "no state_dict": (_saved("meta.pt", {"epoch": 1}), [], ["found no state_dict", "'epoch'"]),
    "bad key": (
        _saved("k.pt", lambda: {"model": fixture_sd()}),
        ["--key", "ema"],
        ["no entry 'ema'", "'model'"],
    ),
    "stage count": (
        lambda d: FIXTURES / "two_stage_56.pt",
        ["--window-size", "7,7,14,7"],
        ["(7, 7, 14, 7) has 4 entries", "2 stages"],
    ),
    "pickled module": (
        _saved("whole.pt", lambda: sepvit_torch.SepViT.from_config(fixture_config("rect_gray"))),
        [],
        ["would execute code", "sepvit_torch.model.SepViT", "--unsafe-pickle"],
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_input_errors(tmp_path, capsys, name):
    make, extra, fragments = ERRORS[name]
    work = tmp_path / "work"
    work.mkdir()
    path = make(work)
    before = listing(work)
    status, out, err = cli(capsys, "torch2flax", path, "-o", work / "out", *extra)
    assert_failed(status, err, *fragments)
    assert listing(work) == before
    if path.parent == work:  # the default output (next to the input) too
        status, out, err = cli(capsys, "torch2flax", path, *extra)
        assert_failed(status, err, *fragments)
        assert listing(work) == before


def test_debug_shows_the_exception(tmp_path):
    from sepvit_jax.core.torch_io import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        main(["torch2flax", str(tmp_path / "nope.pt"), "--debug"])


def test_config_contradicting_the_weights(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_classes": 1000, "dim_head": 32, "heads": [1, 2]}))
    status, _, err = cli(capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "-o",
                         tmp_path / "o", "--config", config)  # fmt: skip
    assert_failed(status, err, "num_classes=1000", "num_classes=10")
    config.write_text("{not json")
    status, _, err = cli(capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "--config", config)
    assert_failed(status, err, "not valid JSON")
    config.write_text(json.dumps({"widht": 3}))
    status, _, err = cli(capsys, "torch2flax", FIXTURES / "two_stage_56.pt", "--config", config)
    assert_failed(status, err, "unknown keys ['widht']")
    assert listing(tmp_path) == ["config.json"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    ckpt = FIXTURES / "two_stage_56.pt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", out)
    assert_failed(status, err, "already exists", "--overwrite")
    # Even with --overwrite, a folder that is not a checkpoint is never replaced.
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", out, "--overwrite")
    assert_failed(status, err, "refusing to replace")
    assert listing(out) == ["keep.txt"] and listing(tmp_path) == ["out"]
    # An earlier conversion is replaced with --overwrite only.
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "conv")
    assert status == 0, err
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "conv")
    assert_failed(status, err, "already exists")
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "conv", "--overwrite")
    assert status == 0, err
    assert listing(tmp_path) == ["conv", "out"]
    # flax2torch refuses to overwrite a file, too.
    (tmp_path / "model.pt").write_bytes(b"old")
    status, _, err = cli(capsys, "flax2torch", tmp_path / "conv", "-o", tmp_path / "model.pt")
    assert_failed(status, err, "already exists")
    assert (tmp_path / "model.pt").read_bytes() == b"old"
    status, _, err = cli(capsys, "torch2flax", ckpt, "-o", tmp_path / "missing" / "out")
    assert_failed(status, err, "does not exist")


def test_unsafe_pickle_loads_a_pickled_module_with_a_warning(tmp_path, capsys):
    config = fixture_config("rect_gray")
    model = sepvit_torch.SepViT.from_config(config)
    model.load_state_dict(fixture_sd("rect_gray"))
    torch.save({"model": model, "epoch": 3}, tmp_path / "whole.pt")
    status, out, err = cli(
        capsys, "torch2flax", tmp_path / "whole.pt", "-o", tmp_path / "o", "--unsafe-pickle"
    )
    assert status == 0, err
    assert err.startswith("warning: ") and "unsafe" in err and "Traceback" not in err
    assert_bitwise(converted_state_dict(tmp_path / "o"), fixture_sd("rect_gray"))


def test_flax_side_errors(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    for command in ("flax2torch", "inspect"):
        status, _, err = cli(capsys, command, tmp_path / "plain")
        assert_failed(status, err, "not a sepvit_jax checkpoint directory")
        status, _, err = cli(capsys, command, tmp_path / "absent")
        assert_failed(status, err, "not found")
    assert listing(tmp_path) == ["plain"]


def test_inspect_text_and_directory(tmp_path, capsys, fixture_dirs):
    _, _, directory = fixture_dirs["three_stage_112"]
    status, out, err = cli(capsys, "inspect", FIXTURES / "three_stage_112.pt")
    assert status == 0, err
    assert "stages at a 224x224 input:" in out and "parameters: 242,615" in out
    assert "float32 (84 tensors)" in out
    status, out, err = cli(capsys, "inspect", directory, "--json", "--image-size", "112")
    assert status == 0, err
    info = json.loads(out)
    assert info["format"] == "sepvit_jax" and info["num_params"] == 242_615
    assert [s["windows"] for s in info["stages"]] == [16, 4, 1]
    assert info["dtypes"] == {"float32": 84}
