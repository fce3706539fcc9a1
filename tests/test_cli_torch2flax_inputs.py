"""`convert torch2flax` on the PyTorch files training code writes: wrapper dicts, a realistic
PyTorch Lightning checkpoint, EMA copies (--key), DDP/compile prefixes, float16/bfloat16
tensors, safetensors, --dtype, --window-size and --config; `convert.cli.main` in-process."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

import sepvit_torch
from tests.helpers import (
    FIXTURES,
    assert_bitwise,
    assert_failed,
    cli,
    config_table,
    converted_state_dict,
    fixture_config,
    fixture_sd,
    listing,
)

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
