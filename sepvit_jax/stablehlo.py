"""Exporting a SepViT as a serialized JAX program (`jax.export`): StableHLO, weights inside.

    path            the serialized `jax.export.Exported` of the eval-mode forward: NHWC float32
                    images (batch, H, W, C) -> float32 logits (batch, num_classes); the batch is
                    symbolic ("b", any size) unless fixed; the parameters are constants of the
                    program, lowered for each platform asked for (default cpu, cuda and tpu)
    path + ".json"  the sidecar: input/output specs, SepViTConfig, preprocessing record
                    (`sepvit_jax.core.preprocessing`), platforms, compute dtype, JAX version,
                    the program's sha256

The file alone runs the model, in a process importing only JAX:
`jax.export.deserialize(bytearray(open(path, "rb").read())).call(images)`; `load_exported` adds
the sidecar's checks. Bad requests are one-line ValueErrors (or OSErrors) before anything is
traced or written; both files go to temporary siblings, renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sepvit_jax.checkpoint import model_from_params
from sepvit_jax.core.config import SepViTConfig
from sepvit_jax.core.preprocessing import Preprocessing, imagenet, nearest_tiled_sizes
from sepvit_jax.model import SepViT

FORMAT, FORMAT_VERSION = "sepvit_jax.export", 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's built-in platforms
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
BATCH_SYMBOL = "b"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of an exported program: `path + ".json"`."""
    return Path(str(path) + ".json")


# ---- checking a request (before any work) --------------------------------------------------


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, Integral) else image_size
    if (
        isinstance(size, str)
        or not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, Integral) and s > 0 for s in size)
    ):
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r}"
        )
    return int(size[0]), int(size[1])


def check_tiles(config: SepViTConfig, height: int, width: int) -> None:
    """ValueError naming the stage that does not tile, and the nearest sides that do."""
    try:
        config.check_image_size(height, width)
    except ValueError as err:
        # Tiling is per axis: a side tiles as a height (or width) when it tiles as a square.
        hints = [
            f"{name} {' or '.join(map(str, near))}"
            for name, side in (("height", height), ("width", width))
            if (near := nearest_tiled_sizes(config, side)) != [side]
        ]
        raise ValueError(f"{err}; nearest sizes that tile: {', '.join(hints)}") from None


def _platforms(platforms: str | Sequence[str]) -> tuple[str, ...]:
    names = platforms.split(",") if isinstance(platforms, str) else list(platforms)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if not names:
        raise ValueError(f"no platform given; choose among {', '.join(PLATFORMS)}")
    unknown = [n for n in names if n not in PLATFORMS]
    if unknown:
        hint = " (NVIDIA GPUs are 'cuda', AMD GPUs 'rocm')" if "gpu" in unknown else ""
        raise ValueError(
            f"unknown platform {unknown[0]!r}; choose among {', '.join(PLATFORMS)}{hint}"
        )
    return tuple(dict.fromkeys(names))


def _dtype(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"unsupported compute dtype {dtype!r}; choose among {', '.join(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request; batch None: symbolic; dtype None: the model's."""

    image_size: tuple[int, int]
    batch: int | None
    platforms: tuple[str, ...]
    dtype: str | None


def check_request(
    config: SepViTConfig,
    *,
    image_size: int | Sequence[int],
    batch: int | None = None,
    platforms: str | Sequence[str] = DEFAULT_PLATFORMS,
    dtype=None,
) -> Request:
    """Every argument of `export` but the output, checked (one-line ValueErrors)."""
    height, width = _image_size(image_size)
    check_tiles(config, height, width)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int (or None: any size), got {batch!r}")
    return Request((height, width), batch, _platforms(platforms), _dtype(dtype))


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output path, once it and its sidecar may be written."""
    target = Path(path).absolute()
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    for file in (target, sidecar_path(target)):
        if file.is_dir():
            raise IsADirectoryError(f"output {file} is a directory; give a file name")
        if (file.exists() or file.is_symlink()) and not overwrite:
            raise FileExistsError(
                f"output {file} already exists; pass --overwrite (overwrite=True) to replace it"
            )
    return target


# ---- the program ---------------------------------------------------------------------------


def exported_program(
    model: SepViT,
    *,
    image_size: int | Sequence[int],
    batch: int | None = None,
    platforms: str | Sequence[str] = DEFAULT_PLATFORMS,
    dtype=None,
) -> jax.export.Exported:
    """The `jax.export.Exported` of `model`'s eval-mode forward (arguments as for `export`;
    the model is left as it is)."""
    request = check_request(
        model.config, image_size=image_size, batch=batch, platforms=platforms, dtype=dtype
    )
    forward = _eval_forward(model, request.dtype or _model_dtype(model))
    (rows,) = jax.export.symbolic_shape(BATCH_SYMBOL) if batch is None else (batch,)
    spec = jax.ShapeDtypeStruct((rows, *request.image_size, model.config.channels), jnp.float32)
    return jax.export.export(jax.jit(forward), platforms=request.platforms)(spec)


def _model_dtype(model: SepViT) -> str:
    return jnp.dtype(getattr(model.mlp_head.fc, "dtype", None) or jnp.float32).name


def _eval_forward(model: SepViT, compute: str):
    """images -> float32 logits of an eval-mode copy of `model`, computing in `compute`, rebuilt
    from the parameters alone (shared, not copied; the RNG state, unused, stays out)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    param_dtype = dtypes.pop() if len(dtypes) == 1 else jnp.float32
    net = model_from_params(model.config, params, dtype=compute, param_dtype=param_dtype)
    net.eval()
    graph, state = nnx.split(net)

    def forward(images):
        return nnx.merge(graph, state)(images).astype(jnp.float32)

    return forward


