"""`convert`: PyTorch SepViT checkpoints <-> sepvit_jax checkpoint directories, and inspection.

    convert torch2flax CKPT [-o OUT_DIR] [--window-size 7 | 7,7,14,7] [--config config.json]
                       [--dtype float32|bfloat16|float16] [--key NAME] [--verify] [--overwrite]
    convert flax2torch DIR [-o model.pt] [--safetensors] [--overwrite]
    convert inspect CKPT_OR_DIR [--json] [--image-size 224 | 224,320] [--window-size ...]

Every command also takes --debug (show tracebacks) and, where it reads torch pickles,
--unsafe-pickle (load pickled modules, which runs code from the file: trusted files only).
Exit status: 0 done, 1 --verify found a mismatch, 2 bad input or usage (one `error: ...` line on
stderr). Outputs are written to a temporary sibling and renamed when complete, so a failure never
leaves a partial file or directory behind. The checkpoint layouts are described in
`sepvit_jax.checkpoint` (directory) and `convert.io` (torch files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from convert import pipeline
from convert.io import read_state_dict_and_dtypes, save_state_dict
from convert.mapping import weight_table
from sepvit_jax import checkpoint as jax_ckpt

DEFAULT_IMAGE_SIZE = 224
_WINDOW_NOTE = " (upstream vit-pytorch always uses 7)"


class VerificationFailed(Exception):
    """--verify found logits further apart than the tolerance (exit status 1)."""


# ---- small helpers ---------------------------------------------------------------------------


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


class _Step:
    """Prints `label ... done in 1.2 s` around a slow step."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        print(f"{self.label} ...", end="", flush=True)
        self.start = time.perf_counter()

    def __exit__(self, exc_type, *_):
        print(" failed" if exc_type else f" done in {time.perf_counter() - self.start:.1f} s")


def _quiet_jax_logging() -> None:
    # Orbax/absl log every save at INFO/WARNING; the CLI's own lines are the useful output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _print_config(resolved: pipeline.Resolved) -> None:
    rows = [(k, _show(v), resolved.sources[k]) for k, v in resolved.config.to_dict().items()]
    rows.append(("dtype", resolved.dtype, resolved.sources["dtype"]))
    print("config:")
    print(f"  {'field':<12} {'value':<18} source")
    for field, value, source in rows:
        note = _WINDOW_NOTE if field == "window_size" and source == "default" else ""
        print(f"  {field:<12} {value:<18} {source}{note}")


