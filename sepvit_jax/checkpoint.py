"""Saving and loading `sepvit_jax.SepViT` models: the Orbax part of the checkpoint directory.

The directory (config.json, sepvit.json, params/) is described in `sepvit_jax.core.format`;
this module writes and reads its `params/`, an Orbax checkpoint of the NNX parameter tree as a
pure dict, and turns parameter trees into models with `nnx.merge`: nothing is randomly
initialised when a model is loaded or converted. The weight table (`sepvit_jax.core.table`)
gives every stored array's path and shape, so a directory is checked against its own
config.json before any array is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sepvit_jax.core import table
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.format import (
    PARAMS_DIR,
    atomic_directory,
    read_metadata,
    read_preprocessing,
    write_metadata,
)
from sepvit_jax.core.infer import resolve_config
from sepvit_jax.core.layouts import CURRENT, Layout
from sepvit_jax.core.preprocessing import Preprocessing
from sepvit_jax.core.torch_io import read_state_dict, to_numpy, unwrap_state_dict
from sepvit_jax.model import SepViT

# ---- models from parameter trees -------------------------------------------------------------


def abstract_model(config: SepViTConfig, *, dtype=None, param_dtype=None, seed: int = 0) -> SepViT:
    """A SepViT of `config` whose arrays are only shapes (nothing allocated or initialised)."""
    dtypes = dict(dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
    return nnx.eval_shape(lambda: SepViT.from_config(config, rngs=nnx.Rngs(seed), **dtypes))


def model_from_params(
    config: SepViTConfig, params: Mapping, *, dtype=None, param_dtype=None, seed: int = 0
) -> SepViT:
    """A SepViT holding the parameter tree `params` (a pure dict, see `table.to_flax`).

    Parameters are cast to `param_dtype` (default float32); the dropout RNG streams, the only
    other state, get keys derived from `seed`.
    """
    param_dtype = jnp.dtype(param_dtype or jnp.float32)
    graphdef, abstract_params, rest = nnx.split(
        abstract_model(config, dtype=dtype, param_dtype=param_dtype, seed=seed), nnx.Param, ...
    )
    nnx.replace_by_pure_dict(
        abstract_params, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), dict(params))
    )
    model = nnx.merge(graphdef, abstract_params, rest)
    _fill_rng_state(model, seed)
    return model


def _fill_rng_state(model: SepViT, seed: int) -> None:
    """Give the (abstract) RNG variables of `model` values derived from `seed`."""
    base = jax.random.key(seed)
    rng_vars = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.RngState)]
    for index, var in enumerate(rng_vars):
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(base, index))
        else:
            var.set_value(jnp.zeros(var.shape, var.dtype))


def from_state_dict(
    config: SepViTConfig, state_dict: Mapping[str, Any], *, dtype=None, param_dtype=None, seed=0
) -> SepViT:
    """A SepViT holding a torch-named state_dict (numpy arrays or torch tensors).

    Every missing, unexpected or mis-shaped tensor is reported at once (CheckpointError).
    """
    arrays = {k: to_numpy(v, k) for k, v in state_dict.items()}
    table.check_state_dict(config, arrays, "state_dict")
    params = table.to_flax(config, arrays)
    return model_from_params(config, params, dtype=dtype, param_dtype=param_dtype, seed=seed)


def state_dict_to_nnx(model: SepViT, state_dict: Mapping[str, Any]) -> SepViT:
    """Copy a torch-named state_dict (numpy arrays or torch tensors) into `model` in place.

    Values are cast to each parameter's dtype. Every missing, unexpected and mis-shaped tensor
    is reported at once (CheckpointError) and the model is then left untouched. Returns it.
    """
    arrays = {k: to_numpy(v, k) for k, v in state_dict.items()}
    table.check_state_dict(model.config, arrays, "state_dict")
    params = nnx.state(model, nnx.Param)
    dtypes = jax.tree.map(lambda v: v.dtype, nnx.to_pure_dict(params))
    tree = table.to_flax(model.config, arrays)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, tree, dtypes))
    nnx.update(model, params)
    return model


def nnx_to_state_dict(model: SepViT) -> dict[str, np.ndarray]:
    """The model's parameters as a torch-named `dict[str, numpy.ndarray]` (torch layouts)."""
    return table.to_torch(model.config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def from_torch(
    path_or_state_dict,
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
    dtype=None,
    param_dtype=None,
    seed: int = 0,
    **overrides,
) -> SepViT:
    """A `sepvit_jax.SepViT` from a PyTorch SepViT checkpoint file or state_dict.

    Args:
      path_or_state_dict: a torch pickle / safetensors path, or an in-memory (possibly wrapped
        or prefixed) state_dict of torch tensors or numpy arrays, in any layout vit-pytorch
        has written (`sepvit_jax.core.layouts`).
      key: the wrapper entry holding the weights (e.g. "model_ema") when there are several.
      unsafe_pickle: allow pickles that run code (trusted files only).
      dtype, param_dtype: compute and parameter dtypes (default float32).
      **overrides: config fields. `window_size` (default 7, what upstream always uses) and
        `dropout` (default 0) are not in the weights; any other field must agree with them.
    """
    if isinstance(path_or_state_dict, str | os.PathLike):
        source = str(path_or_state_dict)
        state_dict = read_state_dict(path_or_state_dict, key=key, unsafe_pickle=unsafe_pickle)
    else:
        source = "state_dict"
        raw = unwrap_state_dict(path_or_state_dict, key=key, source=source)
        state_dict = {name: to_numpy(value, name) for name, value in raw.items()}
    resolved = resolve_config(state_dict, flags=overrides, flags_origin="argument", source=source)
    config = resolved.config
    params = table.to_flax(config, state_dict, rows=resolved.layout.table(config))
    return model_from_params(config, params, dtype=dtype, param_dtype=param_dtype, seed=seed)


# ---- writing ---------------------------------------------------------------------------------


def write_checkpoint(
    directory: str | os.PathLike,
    config: SepViTConfig,
    params: Mapping[str, Any],
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    source: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: list[str] | None = None,
    overwrite: bool = False,
    before_commit=None,
) -> Path:
    """Write a checkpoint directory from a parameter tree (numpy or JAX arrays, NNX paths).

    `preprocessing` and `class_names` describe the model's input and output (see
    `sepvit_jax.core.format.write_metadata`). `before_commit(tmp_dir)` runs on the complete
    temporary directory before it is renamed into place (the converter verifies there); if it
    raises, nothing is left behind.
    """
    num_params = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(params))
    final = Path(directory).absolute()
    with atomic_directory(final, overwrite=overwrite) as tmp:
        write_metadata(
            tmp,
            config,
            num_params=num_params,
            param_dtype=param_dtype,
            dtype=dtype,
            source=source,
            preprocessing=preprocessing,
            class_names=class_names,
        )
        _orbax_save(tmp / PARAMS_DIR, params)
        if before_commit is not None:
            before_commit(tmp)
    return final


