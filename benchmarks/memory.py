"""Benchmark: the compiled training step's temporary memory, by XLA's own memory analysis.

    python -m benchmarks.memory [--config sepvit_tiny] [--batch 64] [--image-size 224]
                                [--json FILE]

Compiles (never runs) one AdamW training step of the config, the way train.py builds it
(`sepvit_jax.train.steps`), in four ways: with and without rematerialisation (`remat`: each
transformer block recomputed in the backward), and with the memory-lean hand-written backward
passes (`sepvit_jax.kernels.lean_backward`, what train.py uses) or plain autodiff. It reports
`temp_size_in_bytes` of `compiled.memory_analysis()` (activations kept for the backward and
scratch; arguments and outputs are the same in every variant), for this machine's backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path


def temp_memory(config_name: str, batch: int, image_size: int, remat: bool, lean: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sepvit_jax import SepViT, get_config
    from sepvit_jax.kernels import lean_backward

    config = get_config(config_name)
    model = nnx.eval_shape(lambda: SepViT.from_config(config, rngs=nnx.Rngs(0), remat=remat))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(1e-3)
    opt_state = jax.eval_shape(optimizer.init, params)
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, config.channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    backward = lean_backward if lean else contextlib.nullcontext

    def step(params, opt_state, images, labels):
        def loss_fn(params):
            with backward():
                logits = nnx.merge(graphdef, params, rest)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, images, labels)
    analysis = compiled.compile().memory_analysis()
    return {
        "remat": remat,
        "backward": "lean" if lean else "autodiff",
        "temp_mb": round(analysis.temp_size_in_bytes / 2**20, 1),
        "argument_mb": round(analysis.argument_size_in_bytes / 2**20, 1),
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sepvit_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import jax

    rows = []
    print(f"{args.config}, batch {args.batch} at {args.image_size}, {jax.devices()[0].platform}:")
    print("| remat | backward | temp memory | compile |")
    print("|---|---|---:|---:|")
    for remat in (False, True):
        for lean in (True, False):
            row = temp_memory(args.config, args.batch, args.image_size, remat, lean)
            rows.append(row)
            print(
                f"| {'yes' if remat else 'no'} | {row['backward']} | {row['temp_mb']:,} MB | "
                f"{row['compile_s']} s |",
                flush=True,
            )
    if args.json:
        result = {
            "config": args.config,
            "batch": args.batch,
            "image_size": args.image_size,
            "platform": jax.devices()[0].platform,
            "machine": platform.processor() or platform.machine(),
            "jax": jax.__version__,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
