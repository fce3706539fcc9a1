"""The steps of a conversion, shared by the `convert` CLI, `sepvit_jax.from_torch` and
`sepvit_torch.load`: resolve the config, lay the weights out for Flax, verify, and read back.

Arrays are numpy throughout; torch layouts (NCHW, OIHW) on the torch side and NHWC layouts
(HWIO kernels, (in, out) dense kernels) in the Flax parameter tree, through the one weight
table of `convert.mapping`. JAX is imported only by the steps that run a model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.infer import DEFAULT_WINDOW_SIZE, infer_config
from convert.io import CheckpointError
from convert.mapping import weight_table
from sepvit_jax.config import SepViTConfig

DTYPES = ("float32", "bfloat16", "float16")
# Config fields the weights cannot tell; everything else is read off the tensor shapes.
NOT_IN_WEIGHTS = {"window_size": DEFAULT_WINDOW_SIZE, "dropout": 0.0}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SepViTConfig))
# float32 logits of the torch and the converted Flax model agree to this (max|diff|/max|ref|).
VERIFY_RTOL = 2e-5


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The config a conversion uses, its dtype, and where every value came from."""

    config: SepViTConfig
    dtype: str
    sources: dict[str, str]  # field -> "weights" | "flag" | "config" | "default"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A --config JSON: SepViT fields (any subset) and optionally "dtype"."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"config file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"config file {p} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config file {p} must hold a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - {*CONFIG_FIELDS, "dtype"})
    if unknown:
        raise CheckpointError(
            f"config file {p} has unknown keys {unknown}; expected some of "
            f"{[*CONFIG_FIELDS, 'dtype']}"
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _pick(
    name: str, flags: Mapping, config: Mapping, default: Any, flags_origin: str
) -> tuple[Any, str]:
    """flag > config > default, with the source (`flags_origin` for a flag)."""
    if flags.get(name) is not None:
        return flags[name], flags_origin
    if config.get(name) is not None:
        return config[name], "config"
    return default, "default"


def _agrees(field: str, given: Any, cfg: SepViTConfig) -> bool:
    if field == "depth":
        return isinstance(given, Sequence) and tuple(given) == cfg.depth
    if field == "heads":
        per_stage = tuple(given) if isinstance(given, Sequence) else (given,) * cfg.num_stages
        return per_stage == cfg.stage_heads
    if field == "ff_mult":
        # Only int(width * ff_mult) is in the weights: 4 and 4.0 (and 4.01 on small widths) agree.
        if isinstance(given, bool) or not isinstance(given, int | float):
            return False
        return all(int(d * given) == cfg.ff_inner_dim(i) for i, d in enumerate(cfg.stage_dims))
    return given == getattr(cfg, field)


def resolve_config(
    state_dict: Mapping[str, Any],
    *,
    flags: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    config_origin: str = "--config",
    flags_origin: str = "flag",
) -> Resolved:
    """The SepViTConfig of a state_dict: shapes from the weights, the rest flag > config > default.

    `flags` and `config` may name any config field (and "dtype"); a value the weights contradict
    is an error naming both values. `flags_origin` names the flags in messages and sources
    ("flag" for the CLI, "argument" for the Python API). Raises CheckpointError.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config = dict(config or {})
    unknown = sorted(set(flags) - {*CONFIG_FIELDS, "dtype"})
    if unknown:
        raise CheckpointError(f"unknown SepViT config fields {unknown}")
    window, window_src = _pick("window_size", flags, config, None, flags_origin)
    dropout, dropout_src = _pick("dropout", flags, config, NOT_IN_WEIGHTS["dropout"], flags_origin)
    dtype, dtype_src = _pick("dtype", flags, config, "float32", flags_origin)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(window, list):
        window = tuple(window)
    cfg, sources = infer_config(state_dict, window_size=window, dropout=dropout)
    # The two fields the weights do not give: where they really came from.
    sources.update(window_size=window_src, dropout=dropout_src)

    contradictions, adopt = [], {}
    for origin_name, given_values in ((flags_origin, flags), (config_origin, config)):
        for field, given in given_values.items():
            if field in NOT_IN_WEIGHTS or field == "dtype":
                continue
            if field in flags and given_values is not flags:
                continue  # the flag wins; it was checked already
            if not _agrees(field, given, cfg):
                contradictions.append(
                    f"{origin_name} gives {field}={_show(given)} but the weights have "
                    f"{field}={_show(getattr(cfg, field))}"
                )
            elif field == "ff_mult" and given != cfg.ff_mult:
                adopt[field] = given
                sources[field] = flags_origin if given_values is flags else "config"
    if contradictions:
        raise CheckpointError("; ".join(contradictions))
    if adopt:
        cfg = cfg.replace(**adopt)
    sources["dtype"] = dtype_src
    return Resolved(cfg, dtype, sources)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


# ---- torch state_dict -> Flax parameter tree -------------------------------------------------


def expected_shapes(cfg: SepViTConfig) -> dict[str, tuple[int, ...]]:
    """torch key -> shape of a SepViT of `cfg`, without allocating any weights."""
    try:
        import torch

        import sepvit_torch
    except ImportError:
        return _expected_shapes_jax(cfg)
    with torch.device("meta"):
        model = sepvit_torch.SepViT.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _expected_shapes_jax(cfg: SepViTConfig) -> dict[str, tuple[int, ...]]:
    from convert.mapping import _variable
    from sepvit_jax.checkpoint import abstract_model

    model = abstract_model(cfg)
    return {
        row.torch_key: row.transform.to_torch(
            np.empty(_variable(model, row.flax_path).shape, np.int8)
        ).shape
        for row in weight_table(cfg)
    }


def check_state_dict(cfg: SepViTConfig, state_dict: Mapping[str, Any]) -> None:
    """Every key of a SepViT of `cfg` present with its shape, and nothing else."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {want[k]})"
        for k in want
        if k in state_dict and tuple(state_dict[k].shape) != want[k]
    ]
    problems = [
        f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
        if keys
    ]
    if wrong:
        problems.append(f"mis-shaped ({len(wrong)}): {'; '.join(wrong[:3])}")
    if problems:
        raise CheckpointError(f"state_dict does not fit the inferred SepViT: {'; '.join(problems)}")


