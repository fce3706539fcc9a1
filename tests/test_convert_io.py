"""Tests of the converter's checkpoint reading/writing (convert.io) and config inference.

Every checkpoint goes through a real file in tmp_path, written the way training code writes
them (torch.save of wrapper dicts, DDP/compile/Lightning prefixes, safetensors, bfloat16...).
The weights come from the golden fixtures copied into tests/fixtures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.infer import infer_config, resolve_config
from sepvit_jax.core.torch_io import (
    CheckpointError,
    read_state_dict,
    save_state_dict,
    unwrap_state_dict,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ("two_stage_56", "three_stage_112", "rect_gray")


def load_fixture(case: str = "two_stage_56") -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return load_fixture()


def assert_same(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    # Key order is only compared where the format keeps it (safetensors sorts its keys).
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert isinstance(got[k], np.ndarray), k
        assert got[k].dtype == t.numpy().dtype, k
        np.testing.assert_array_equal(got[k], t.numpy(), err_msg=k)


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ---- module-level helpers that pickle must find by name -----------------------------------


class Tree(torch.nn.Module):
    """A module whose state_dict has exactly the keys and shapes of a given state_dict."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        for key, value in (state or {}).items():
            node = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, Tree())
                node = getattr(node, part)
            node.register_parameter(leaf, torch.nn.Parameter(value.clone()))


