"""`convert`: PyTorch SepViT checkpoints <-> sepvit_jax checkpoint directories, and inspection.

    convert torch2flax CKPT [-o OUT_DIR] [--window-size 7 | 7,7,14,7] [--config config.json]
                       [--dtype float32|bfloat16|float16] [--key NAME] [--image-size N]
                       [--verify] [--overwrite]
    convert flax2torch DIR [-o model.pt] [--safetensors] [--layout current|prenorm|grouped]
                       [--overwrite]
    convert inspect CKPT_OR_DIR [--json] [--image-size 224 | 224,320] [--window-size ...]
    convert export DIR -o FILE [--image-size N] [--platforms cpu,cuda,tpu] [--batch N]
                   [--dtype float32|bfloat16]

Every command also takes --debug (show tracebacks) and, where it reads torch pickles,
--unsafe-pickle (load pickled modules, which runs code from the file: trusted files only).
Exit status: 0 done, 1 --verify found a mismatch, 2 bad input or usage (one `error: ...` line on
stderr). Outputs are written to a temporary sibling and renamed when complete, so a failure never
leaves a partial file or directory behind. The checkpoint layouts are described in
`sepvit_jax.core.format` (directory) and `sepvit_jax.core.torch_io` (torch files).

Each command is a module (`convert.torch2flax`, `convert.flax2torch`, `convert.inspect_checkpoint`,
`convert.export`) imported only when it runs, so `inspect` never loads JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings

from convert import export

DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # sepvit_jax.core.infer.PARAM_DTYPES
LAYOUT_CHOICES = ("current", "prenorm", "grouped")  # sepvit_jax.core.layouts.LAYOUTS


def _ints(text: str) -> int | tuple[int, ...]:
    """`7` -> 7, `7,7,14,7` -> (7, 7, 14, 7); positive ints only (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int or comma-separated ints: {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints: {text!r}")
    return values[0] if len(values) == 1 else values


# ---- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    reads_torch = argparse.ArgumentParser(add_help=False)
    reads_torch.add_argument("--key", help="wrapper entry holding the weights, e.g. model_ema")
    reads_torch.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="load pickles that run code (whole pickled modules); trusted files only",
    )
    windows = argparse.ArgumentParser(add_help=False)
    windows.add_argument(
        "--window-size", type=_ints, help="window side, one int or one per stage (default 7)"
    )
    parser = argparse.ArgumentParser(prog="convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="name", required=True)

    t2f = sub.add_parser(
        "torch2flax", parents=[common, reads_torch, windows], help="torch checkpoint -> Flax dir"
    )
    t2f.add_argument("checkpoint", help=".pt/.pth/.bin/.ckpt/.safetensors file")
    t2f.add_argument("-o", "--output", help="output directory (default: CKPT stem + _flax)")
    t2f.add_argument("--config", help="config.json with SepViT fields (and dtype)")
    t2f.add_argument("--dtype", choices=DTYPE_CHOICES, help="parameter dtype (default float32)")
    t2f.add_argument(
        "--image-size",
        type=_positive_int,
        help="the input side the model expects, recorded with it and used by --verify "
        "(default 224, or the nearest side its windows tile)",
    )
    t2f.add_argument("--verify", action="store_true", help="compare torch and Flax logits")
    t2f.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t2f.set_defaults(command="convert.torch2flax")

    f2t = sub.add_parser("flax2torch", parents=[common], help="Flax dir -> torch state_dict")
    f2t.add_argument("directory", help="a sepvit_jax checkpoint directory")
    f2t.add_argument("-o", "--output", help="output file (default: DIR.pt)")
    f2t.add_argument("--safetensors", action="store_true", help="write safetensors")
    f2t.add_argument(
        "--layout",
        choices=LAYOUT_CHOICES,
        default="current",
        help="current: vit-pytorch >= 1.4.3 and sepvit_torch; prenorm: vit-pytorch 0.32.2 to "
        "1.4.2; grouped: 0.32.1 (only while the window-token projection is block-diagonal)",
    )
    f2t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    f2t.set_defaults(command="convert.flax2torch")

    ins = sub.add_parser(
        "inspect", parents=[common, reads_torch, windows], help="config, stages, parameters"
    )
    ins.add_argument("path", help="a torch checkpoint file or a sepvit_jax directory")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument(
        "--image-size",
        type=_size,
        help="H or H,W for the stage table (default: the model's recorded size, or 224)",
    )
    ins.set_defaults(command="convert.inspect_checkpoint")

    export.add_parser(sub, [common])
    return parser


def _positive_int(text: str) -> int:
    value = _ints(text)
    if not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"expected one positive int: {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    value = _ints(text)
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise argparse.ArgumentTypeError(f"expected H or H,W: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ info logs, before JAX loads
    with _cli_warnings(), _terminate_as_interrupt():
        try:
            return importlib.import_module(args.command).run(args)
        except KeyboardInterrupt:
            # Raised inside the command, so its temporary output was removed on the way out.
            print("error: interrupted; nothing was written", file=sys.stderr)
            return 130
        except Exception as err:
            if args.debug:
                raise
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def _cli_warnings():
    """Python warnings as one `warning: ...` line each on stderr (no source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler or `kill`) unwinds like Ctrl-C, so temporary outputs are removed."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (main() called from a worker thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, ValueError | OSError):
        return text or type(err).__name__
    # Not an input problem we anticipated: say what it was and how to see more.
    return f"{type(err).__name__}: {text} (--debug shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
