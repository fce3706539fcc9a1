"""`convert torch2flax CKPT`: a PyTorch SepViT checkpoint -> a sepvit_jax checkpoint directory.

Reads the state_dict (any wrapper, prefix, dtype; safe pickles only), resolves the config (the
weights, then --config, then flags), writes the directory atomically and, with --verify, runs the
torch reference and the converted model on one batch before the directory is committed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from convert.console import Step, print_config, quiet_orbax_logging, require_torch
from sepvit_jax import checkpoint
from sepvit_jax.core import table
from sepvit_jax.core.format import check_target
from sepvit_jax.core.infer import read_config_file, resolve_config
from sepvit_jax.core.layouts import CURRENT, Layout
from sepvit_jax.core.preprocessing import Preprocessing, imagenet, nearest_tiled_sizes
from sepvit_jax.core.torch_io import read_state_dict_and_dtypes


class VerificationFailed(Exception):
    """--verify found logits further apart than the tolerance (exit status 1)."""


def run(args) -> int:
    """Exit status 0 written, 1 --verify failed (nothing written); raises on bad input."""
    try:
        return _convert(args)
    except VerificationFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _convert(args) -> int:
    ckpt = Path(args.checkpoint)
    out = Path(args.output) if args.output else ckpt.with_name(ckpt.stem + "_flax")
    config_file = read_config_file(args.config) if args.config else {}
    if args.verify:
        require_torch("--verify (it runs the PyTorch reference model)")
    check_target(out.absolute(), args.overwrite)  # fail before the slow part
    with Step(f"reading {ckpt}"):
        state_dict, stored = read_state_dict_and_dtypes(
            ckpt, key=args.key, unsafe_pickle=args.unsafe_pickle
        )
    resolved = resolve_config(
        state_dict,
        flags={"window_size": args.window_size, "dtype": args.dtype},
        config=config_file,
        config_origin=f"--config {args.config}",
        source=str(ckpt),
    )
    config, layout = resolved.config, resolved.layout
    preprocessing = _preprocessing(config, args.image_size)
    print_config(resolved)
    print(f"parameters: {sum(v.size for v in state_dict.values()):,}")
    print(f"stored dtypes: {', '.join(sorted(set(stored.values())))}")
    print(_layout_note(layout, config, state_dict))
    rows = layout.table(config)
    params = table.to_flax(config, state_dict, np.dtype(jnp.dtype(resolved.dtype)), rows=rows)
    source = {
        "converted_from": str(ckpt.absolute()),
        "key": args.key,
        "stored_dtypes": sorted(set(stored.values())),
        "layout": {"name": layout.name, "vit_pytorch": layout.versions},
    }

    def before_commit(tmp: Path) -> None:
        # Runs on the complete temporary directory: a failure leaves nothing behind.
        print(f"wrote the parameters ({resolved.dtype}) in {time.perf_counter() - start:.1f} s")
        if args.verify:
            # The torch reference reads today's layout: the same weights, renamed (and, for
            # the grouped layout, expanded) by the table.
            reference = table.to_torch(config, table.to_flax(config, state_dict, rows=rows))
            _verify(tmp, reference, resolved.dtype, preprocessing.image_size)

    quiet_orbax_logging()
    print(f"writing {out} ...", flush=True)
    start = time.perf_counter()
    checkpoint.write_checkpoint(
        out,
        config,
        params,
        param_dtype=resolved.dtype,
        source=source,
        preprocessing=preprocessing,
        overwrite=args.overwrite,
        before_commit=before_commit,
    )
    print(f"wrote {out.absolute()}")
    return 0


def _preprocessing(config, image_size: int | None) -> Preprocessing:
    """What the directory records about the input: ImageNet's defaults (a torch checkpoint does
    not say), at --image-size or the model's default size."""
    if image_size is not None:
        try:
            config.check_image_size(image_size, image_size)
        except ValueError as err:
            sizes = " or ".join(map(str, nearest_tiled_sizes(config, image_size)))
            raise ValueError(f"--image-size {image_size}: {err}; try {sizes}") from None
    return imagenet(config, image_size, origin="given" if image_size else "default")


def _layout_note(layout: Layout, config, state_dict) -> str:
    if layout is CURRENT:
        return f"layout: {layout.label}"
    done = ["PreNorm wrapper names mapped to today's"]
    if layout.grouped:
        done.append("grouped window-token projection expanded to block-diagonal")
        unused = [k for k in layout.optional(config) if k in state_dict]
        if unused:
            done.append(f"unused to_patches dropped ({len(unused)} tensors)")
    return f"layout: {layout.label}: {'; '.join(done)}"


def _verify(tmp: Path, state_dict, dtype: str, image_size: tuple[int, int]) -> None:
    # Read back what was written, in float32, against torch on the same (dtype-rounded)
    # weights: this checks the layout transforms and the files, not the precision of `dtype`.
    from convert.verify import VERIFY_RTOL, round_through, verify  # needs torch; only here

    with Step("verify: running the torch and the converted Flax model"):
        model = checkpoint.load(tmp, dtype="float32", param_dtype="float32")
        weights = state_dict if dtype == "float32" else round_through(state_dict, dtype)
        result = verify(model.config, weights, model, image_size=image_size)
    print(
        f"verify: batch {result.batch} of {result.image_size[0]}x{result.image_size[1]} random "
        "images, "
        f"float32 logits: max abs diff {result.max_abs:.3e}, max rel diff {result.max_rel:.3e} "
        f"(tolerance {VERIFY_RTOL:.0e}): {'ok' if result.ok else 'MISMATCH'}",
        flush=True,
    )
    if not result.ok:
        raise VerificationFailed(
            f"verification failed: max rel diff {result.max_rel:.3e} > {VERIFY_RTOL:.0e} "
            "between the torch and the converted Flax logits; nothing was written"
        )
