"""`convert export DIR -o FILE`: a sepvit_jax checkpoint directory -> a serialized JAX program.

    convert export DIR -o FILE [--image-size N | H,W] [--platforms cpu,cuda,tpu] [--batch N]
                               [--dtype float32|bfloat16] [--overwrite]

FILE is the `jax.export` serialization of the model's eval-mode forward (weights inside; NHWC
float32 images -> float32 logits; any batch size unless --batch), FILE.json its sidecar; see
`sepvit_jax.stablehlo`. The image size defaults to the directory's preprocessing record, which
the sidecar carries along. Every flag is checked before a weight is read.

This module is imported when the CLI builds its parser, for every command: it imports no JAX
at module level (`run` brings in `sepvit_jax.stablehlo` and the checkpoint loader).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import sepvit_jax
from convert.console import Step, quiet_orbax_logging
from sepvit_jax.core.format import read_metadata, read_preprocessing

DEFAULT_PLATFORMS = "cpu,cuda,tpu"  # sepvit_jax.stablehlo.DEFAULT_PLATFORMS
DTYPE_CHOICES = ("float32", "bfloat16")


def _size(text: str) -> tuple[int, int]:
    """`224` -> (224, 224), `224,320` -> (224, 320) (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or H,W: {text!r}") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected H or H,W of positive ints: {text!r}")
    return (values[0], values[0]) if len(values) == 1 else values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int: {text!r}")
    return value


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    """Register `export` on the CLI's subparsers (`parents`: the common flags, e.g. --debug)."""
    parser = subparsers.add_parser(
        "export", parents=list(parents), help="Flax dir -> serialized JAX program (StableHLO)"
    )
    parser.add_argument("directory", help="a sepvit_jax checkpoint directory")
    parser.add_argument("-o", "--output", required=True, help="the program file (FILE.json too)")
    parser.add_argument(
        "--image-size", type=_size, help="H or H,W (default: the directory's preprocessing record)"
    )
    parser.add_argument(
        "--platforms",
        default=DEFAULT_PLATFORMS,
        help=f"comma-separated, among cpu, cuda, rocm, tpu (default {DEFAULT_PLATFORMS})",
    )
    parser.add_argument("--batch", type=_positive, help="fixed batch size (default: any)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help="compute dtype (default: the checkpoint's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(command="convert.export")
    return parser


def run(args) -> int:
    directory = Path(args.directory)
    config, _ = read_metadata(directory)  # a clear error before anything heavy
    record = read_preprocessing(directory)
    image_size = tuple(args.image_size or record.image_size)
    # JAX and Orbax come in here, not at import: the CLI imports this module for its parser.
    exporting = importlib.import_module("sepvit_jax.stablehlo")
    request = exporting.check_request(
        config, image_size=image_size, batch=args.batch, platforms=args.platforms, dtype=args.dtype
    )
    out = exporting.check_output(args.output, args.overwrite)
    quiet_orbax_logging()
    with Step(f"reading {directory}"):
        model = sepvit_jax.load(directory)
    with Step(f"exporting for {', '.join(request.platforms)}"):
        path = exporting.export(
            model,
            out,
            image_size=request.image_size,
            batch=request.batch,
            platforms=request.platforms,
            dtype=request.dtype,
            preprocessing=record,
            overwrite=args.overwrite,
        )
    batch = args.batch or "any batch"
    shape = f"({batch}, {request.image_size[0]}, {request.image_size[1]}, {config.channels})"
    print(f"input: float32 NHWC {shape}; output: float32 logits ({batch}, {config.num_classes})")
    print(f"wrote {path} ({path.stat().st_size:,} bytes) and {exporting.sidecar_path(path).name}")
    return 0