class Touch:
    """Unpickling this calls Path.touch: the canary for code execution."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


# ---- plain files and formats -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fixture_checkpoints_read_unchanged(case):
    want = load_fixture(case)
    got = read_state_dict(FIXTURES / f"{case}.pt")
    assert_same(got, want)
    assert list(got) == list(want)  # torch pickles keep the module order


def test_legacy_non_zip_pickle(tmp_path, sd):
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert_same(read_state_dict(path), sd)


@pytest.mark.parametrize("name", ["weights.bin", "weights.ckpt", "weights.custom", "weights"])
def test_any_suffix_torch_file(tmp_path, sd, name):
    assert_same(read_state_dict(save({"model": sd}, tmp_path / name)), sd)


@pytest.mark.parametrize("name", ["w.safetensors", "w.bin", "w"])
def test_safetensors_by_suffix_or_content(tmp_path, sd, name):
    save_safetensors(sd, str(tmp_path / name))
    assert_same(read_state_dict(tmp_path / name), sd)


def test_safetensors_with_prefix(tmp_path, sd):
    save_safetensors({f"model.{k}": v for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert_same(read_state_dict(tmp_path / "w.safetensors"), sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_float_dtypes_are_kept(tmp_path, sd, dtype, fmt):
    cast = {k: v.to(dtype) for k, v in sd.items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(cast, path)
    else:
        save_safetensors(cast, str(path))
    got = read_state_dict(path)
    assert_same(got, cast)
    assert {a.dtype for a in got.values()} == {np.dtype(str(dtype).removeprefix("torch."))}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_bfloat16_becomes_exact_float32(tmp_path, sd, fmt):
    bf = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(bf, path)
    else:
        save_safetensors(bf, str(path))
    got = read_state_dict(path)
    for k, t in bf.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], t.float().numpy())
        # Exact both ways: casting back gives the very same bfloat16 bits.
        back = torch.from_numpy(got[k]).to(torch.bfloat16)
        assert torch.equal(back.view(torch.int16), t.view(torch.int16)), k
    # The values really were rounded to bfloat16 (the test would be vacuous otherwise).
    key = "layers.0.0.conv.weight"
    assert not np.array_equal(got[key], sd[key].numpy())


def test_tensor_views_of_one_storage_become_independent_arrays(tmp_path, sd):
    base = torch.arange(12, dtype=torch.float32)
    state = dict(sd)
    # Two keys saved as views of one storage (as tied or sliced weights are); one is strided.
    state["extra.a"] = base[:4]
    state["extra.b"] = base.view(3, 4)[:, 1]
    got = read_state_dict(save(state, tmp_path / "w.pt"))
    np.testing.assert_array_equal(got["extra.a"], [0, 1, 2, 3])
    np.testing.assert_array_equal(got["extra.b"], [1, 5, 9])
    for name in ("extra.a", "extra.b"):
        assert got[name].flags.c_contiguous and got[name].flags.owndata, name
    got["extra.a"][0] = 100.0
    assert got["extra.b"][0] == 1.0


# ---- wrappers and prefixes -----------------------------------------------------------------


def _lightning(sd):
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}}}
        ],
        "lr_schedulers": [],
    }


WRAPPERS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 7},
    "model": lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "epoch": 1, "loss": 0.5},
    "module": lambda sd: {"module": sd},
    "net": lambda sd: {"net": sd},
    "params": lambda sd: {"params": sd},
    "nested": lambda sd: {"model": {"state_dict": sd}, "args": {"lr": 3e-4}},
    "lightning": _lightning,
    "ema_only": lambda sd: {"model_ema": sd, "epoch": 2},
    "unknown_name": lambda sd: {
        "weights": sd,
        "optim": {"state": {0: {"exp_avg": torch.zeros(2)}}, "extra": {"m": torch.zeros(1)}},
    },
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrappers(tmp_path, sd, wrapper):
    assert_same(read_state_dict(save(WRAPPERS[wrapper](sd), tmp_path / "ckpt.pt")), sd)


PREFIXES = [
    "module.",
    "_orig_mod.",
    "model.",
    "module.module.",
    "module._orig_mod.",
    "_orig_mod.module.",
    "model._orig_mod.module.",
    "_orig_mod.model.module._orig_mod.",
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "model"])
def test_prefixes(tmp_path, sd, prefix, wrapper):
    prefixed = {prefix + k: v for k, v in sd.items()}
    got = read_state_dict(save(WRAPPERS[wrapper](prefixed), tmp_path / "ckpt.pt"))
    assert_same(got, sd)


def test_keys_outside_the_sepvit_prefix_are_dropped_with_a_warning(sd):
    state = {f"module.{k}": v for k, v in sd.items()}
    state["head_extra.weight"] = torch.zeros(1)  # another module's key, beside the SepViT
    with pytest.warns(UserWarning, match=r"under 'module\.'; ignoring 1 others.*head_extra"):
        got = unwrap_state_dict(state)
    assert list(got) == list(sd)
    # A key that happens to start with "model." in a plain SepViT dict stays as it is (and the
    # strict check of the converter then rejects it).
    state = dict(sd)
    state["model.extra"] = torch.zeros(1)
    assert list(unwrap_state_dict(state)) == list(state)


@pytest.mark.parametrize("attr", ["net", "backbone.encoder", "model._orig_mod"])
def test_any_attribute_prefix(tmp_path, sd, attr):
    """Lightning modules name their network freely (`self.net`, `self.backbone`...)."""
    lightning = {"state_dict": {f"{attr}.{k}": v for k, v in sd.items()}, "epoch": 1}
    assert_same(read_state_dict(save(lightning, tmp_path / "lit.ckpt")), sd)


def test_two_models_in_one_state_dict_need_key(tmp_path, sd):
    flat = {**{f"model.{k}": v for k, v in sd.items()}}
    flat.update({f"model_ema.module.{k}": v + 1 for k, v in sd.items()})
    path = save({"state_dict": flat, "epoch": 2}, tmp_path / "lit.ckpt")
    with pytest.raises(CheckpointError, match="'state_dict.model', 'state_dict.model_ema.module'"):
        read_state_dict(path)
    assert_same(read_state_dict(path, key="state_dict.model"), sd)
    assert_same(read_state_dict(path, key="state_dict.model_ema"), _ema(sd))
    assert_same(read_state_dict(path, key="state_dict.model_ema.module"), _ema(sd))
    # At the top level too.
    path = save(flat, tmp_path / "flat.pt")
    with pytest.raises(CheckpointError, match="'model', 'model_ema.module'"):
        read_state_dict(path)
    assert_same(read_state_dict(path, key="model_ema"), _ema(sd))


def test_unwrap_in_memory_module_and_numpy(sd):
    assert list(unwrap_state_dict(Tree(sd))) == list(sd)
    arrays = {f"_orig_mod.{k}": v.numpy() for k, v in sd.items()}
    got = unwrap_state_dict({"model": arrays})
    assert list(got) == list(sd)
    assert got["mlp_head.2.weight"] is arrays["_orig_mod.mlp_head.2.weight"]


# ---- choosing among several state_dicts ----------------------------------------------------


def _ema(sd):
    return {k: v + 1 for k, v in sd.items()}


def test_ambiguous_wrapper_lists_candidates(tmp_path, sd):
    path = save({"model": sd, "model_ema": _ema(sd), "epoch": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "'model'" in message and "'model_ema'" in message and "--key" in message
    assert str(path) in message and "\n" not in message


def test_timm_style_ema_needs_key(tmp_path, sd):
    path = save({"state_dict": sd, "state_dict_ema": _ema(sd)}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="'state_dict'.*'state_dict_ema'"):
        read_state_dict(path)
    assert_same(read_state_dict(path, key="state_dict"), sd)
    assert_same(read_state_dict(path, key="state_dict_ema"), _ema(sd))


@pytest.mark.parametrize("ema_key", ["model_ema", "ema", "ema_state_dict"])
def test_key_selects_ema(tmp_path, sd, ema_key):
    path = save({"model": sd, ema_key: _ema(sd)}, tmp_path / "ckpt.pt")
    assert_same(read_state_dict(path, key=ema_key), _ema(sd))
    assert_same(read_state_dict(path, key="model"), sd)


def test_dotted_key_and_wrapper_below_key(tmp_path, sd):
    ema = {f"module.{k}": v for k, v in _ema(sd).items()}  # timm ModelEmaV2 keeps `module.`
    path = save({"model": sd, "ema": {"module": ema, "decay": 0.999}}, tmp_path / "ckpt.pt")
    assert_same(read_state_dict(path, key="ema.module"), _ema(sd))
    # A key naming a wrapper is unwrapped further.
    assert_same(read_state_dict(path, key="ema"), _ema(sd))


def test_literal_dotted_entry_name(tmp_path, sd):
    path = save({"ema.module": _ema(sd), "model": sd}, tmp_path / "ckpt.pt")
    assert_same(read_state_dict(path, key="ema.module"), _ema(sd))


def test_bad_key_lists_available(tmp_path, sd):
    path = save({"model": sd, "model_ema": _ema(sd), "epoch": 4}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path, key="ema")
    message = str(info.value)
    assert "'ema'" in message and "'model'" in message and "'model_ema'" in message
    assert "'epoch'" in message
    with pytest.raises(CheckpointError, match="'nope' under 'model_ema'"):
        read_state_dict(path, key="model_ema.nope")
    with pytest.raises(CheckpointError, match="'epoch' is a int"):
        read_state_dict(path, key="epoch.x")


def test_no_state_dict_at_all(tmp_path):
    path = save({"epoch": 1, "config": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="found no state_dict.*'epoch'"):
        read_state_dict(path)
    path = save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="got list"):
        read_state_dict(path)


# ---- broken and foreign files --------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\): .*empty.pt"):
        read_state_dict(tmp_path / "empty.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, sd, legacy):
    full = tmp_path / "full.pt"
    torch.save(sd, full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(cut)
    message = str(info.value)
    assert "not a readable PyTorch or safetensors checkpoint" in message
    assert str(cut) in message and "truncated or corrupt" in message and "\n" not in message


@pytest.mark.parametrize(
    "data",
    [b"hello, this is certainly not a checkpoint\n" * 4, b"\x10\x00\x00\x00\x00\x00\x00\x00{"],
)
def test_garbage_file(tmp_path, data):
    for name in ("junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_state_dict(tmp_path / name)


def test_truncated_safetensors(tmp_path, sd):
    save_safetensors(sd, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a readable .*w.safetensors.*truncated"):
        read_state_dict(tmp_path / "w.safetensors")


def _resnet_like():
    return {
        "conv1.weight": torch.zeros(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "bn1.running_mean": torch.zeros(8),
        "bn1.num_batches_tracked": torch.tensor(0),
        "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "fc.weight": torch.zeros(10, 8),
        "fc.bias": torch.zeros(10),
    }


def test_not_sepvit_torch(tmp_path):
    path = save({"state_dict": _resnet_like()}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "does not look like a SepViT state_dict: no 'layers.0.0.conv.weight'" in message
    assert "'conv1.weight'" in message and str(path) in message


def test_not_sepvit_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    save_safetensors(
        {"embed.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(2, 4)}, str(path)
    )
    with pytest.raises(CheckpointError, match="does not look like a SepViT.*'embed.weight'"):
        read_state_dict(path)


def test_backbone_without_head_is_not_sepvit(tmp_path, sd):
    headless = {k: v for k, v in sd.items() if not k.startswith("mlp_head")}
    with pytest.raises(CheckpointError, match="no 'mlp_head.2.weight'"):
        read_state_dict(save(headless, tmp_path / "w.pt"))


# ---- pickles that run code -----------------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, sd, wrap):
    canary = tmp_path / "pwned"
    payload = {"model": sd, "extra": Touch(canary)} if wrap else Touch(canary)
    path = save(payload, tmp_path / "evil.pt")
    assert not canary.exists()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "execute code" in message and "--unsafe-pickle" in message and str(path) in message
    assert "\n" not in message
    assert not canary.exists()


class System:
    """Unpickling runs a shell command (the classic payload)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", [Touch, System])
