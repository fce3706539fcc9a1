"""Saving and loading sepvit_jax models: a directory holding the config and an Orbax checkpoint.

The one on-disk format of the project: `convert torch2flax` writes it, `train.py` reads and
writes it, `sepvit_jax.load`/`save` and `sepvit_torch.load` read it.

    DIR/config.json   the SepViTConfig (vit-pytorch's keyword arguments), JSON
    DIR/sepvit.json   format name and version, param dtype, compute dtype hint, parameter count,
                      and where the weights came from
    DIR/params/       an Orbax checkpoint of `nnx.state(model, nnx.Param)` as a pure dict
                      (NHWC layouts: conv kernels (kh, kw, in, out), dense kernels (in, out))

Writes are atomic: everything goes to a hidden temporary sibling directory that replaces DIR
only once complete, so a crash or an error never leaves a half-written checkpoint. Loading
restores into an abstract model (`nnx.eval_shape`): nothing is randomly initialised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sepvit_jax.config import SepViTConfig

FORMAT = "sepvit_jax"
FORMAT_VERSION = 1
CONFIG_FILE, META_FILE, PARAMS_DIR = "config.json", "sepvit.json", "params"


# ---- atomic directories ----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; it becomes `directory` on success.

    An existing `directory` is refused unless `overwrite`, and then only replaced when it is a
    sepvit_jax checkpoint or empty (never an arbitrary folder), after the new one is complete.
    On any exception the temporary directory is removed and `directory` is left as it was.
    """
    final = Path(directory).absolute()
    check_target(final, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        check_target(final, overwrite)  # it may have appeared meanwhile
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(final: Path, overwrite: bool) -> None:
    """Raise unless `final` may become a checkpoint directory (see `atomic_directory`)."""
    if not final.parent.is_dir():
        raise FileNotFoundError(f"cannot write {final}: directory {final.parent} does not exist")
    if not final.exists() and not final.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"output {final} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if not final.is_dir() or final.is_symlink():
        raise FileExistsError(f"refusing to replace {final}: it is not a directory")
    if not (final / META_FILE).is_file() and any(final.iterdir()):
        raise FileExistsError(
            f"refusing to replace {final}: it is neither empty nor a sepvit_jax checkpoint "
            f"(no {META_FILE})"
        )


# ---- writing ---------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
    import numpy as np

    return np.dtype(dtype).name


def write_checkpoint(
    directory: str | os.PathLike,
    config: SepViTConfig,
    params: Mapping[str, Any],
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    before_commit=None,
) -> Path:
    """Write a checkpoint from a pure dict of parameters (numpy or JAX arrays, NNX paths).

    `before_commit(tmp_dir)` runs on the complete temporary directory before it is renamed
    into place (the converter verifies there); if it raises, nothing is left behind.
    """
    import numpy as np

    num_params = sum(int(np.prod(np.shape(a))) for a in _leaves(params))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "param_dtype": param_dtype,
        "dtype": dtype or param_dtype,
        "num_params": num_params,
        "source": dict(source or {}),
    }
    final = Path(directory).absolute()
    with atomic_directory(final, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _orbax_save(tmp / PARAMS_DIR, params)
        if before_commit is not None:
            before_commit(tmp)
    return final


def _leaves(tree) -> Iterator[Any]:
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _checkpointer():
    import orbax.checkpoint as ocp

    # Synchronous (no background commit thread): the directory is complete on return.
    return ocp.Checkpointer(
        ocp.StandardCheckpointHandler(), multiprocessing_options=_this_process_only()
    )


def _this_process_only():
    """Orbax options for a write or read by this process alone, from host arrays.

    This format is written by one process (process 0 of a training run, after gathering) and
    read by any process independently; without this, Orbax would wait at a barrier for every
    process of a multi-process run.
    """
    import jax
    import orbax.checkpoint as ocp

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
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=False, use_compression=False, type_handler_registry=registry
    )
    _hide_ocdbt_merge_warning()
    with ocp.Checkpointer(handler, multiprocessing_options=_this_process_only()) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(params))