def params_tree(cfg: SepViTConfig, state_dict: Mapping[str, np.ndarray], param_dtype: str):
    """The NNX pure-dict parameter tree (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`).

    Leaves stay views of the state_dict where the layout allows (no copy for float32 ->
    float32), so the peak memory of a conversion is about one copy of the weights.
    """
    dtype = _np_dtype(param_dtype)
    tree: dict = {}
    for row in weight_table(cfg):
        node = tree
        for part in row.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[row.flax_path[-1]] = row.transform.to_flax(state_dict[row.torch_key]).astype(
            dtype, copy=False
        )
    return tree


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def round_through(state_dict: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """float32 copies of the weights as they are after storing them in `dtype`."""
    target = _np_dtype(dtype)
    return {k: np.asarray(v).astype(target).astype(np.float32) for k, v in state_dict.items()}


# ---- verification ----------------------------------------------------------------------------


def smallest_image_size(cfg: SepViTConfig, limit: int = 8192) -> int:
    """The smallest square input side whose feature maps tile into whole windows in every stage."""
    for side in range(1, limit):
        try:
            cfg.check_image_size(side, side)
        except ValueError:
            continue
        return side
    raise CheckpointError(f"no input size up to {limit} tiles the windows {cfg.window_size}")


@dataclasses.dataclass(frozen=True)
class Verification:
    max_abs: float
    max_rel: float
    image_size: int
    batch: int

    @property
    def ok(self) -> bool:
        return self.max_rel <= VERIFY_RTOL


def verify(cfg: SepViTConfig, state_dict: Mapping[str, np.ndarray], flax_model, *, seed=0):
    """Run the torch reference on `state_dict` and `flax_model` on one random batch.

    Both run in float32 (give the state_dict rounded through the checkpoint's dtype, see
    `round_through`), in eval mode, with JAX matmuls at full precision.
    """
    import jax
    import torch

    import sepvit_torch

    torch_model = sepvit_torch.SepViT.from_config(cfg).eval()
    weights = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state_dict.items()}
    torch_model.load_state_dict(weights, strict=True)
    side, batch = smallest_image_size(cfg), 2
    x = np.random.default_rng(seed).standard_normal((batch, cfg.channels, side, side), np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy().astype(np.float64)
    from flax import nnx

    flax_model.eval()
    # One compiled program: op-by-op eager dispatch of a SepViT is several times slower.
    with jax.default_matmul_precision("highest"):
        got = nnx.jit(lambda m, images: m(images))(flax_model, x.transpose(0, 2, 3, 1))
    got = np.asarray(got, np.float64)
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    rel = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
    return Verification(diff, rel, side, batch)


# ---- Flax checkpoint -> torch state_dict -----------------------------------------------------


def flax_dir_state_dict(directory) -> tuple[SepViTConfig, dict[str, np.ndarray], dict]:
    """(config, torch-named state_dict, sepvit.json) of a sepvit_jax checkpoint directory.

    Arrays keep the stored dtype (bfloat16 as `ml_dtypes.bfloat16`, which `convert.io`
    writes as torch bfloat16).
    """
    from convert.mapping import nnx_to_state_dict
    from sepvit_jax.checkpoint import load, read_metadata

    _, meta = read_metadata(directory)
    model = load(directory)
    return model.config, nnx_to_state_dict(model), meta