def test_raw_pickles_of_every_protocol_are_refused(tmp_path, protocol, payload):
    canary = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": payload(canary)}, protocol=protocol))
    name = "pathlib" if payload is Touch else "system"
    with pytest.raises(CheckpointError, match=f"would execute code .*{name}"):
        read_state_dict(path)
    assert not canary.exists()


def test_plain_data_beside_the_weights_is_not_code(tmp_path, sd):
    """timm saves argparse.Namespace args, scripts save numpy metrics: weights-only reads them."""
    ckpt = {"state_dict": sd, "args": argparse.Namespace(lr=0.1), "best": np.float64(0.9)}
    assert_same(read_state_dict(save(ckpt, tmp_path / "timm.pth.tar")), sd)
    # Weights kept as numpy arrays, beside numpy statistics.
    ckpt = {"model": {k: v.numpy() for k, v in sd.items()}, "mean": np.array([0.5, 0.4])}
    assert_same(read_state_dict(save(ckpt, tmp_path / "numpy.pt")), sd)


def test_unsafe_pickle_loads_a_module_with_a_warning(tmp_path, sd):
    path = save(Tree(sd), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="execute code"):
        read_state_dict(path)
    with pytest.warns(UserWarning, match="unsafe"):
        got = read_state_dict(path, unsafe_pickle=True)
    assert_same(got, sd)
    # Nested inside a wrapper, and DDP-wrapped, too.
    path = save({"model": torch.nn.DataParallel(Tree(sd)), "epoch": 1}, tmp_path / "wrapped.pt")
    with pytest.warns(UserWarning):
        assert_same(read_state_dict(path, unsafe_pickle=True), sd)