class _OcdbtMergeFilter(logging.Filter):
    # Orbax's finalize always tries to merge per-process OCDBT files, and warns that it found
    # none when OCDBT is off, as it is here on purpose. Only that one message is dropped.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


def _hide_ocdbt_merge_warning() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OcdbtMergeFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_OcdbtMergeFilter())


def _args():
    import orbax.checkpoint as ocp

    return ocp.args


def save(
    model, directory: str | os.PathLike, *, overwrite: bool = False, source: Mapping | None = None
) -> Path:
    """Save a `sepvit_jax.SepViT` (its config and parameters) to `directory`; returns the path.

    The parameter dtype is recorded and restored by `load`. Atomic; an existing `directory` is
    refused unless `overwrite`.
    """
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtypes = sorted({_dtype_name(leaf.dtype) for leaf in _leaves(params)})
    if len(dtypes) != 1:
        # The format records one parameter dtype (what `load` restores into); a mix would be
        # silently cast on load.
        raise ValueError(f"cannot save a model with mixed parameter dtypes {dtypes}; cast it first")
    param_dtype = dtypes[0]
    return write_checkpoint(
        directory,
        model.config,
        params,
        param_dtype=param_dtype,
        dtype=param_dtype,
        source=source or {"saved_by": "sepvit_jax.save"},
        overwrite=overwrite,
    )


# ---- reading ---------------------------------------------------------------------------------


def read_metadata(directory: str | os.PathLike) -> tuple[SepViTConfig, dict[str, Any]]:
    """(config, sepvit.json contents) of a checkpoint directory, without touching the params."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    if not d.is_dir():
        raise ValueError(f"not a sepvit_jax checkpoint directory (a file): {d}")
    for name in (CONFIG_FILE, META_FILE):
        if not (d / name).is_file():
            raise ValueError(f"not a sepvit_jax checkpoint directory: {d} has no {name}")
    try:
        meta = json.loads((d / META_FILE).read_text())
        config = SepViTConfig.from_json(d / CONFIG_FILE)
    except (ValueError, TypeError) as err:
        raise ValueError(f"broken sepvit_jax checkpoint {d}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a sepvit_jax checkpoint directory: {d / META_FILE} is foreign")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{d} has checkpoint format version {meta['format_version']}; this sepvit_jax reads "
            f"up to {FORMAT_VERSION}: upgrade sepvit_jax"
        )
    return config, meta


def load_config(directory: str | os.PathLike) -> SepViTConfig:
    return read_metadata(directory)[0]


def restore_params(directory: str | os.PathLike, target: Mapping[str, Any]) -> dict[str, Any]:
    """Restore the pure-dict parameters of a checkpoint against `target`.

    `target` is a pure dict of `jax.ShapeDtypeStruct` (optionally with `sharding`, which places
    each restored array, e.g. on a training mesh), shaped like `nnx.state(model, nnx.Param)`.
    """
    path = Path(directory).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise ValueError(f"broken sepvit_jax checkpoint {directory}: no {PARAMS_DIR}/ directory")
    where = f"cannot restore the parameters of {directory} (do they match its {CONFIG_FILE}?)"
    try:
        with _checkpointer() as ckptr:
            # Compare shapes first: a mismatch found mid-restore leaves Orbax's other reads
            # dangling (unretrieved task exceptions), and this names every offending tensor.
            _check_stored_shapes(ckptr.metadata(path), target, where)
            return ckptr.restore(path, args=_args().StandardRestore(target))
    except (ValueError, KeyError, TypeError, OSError) as err:
        if str(err).startswith(where):
            raise
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{where}: {type(err).__name__}: {detail}") from None


def _check_stored_shapes(metadata, target: Mapping[str, Any], where: str) -> None:
    import jax

    def flat(tree) -> dict[str, tuple[int, ...]]:
        return {
            "/".join(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape)
            for keys, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    tree = getattr(metadata, "item_metadata", metadata)
    stored, wanted = flat(getattr(tree, "tree", tree)), flat(target)
    problems = [f"missing {k}" for k in wanted if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in wanted]
    problems += [
        f"{k}: stored {stored[k]}, expected {shape}"
        for k, shape in wanted.items()
        if k in stored and stored[k] != shape
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{where}: {'; '.join(problems[:3])}{more}")


def abstract_model(config: SepViTConfig, *, dtype=None, param_dtype=None, seed: int = 0):
    """A SepViT of `config` whose arrays are only shapes (nothing allocated or initialised)."""
    import jax.numpy as jnp
    from flax import nnx

    from sepvit_jax.model import SepViT

    dtypes = dict(dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
    return nnx.eval_shape(lambda: SepViT.from_config(config, rngs=nnx.Rngs(seed), **dtypes))


def load(directory: str | os.PathLike, *, dtype=None, param_dtype=None, seed: int = 0):
    """Load a `sepvit_jax.SepViT` saved by `save` or `convert torch2flax`.

    Args:
      directory: the checkpoint directory.
      dtype: compute dtype; default: the checkpoint's hint (sepvit.json "dtype").
      param_dtype: parameter dtype; default: as stored. Other dtypes are cast after restoring.
      seed: seeds the dropout RNG streams (the only state not in the checkpoint).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    config, meta = read_metadata(directory)
    stored = jnp.dtype(meta.get("param_dtype", "float32"))
    param_dtype = jnp.dtype(param_dtype or stored)
    dtype = jnp.dtype(dtype or meta.get("dtype") or param_dtype)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, seed=seed)
    state = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, stored), nnx.to_pure_dict(state))
    restored = restore_params(directory, target)
    restored = jax.tree.map(lambda a: a.astype(param_dtype), restored)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    fill_rng_state(model, seed)
    return model