def export(
    model: SepViT,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int],
    batch: int | None = None,
    platforms: str | Sequence[str] = DEFAULT_PLATFORMS,
    dtype=None,
    preprocessing: Preprocessing | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`'s serialized forward to `path`, its sidecar to `path + ".json"`; returns
    the program's absolute path. `model` is left unchanged.

    `image_size`: a side or (height, width) whose windows tile; `batch`: fixed, or None for any;
    `platforms`: among cpu, cuda, rocm and tpu; `dtype`: the compute dtype ("float32",
    "bfloat16", "float16"; default the model's; inputs and logits are float32 either way);
    `preprocessing`: the record for the sidecar (default ImageNet's statistics), its image size
    set to the exported one; `overwrite`: replace existing files.
    """
    config = model.config
    request = check_request(
        config, image_size=image_size, batch=batch, platforms=platforms, dtype=dtype
    )
    record = preprocessing or imagenet(config, request.image_size)
    if record.channels != config.channels:
        raise ValueError(
            f"the preprocessing record has {record.channels} channels, the model {config.channels}"
        )
    record = record.replace(image_size=request.image_size)
    target = check_output(path, overwrite)
    compute = request.dtype or _model_dtype(model)
    exported = exported_program(
        model, image_size=request.image_size, batch=batch, platforms=request.platforms,
        dtype=compute,
    )  # fmt: skip
    blob = bytes(exported.serialize())
    (height, width), rows = request.image_size, BATCH_SYMBOL if batch is None else batch
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "input": {"name": "images", "shape": [rows, height, width, config.channels],
                  "dtype": "float32", "layout": "NHWC"},
        "output": {"name": "logits", "shape": [rows, config.num_classes], "dtype": "float32"},
        "compute_dtype": compute,
        "config": config.to_dict(),
        "preprocessing": record.to_dict(config),
        "platforms": list(request.platforms),
        "jax_version": jax.__version__,
        "program": {"file": target.name, "bytes": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(),
                    "calling_convention_version": exported.calling_convention_version},
    }  # fmt: skip
    text = (json.dumps(sidecar, indent=2) + "\n").encode()
    _write_files({target: blob, sidecar_path(target): text})
    return target


def _write_files(contents: dict[Path, bytes]) -> None:
    """Write every file to a temporary sibling, then rename them all into place."""
    umask = os.umask(0o22)
    os.umask(umask)
    temporaries: dict[Path, str] = {}
    try:
        for final, data in contents.items():
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
            temporaries[final] = tmp
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        for final, tmp in temporaries.items():
            os.replace(tmp, final)
    except BaseException:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


# ---- loading -------------------------------------------------------------------------------


class ExportedModel:
    """`logits = model(images)` (NHWC float images) through an exported program; `exported`
    (the `jax.export.Exported`), `metadata` (the sidecar, or None), `input_shape` (batch or None,
    H, W, C)."""

    def __init__(self, exported: jax.export.Exported, metadata: dict[str, Any] | None, name: str):
        self.exported, self.metadata, self.name = exported, metadata, name
        (aval,) = exported.in_avals
        batch = aval.shape[0]
        self.input_shape = (batch if isinstance(batch, int) else None, *map(int, aval.shape[1:]))
        self._call = jax.jit(exported.call)

    def __call__(self, images) -> jax.Array:
        shape, dtype = tuple(np.shape(images)), np.dtype(getattr(images, "dtype", np.float32))
        batch, *rest = self.input_shape
        want = f"({batch or 'any batch'}, {', '.join(map(str, rest))})"
        if (
            len(shape) != 4
            or list(shape[1:]) != rest
            or batch not in (None, shape[0])
            or not shape[0]
        ):
            raise ValueError(f"{self.name} takes NHWC images of shape {want}, got {shape}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{self.name} takes preprocessed float images, got {dtype.name} (see the "
                "sidecar's preprocessing record)"
            )
        return self._call(jnp.asarray(images, jnp.float32))


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """The program written by `export`, as a callable checking its input's shape.

    The sidecar is optional; when present, it must describe this very file (its sha256).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program not found: {path}")
    blob = path.read_bytes()
    metadata = None
    if sidecar_path(path).is_file():
        try:
            metadata = json.loads(sidecar_path(path).read_text())
            digest = metadata["program"]["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"broken sidecar {sidecar_path(path)}: {err!r}") from None
        if digest != hashlib.sha256(blob).hexdigest():
            raise ValueError(f"{sidecar_path(path)} describes another program than {path}")
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # flatbuffers raises anything on foreign bytes
        raise ValueError(
            f"not a serialized jax.export program: {path} ({type(err).__name__})"
        ) from None
    here = jax.export.default_export_platform()
    if here not in exported.platforms:
        raise ValueError(
            f"{path} was exported for {', '.join(exported.platforms)}, not for this machine's "
            f"{here}; export it again with that platform"
        )
    if len(exported.in_avals) != 1 or len(exported.in_avals[0].shape) != 4:
        raise ValueError(f"{path} is not an exported image classifier (inputs {exported.in_avals})")
    return ExportedModel(exported, metadata, path.name)