def test_safe_load_does_not_warn(tmp_path, sd):
    path = save(sd, tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_state_dict(path)


# ---- infer_config --------------------------------------------------------------------------


def _expected_config(case: str) -> SepViTConfig:
    kwargs = json.loads((FIXTURES / f"{case}.json").read_text())["sepvit_kwargs"]
    # The fixtures come from upstream, whose blocks always use window size 7 and dim_head 32.
    return SepViTConfig.from_dict({**kwargs, "window_size": 7, "dim_head": 32})


@pytest.mark.parametrize("case", CASES)
def test_infer_config_fixtures(case):
    resolved = resolve_config(read_state_dict(FIXTURES / f"{case}.pt"))
    config, sources = resolved.config, resolved.sources
    assert config == _expected_config(case)
    # Types matter too (heads int vs tuple, ff_mult int), not only ==.
    assert type(config.heads) is type(_expected_config(case).heads)
    assert type(config.ff_mult) is int
    assert sources["window_size"] == "default" and sources["dropout"] == "default"
    for field in ("num_classes", "dim", "depth", "heads", "dim_head", "ff_mult", "channels"):
        assert sources[field] == "weights"


def test_infer_config_from_torch_tensors_and_flags(sd):
    resolved = resolve_config(sd, flags={"window_size": (7, 7), "dropout": 0.1})
    assert resolved.config.window_size == 7 and resolved.config.dropout == 0.1
    assert resolved.sources["window_size"] == "flag" and resolved.sources["dropout"] == "flag"
    config = infer_config(sd, window_size=[7, 4])
    assert config.window_size == (7, 4)
    config = infer_config(sd, window_size=14)
    assert config.window_size == 14
    with pytest.raises(CheckpointError, match=r"window_size \(7, 7, 7\) has 3 entries.*2 stages"):
        infer_config(sd, window_size=(7, 7, 7))


def _shapes(case: str = "three_stage_112") -> dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, np.float32) for k, v in load_fixture(case).items()}