def save(
    model: SepViT, directory: str | os.PathLike, *, overwrite: bool = False, source=None
) -> Path:
    """Save a `sepvit_jax.SepViT` (its config and parameters) to `directory`; returns the path.

    The model's `preprocessing` and `class_names` (see `describe`), when it has them, are saved
    too. The parameter dtype is recorded and restored by `load`. Atomic; an existing `directory`
    is refused unless `overwrite`.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtypes = sorted({np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)})
    if len(dtypes) != 1:
        # The format records one parameter dtype (what `load` restores into); a mix would be
        # silently cast on load.
        raise ValueError(f"cannot save a model with mixed parameter dtypes {dtypes}; cast it first")
    class_names = getattr(model, "class_names", None)
    return write_checkpoint(
        directory,
        model.config,
        params,
        param_dtype=dtypes[0],
        source=source or {"saved_by": "sepvit_jax.save"},
        preprocessing=getattr(model, "preprocessing", None),
        class_names=list(class_names) if class_names is not None else None,
        overwrite=overwrite,
    )


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a write or read by this process alone, from host arrays.

    This format is written by one process (process 0 of a training run, after gathering) and
    read by any process independently; without this, Orbax would wait at a barrier for every
    process of a multi-process run.
    """
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _orbax_save(path: Path, params: Mapping[str, Any]) -> None:
    """Write the pure-dict `params` (numpy or JAX arrays) as an Orbax PyTree checkpoint.

    Tuned for one big write of weights nobody modifies meanwhile (measured on sepvit_base,
    benchmarks/conversion.py): no defensive copy of numpy arrays, no OCDBT (it buffers the
    whole checkpoint in memory until its commit), no zstd (weights barely compress and it
    costs seconds). Peak memory stays near one copy of the weights. `StandardRestore` and
    `PyTreeRestore` read it like any other Orbax checkpoint.
    """
    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=False, use_compression=False, type_handler_registry=registry
    )
    _hide_ocdbt_merge_warning()
    with ocp.Checkpointer(handler, multiprocessing_options=_this_process_only()) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(params))


