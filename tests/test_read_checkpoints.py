"""Reading checkpoints (convert.io): formats and dtypes, training wrappers and key prefixes, and
choosing among several state_dicts (EMA copies, --key).

Every checkpoint goes through a real file in tmp_path, written the way training code writes
them (torch.save of wrapper dicts, DDP/compile/Lightning prefixes, safetensors, bfloat16...).
The weights come from the golden fixtures copied into tests/fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

from sepvit_jax.core.torch_io import CheckpointError, read_state_dict, unwrap_state_dict
from tests.helpers import FIXTURES, GOLDEN_CASES, Tree, assert_same, fixture_sd, save


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return fixture_sd()


# ---- plain files and formats -------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_fixture_checkpoints_read_unchanged(case):
    want = fixture_sd(case)
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