def _set_ff(state, inner_of):
    for key in list(state):
        if key.endswith(".1.net.1.weight"):
            d = state[key].shape[1]
            state[key] = np.zeros((inner_of(d), d, 1, 1), np.float32)
            state[key.replace("weight", "bias")] = np.zeros((inner_of(d),), np.float32)
            state[key.replace("net.1.weight", "net.4.weight")] = np.zeros(
                (d, inner_of(d), 1, 1), np.float32
            )


@pytest.mark.parametrize("ff_mult", [1.3, 2.5, 3])
def test_infer_non_integral_ff_mult(ff_mult):
    state = _shapes()
    _set_ff(state, lambda d: int(d * ff_mult))
    config = resolve_config(state).config
    assert config.ff_mult == ff_mult and type(config.ff_mult) is type(ff_mult)
    dims = config.stage_dims
    assert [config.ff_inner_dim(i) for i in range(3)] == [int(d * ff_mult) for d in dims]


def _replace(state, key, shape):
    state[key] = np.zeros(shape, np.float32)
    return state


CONTRADICTIONS = {
    "stage width": (
        lambda s: _replace(s, "layers.1.0.conv.weight", (40, 24, 3, 3)),
        r"layers.1.0.conv.weight: checkpoint \(40, 24, 3, 3\), model expects \(48, 24, 3, 3\)",
    ),
    "dim_head": (
        lambda s: _replace(s, "layers.2.2.layers.0.0.window_tokens_to_qk.0.weight", (16,)),
        r"layers.2.2.layers.0.0.window_tokens_to_qk.0.weight: checkpoint \(16,\), model "
        r"expects \(32,\)",
    ),
    "ff_mult": (
        lambda s: _replace(
            _replace(s, "layers.1.2.layers.0.1.net.1.weight", (192, 48, 1, 1)),
            "layers.1.2.layers.0.1.net.4.weight",
            (48, 192, 1, 1),
        ),
        r"'layers.1.2.layers.0.1.net.1.weight' has 192 rows.*ff_mult",
    ),
    "heads within a stage": (
        lambda s: _replace(s, "layers.0.2.layers.1.0.to_qkv.weight", (288, 24, 1)),
        r"layers.0.2.layers.1.0.to_qkv.weight: checkpoint \(288, 24, 1\), model expects "
        r"\(192, 24, 1\)",
    ),
    "qkv not a multiple": (
        lambda s: _replace(s, "layers.0.2.layers.0.0.to_qkv.weight", (100, 24, 1)),
        r"'layers.0.2.layers.0.0.to_qkv.weight' has 100 rows, not a multiple of 3 \* dim_head",
    ),
    "head width": (
        lambda s: _replace(s, "mlp_head.2.weight", (7, 24)),
        r"mlp_head.2.weight: checkpoint \(7, 24\), model expects \(7, 96\)",
    ),
    "missing key": (
        lambda s: {k: v for k, v in s.items() if not k.endswith("1.2.layers.0.0.to_out.0.weight")},
        r"missing keys \(1\): layers.1.2.layers.0.0.to_out.0.weight",
    ),
    "stage gap": (
        lambda s: {k: v for k, v in s.items() if not k.startswith("layers.1.")},
        r"stages \[0, 2\] but not \[1\]",
    ),
    "block gap": (
        lambda s: {k: v for k, v in s.items() if not k.startswith("layers.0.2.layers.0.")},
        r"layers.0 blocks \[1\] but not \[0\]",
    ),
}