class _OcdbtMergeFilter(logging.Filter):
    # Orbax's finalize always tries to merge per-process OCDBT files, and warns that it found
    # none when OCDBT is off, as it is here on purpose. Only that one message is dropped.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


def _hide_ocdbt_merge_warning() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OcdbtMergeFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_OcdbtMergeFilter())


# ---- reading ---------------------------------------------------------------------------------


def restore_params(directory: str | os.PathLike) -> tuple[SepViTConfig, dict, dict]:
    """(config, sepvit.json contents, parameter tree) of a checkpoint directory.

    The parameters keep their stored dtype. The stored arrays' names and shapes are checked
    against the table of the directory's own config.json first (all problems listed together),
    so a tampered directory is refused before anything is read or built.
    """
    config, meta = read_metadata(directory)
    path = Path(directory).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise CheckpointError(
            f"broken sepvit_jax checkpoint {directory}: no {PARAMS_DIR}/ directory"
        )
    stored = np.dtype(jnp.dtype(meta.get("param_dtype", "float32")))
    checkpointer = ocp.Checkpointer(
        ocp.StandardCheckpointHandler(), multiprocessing_options=_this_process_only()
    )
    with checkpointer:
        try:
            metadata = checkpointer.metadata(path)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise CheckpointError(f"broken sepvit_jax checkpoint {directory}: {err}") from None
        tree = getattr(metadata, "item_metadata", metadata)
        found = {
            "/".join(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape)
            for keys, leaf in jax.tree_util.tree_leaves_with_path(getattr(tree, "tree", tree))
        }
        table.check_shapes(table.flax_shapes(config), found, f"checkpoint {directory}")
        target = _restore_target(config, stored)
        try:
            params = checkpointer.restore(path, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, TypeError, OSError) as err:
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"cannot restore the parameters of {directory}: {type(err).__name__}: {detail}"
            ) from None
    return config, meta, params


def _restore_target(config: SepViTConfig, dtype) -> dict:
    tree: dict = {}
    for row in table.weight_table(config):
        node = tree
        for part in row.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[row.flax_path[-1]] = jax.ShapeDtypeStruct(row.flax_shape, dtype)
    return tree


def load(directory: str | os.PathLike, *, dtype=None, param_dtype=None, seed: int = 0) -> SepViT:
    """Load a `sepvit_jax.SepViT` saved by `save`, `convert torch2flax` or `train.py`.

    Args:
      directory: the checkpoint directory.
      dtype: compute dtype; default: the checkpoint's hint (sepvit.json "dtype").
      param_dtype: parameter dtype; default: as stored. Other dtypes are cast after restoring.
      seed: seeds the dropout RNG streams (the only state not in the checkpoint).
    """
    config, meta, params = restore_params(directory)
    stored = jnp.dtype(meta.get("param_dtype", "float32"))
    param_dtype = jnp.dtype(param_dtype or stored)
    dtype = jnp.dtype(dtype or meta.get("dtype") or param_dtype)
    model = model_from_params(config, params, dtype=dtype, param_dtype=param_dtype, seed=seed)
    describe(model, read_preprocessing(directory), meta.get("class_names"))
    return model


def describe(model: SepViT, preprocessing: Preprocessing | None, class_names=None) -> SepViT:
    """Attach what the model expects and predicts (saved with it by `save`): `preprocessing`
    (`sepvit_jax.core.preprocessing.Preprocessing`) and `class_names` (a tuple, or None)."""
    model.preprocessing = preprocessing
    model.class_names = tuple(class_names) if class_names is not None else None
    return model


def directory_state_dict(
    directory: str | os.PathLike, layout: Layout = CURRENT
) -> tuple[SepViTConfig, dict, dict]:
    """(config, torch-named state_dict in `layout`, sepvit.json contents) of a directory.

    No model is built: the stored tree goes through the weight table. Arrays keep the stored
    dtype (bfloat16 as `ml_dtypes.bfloat16`, which `sepvit_jax.core.torch_io` writes as torch
    bfloat16).
    """
    config, meta, params = restore_params(directory)
    return config, table.to_torch(config, params, rows=layout.table(config)), meta