def _read(path: Path, args, *, quiet: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    with contextlib.nullcontext() if quiet else _Step(f"reading {path}"):
        return read_state_dict_and_dtypes(path, key=args.key, unsafe_pickle=args.unsafe_pickle)


# ---- torch2flax ------------------------------------------------------------------------------


def cmd_torch2flax(args) -> int:
    ckpt = Path(args.checkpoint)
    out = Path(args.output) if args.output else ckpt.with_name(ckpt.stem + "_flax")
    config_file = pipeline.read_config_file(args.config) if args.config else {}
    jax_ckpt.check_target(out.absolute(), args.overwrite)  # fail before the slow part
    state_dict, stored = _read(ckpt, args)
    resolved = pipeline.resolve_config(
        state_dict,
        flags={"window_size": args.window_size, "dtype": args.dtype},
        config=config_file,
        config_origin=f"--config {args.config}",
    )
    cfg = resolved.config
    pipeline.check_state_dict(cfg, state_dict)
    _print_config(resolved)
    print(f"parameters: {sum(v.size for v in state_dict.values()):,}")
    print(f"stored dtypes: {', '.join(sorted(set(stored.values())))}")
    params = pipeline.params_tree(cfg, state_dict, resolved.dtype)
    source = {
        "converted_from": str(ckpt.absolute()),
        "key": args.key,
        "stored_dtypes": sorted(set(stored.values())),
    }

    def before_commit(tmp: Path) -> None:
        # Runs on the complete temporary directory: a failure leaves nothing behind.
        print(f"wrote the parameters ({resolved.dtype}) in {time.perf_counter() - start:.1f} s")
        if args.verify:
            _verify(tmp, cfg, state_dict, resolved.dtype)

    _quiet_jax_logging()
    print(f"writing {out} ...", flush=True)
    start = time.perf_counter()
    jax_ckpt.write_checkpoint(
        out,
        cfg,
        params,
        param_dtype=resolved.dtype,
        dtype=resolved.dtype,
        source=source,
        overwrite=args.overwrite,
        before_commit=before_commit,
    )
    print(f"wrote {out.absolute()}")
    return 0


def _verify(tmp: Path, cfg, state_dict, dtype: str) -> None:
    # Read back what was written, in float32, against torch on the same (dtype-rounded)
    # weights: this checks the layout transforms and the files, not the precision of `dtype`.
    with _Step("verify: running the torch and the converted Flax model"):
        model = jax_ckpt.load(tmp, dtype="float32", param_dtype="float32")
        weights = state_dict if dtype == "float32" else pipeline.round_through(state_dict, dtype)
        result = pipeline.verify(cfg, weights, model)
    print(
        f"verify: batch {result.batch} of {result.image_size}x{result.image_size} random images, "
        f"float32 logits: max abs diff {result.max_abs:.3e}, max rel diff {result.max_rel:.3e} "
        f"(tolerance {pipeline.VERIFY_RTOL:.0e}): {'ok' if result.ok else 'MISMATCH'}",
        flush=True,
    )
    if not result.ok:
        raise VerificationFailed(
            f"verification failed: max rel diff {result.max_rel:.3e} > "
            f"{pipeline.VERIFY_RTOL:.0e} between the torch and the converted Flax logits; "
            "nothing was written"
        )


# ---- flax2torch ------------------------------------------------------------------------------


def cmd_flax2torch(args) -> int:
    directory = Path(args.directory)
    suffix = ".safetensors" if args.safetensors else ".pt"
    out = Path(args.output) if args.output else Path(str(directory.absolute()) + suffix)
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a directory; give a file name with -o")
    jax_ckpt.read_metadata(directory)  # a clear error before importing JAX
    _quiet_jax_logging()
    with _Step(f"reading {directory}"):
        cfg, state_dict, meta = pipeline.flax_dir_state_dict(directory)
    print(f"config: {cfg.to_json(indent=None)}")
    stored = meta.get("param_dtype", "float32")
    print(f"parameters: {sum(v.size for v in state_dict.values()):,} ({stored}, written as is)")
    use_safetensors = True if args.safetensors else None
    with _Step(f"writing {out}"):
        save_state_dict(state_dict, out, safetensors=use_safetensors)
    print(f"wrote {out.absolute()} (loads into vit-pytorch's SepViT with strict=True)")
    return 0


# ---- inspect ---------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if path.is_dir():
        cfg, meta = jax_ckpt.read_metadata(path)
        sources = dict.fromkeys(cfg.to_dict(), "config.json")
        if args.window_size is not None:  # only for the stage table: a what-if
            cfg = cfg.replace(window_size=args.window_size)
            sources["window_size"] = "flag"
        info = {
            "path": str(path.absolute()),
            "format": "sepvit_jax",
            "config": cfg.to_dict(),
            "sources": sources,
            "num_params": meta.get("num_params"),
            "dtypes": {meta.get("param_dtype", "float32"): len(weight_table(cfg))},
            "source": meta.get("source", {}),
        }
    else:
        state_dict, stored = _read(path, args, quiet=args.json)
        resolved = pipeline.resolve_config(state_dict, flags={"window_size": args.window_size})
        cfg = resolved.config
        pipeline.check_state_dict(cfg, state_dict)
        counts: dict[str, int] = {}
        for name in stored.values():
            counts[name] = counts.get(name, 0) + 1
        info = {
            "path": str(path.absolute()),
            "format": "torch",
            "config": cfg.to_dict(),
            "sources": {k: v for k, v in resolved.sources.items() if k != "dtype"},
            "num_params": int(sum(v.size for v in state_dict.values())),
            "dtypes": counts,
        }
    info["image_size"], info["stages"] = list(args.image_size), _stages(cfg, *args.image_size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 0


def _stages(cfg, height: int, width: int) -> list[dict]:
    rows = []
    for i, (h, w) in enumerate(cfg.feature_map_sizes(height, width)):
        ws = cfg.stage_window_sizes[i]
        rows.append(
            {
                "stage": i,
                "width": cfg.stage_dims[i],
                "depth": cfg.depth[i],
                "heads": cfg.stage_heads[i],
                "dim_head": cfg.dim_head,
                "window_size": ws,
                "feature_map": [h, w],
                # None: this image size does not tile into whole windows (the model refuses it).
                "windows": (h // ws) * (w // ws) if h % ws == 0 and w % ws == 0 else None,
            }
        )
    return rows


def _print_inspect(info: dict) -> None:
    print(f"{info['path']} ({info['format']})")
    print("config:")
    for k, v in info["config"].items():
        print(f"  {k:<12} {_show(tuple(v) if isinstance(v, list) else v):<18} {info['sources'][k]}")
    h, w = info["image_size"]
    print(f"stages at a {h}x{w} input:")
    print("  stage  width  depth  heads  dim_head  window  feature map  windows")
    for s in info["stages"]:
        fmap = "{}x{}".format(*s["feature_map"])
        windows = s["windows"] if s["windows"] is not None else "does not tile"
        print(
            f"  {s['stage']:<6} {s['width']:<6} {s['depth']:<6} {s['heads']:<6} "
            f"{s['dim_head']:<9} {s['window_size']:<7} {fmap:<12} {windows}"
        )
    print(f"parameters: {info['num_params']:,}")
    print("dtypes: " + ", ".join(f"{k} ({v} tensors)" for k, v in info["dtypes"].items()))


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
    sub = parser.add_subparsers(dest="command", required=True)

    t2f = sub.add_parser(
        "torch2flax", parents=[common, reads_torch, windows], help="torch checkpoint -> Flax dir"
    )
    t2f.add_argument("checkpoint", help=".pt/.pth/.bin/.ckpt/.safetensors file")
    t2f.add_argument("-o", "--output", help="output directory (default: CKPT stem + _flax)")
    t2f.add_argument("--config", help="config.json with SepViT fields (and dtype)")
    t2f.add_argument("--dtype", choices=pipeline.DTYPES, help="parameter dtype (default float32)")
    t2f.add_argument("--verify", action="store_true", help="compare torch and Flax logits")
    t2f.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t2f.set_defaults(func=cmd_torch2flax)

    f2t = sub.add_parser("flax2torch", parents=[common], help="Flax dir -> torch state_dict")
    f2t.add_argument("directory", help="a sepvit_jax checkpoint directory")
    f2t.add_argument("-o", "--output", help="output file (default: DIR.pt)")
    f2t.add_argument("--safetensors", action="store_true", help="write safetensors")
    f2t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    f2t.set_defaults(func=cmd_flax2torch)

    ins = sub.add_parser(
        "inspect", parents=[common, reads_torch, windows], help="config, stages, parameters"
    )
    ins.add_argument("path", help="a torch checkpoint file or a sepvit_jax directory")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--image-size", type=_size, default=(DEFAULT_IMAGE_SIZE,) * 2, help="H or H,W")
    ins.set_defaults(func=cmd_inspect)
    return parser


def _size(text: str) -> tuple[int, int]:
    value = _ints(text)
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise argparse.ArgumentTypeError(f"expected H or H,W: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _cli_warnings(), _terminate_as_interrupt():
        try:
            return args.func(args)
        except VerificationFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
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