@pytest.mark.parametrize("name", list(CONTRADICTIONS))
def test_infer_contradictory_shapes_raise(name):
    corrupt, pattern = CONTRADICTIONS[name]
    with pytest.raises(CheckpointError, match=pattern):
        resolve_config(corrupt(_shapes()))


# ---- save_state_dict -----------------------------------------------------------------------


def test_save_torch_round_trip(tmp_path, sd):
    arrays = read_state_dict(FIXTURES / "two_stage_56.pt")
    arrays["half.weight"] = np.arange(4, dtype=np.float16)
    path = tmp_path / "out.pt"
    save_state_dict(arrays, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(arrays)
    for k, a in arrays.items():
        assert loaded[k].dtype == torch.from_numpy(a).dtype
        np.testing.assert_array_equal(loaded[k].numpy(), a)
    del loaded["half.weight"]
    Tree(sd).load_state_dict(loaded, strict=True)
    assert_same(read_state_dict(path), {**sd, "half.weight": torch.arange(4).half()})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("how", ["suffix", "flag"])
def test_save_safetensors_round_trip(tmp_path, sd, how):
    arrays = read_state_dict(FIXTURES / "two_stage_56.pt")
    # Read-only and strided inputs must be written correctly too.
    arrays["layers.0.0.conv.bias"] = arrays["layers.0.0.conv.bias"].copy()
    arrays["layers.0.0.conv.bias"].flags.writeable = False
    path = tmp_path / ("out.safetensors" if how == "suffix" else "out.pt")
    save_state_dict(arrays, path, safetensors=None if how == "suffix" else True)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a torch zip
    assert_same(read_state_dict(path), sd)


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_save_bfloat16_arrays(tmp_path, sd, name):
    import ml_dtypes

    arrays = {k: v.float().numpy().astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    save_state_dict(arrays, tmp_path / name)
    if name.endswith(".pt"):
        loaded = torch.load(tmp_path / name, weights_only=True)
    else:
        from safetensors.torch import load_file

        loaded = load_file(tmp_path / name)
    for k, v in sd.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.bfloat16()), k


def test_save_torch_when_suffix_says_safetensors_but_flag_says_no(tmp_path, sd):
    path = tmp_path / "out.safetensors"
    save_state_dict({k: v.numpy() for k, v in sd.items()}, path, safetensors=False)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert_same(read_state_dict(path), sd)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_save_torch_is_atomic(tmp_path, sd, monkeypatch, existing):
    path = tmp_path / "out.pt"
    if existing:
        path.write_bytes(b"previous checkpoint")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_state_dict({k: v.numpy() for k, v in sd.items()}, path)
    if existing:
        assert path.read_bytes() == b"previous checkpoint"
        assert _listing(tmp_path) == ["out.pt"]
    else:
        assert _listing(tmp_path) == []


def test_save_safetensors_is_atomic(tmp_path, sd, monkeypatch):
    from sepvit_jax.core import torch_io

    def broken_write(arrays, file):
        file.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(torch_io, "write_safetensors", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({k: v.numpy() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert _listing(tmp_path) == []


def test_save_into_missing_directory(tmp_path, sd):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_state_dict({"a": np.zeros(2)}, tmp_path / "missing" / "out.pt")