def fill_rng_state(model, seed: int = 0) -> None:
    """Give the RNG variables of an abstract model (`abstract_model`) values derived from `seed`.

    Parameters are left alone; fill them from a checkpoint or a state_dict.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    base = jax.random.key(seed)
    rng_vars = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.RngState)]
    for index, var in enumerate(rng_vars):
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(base, index))
        else:
            var.set_value(jnp.zeros(var.shape, var.dtype))


def from_torch(
    path_or_state_dict,
    *,
    key: str | None = None,
    unsafe_pickle: bool = False,
    dtype=None,
    param_dtype=None,
    seed: int = 0,
    **overrides,
):
    """A `sepvit_jax.SepViT` from a PyTorch SepViT checkpoint file or state_dict.

    Args:
      path_or_state_dict: a torch pickle / safetensors path, or an in-memory (possibly wrapped
        or prefixed) state_dict of torch tensors or numpy arrays.
      key: the wrapper entry holding the weights (e.g. "model_ema") when there are several.
      unsafe_pickle: allow pickles that run code (trusted files only).
      dtype, param_dtype: compute and parameter dtypes (default float32).
      **overrides: config fields. `window_size` (default 7, what upstream always uses) and
        `dropout` (default 0) are not in the weights; any other field must agree with them.
    """
    from convert.io import read_state_dict, to_numpy, unwrap_state_dict
    from convert.mapping import from_state_dict
    from convert.pipeline import check_state_dict, resolve_config

    if isinstance(path_or_state_dict, str | os.PathLike):
        sd = read_state_dict(path_or_state_dict, key=key, unsafe_pickle=unsafe_pickle)
    else:
        raw = unwrap_state_dict(path_or_state_dict, key=key, source="state_dict")
        sd = {name: to_numpy(value, name) for name, value in raw.items()}
    config = resolve_config(sd, flags=overrides, flags_origin="argument").config
    check_state_dict(config, sd)
    return from_state_dict(config, sd, dtype=dtype, param_dtype=param_dtype, seed=seed)
