"""FLOPs per image of the programs `python -m benchmarks` times, by XLA's cost analysis.

The count comes from the lowered (not yet compiled) program, where no library call hides any
work, so it needs no accelerator: the figures behind the MFU of a GPU or TPU run can be checked
on a laptop (the lowering barely depends on the platform). `train` is one AdamW step (forward,
backward, update), `forward` the model in eval mode, both exactly the programs
`python -m benchmarks` times.

    python -m benchmarks.flops                              # digits and sepvit_tiny, bfloat16
    python -m benchmarks.flops --configs sepvit_base --batch 64 --dtype float32
"""

from __future__ import annotations

import argparse

from benchmarks.throughput import default_batch, jax_step, step_flops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.flops", description=__doc__.split("\n")[0]
    )
    p.add_argument("--configs", default="digits,sepvit_tiny", help="comma-separated names")
    p.add_argument("--batch", type=int, help="default: the GPU benchmark's batch per config")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    print("| config | batch | forward GFLOP/img | train step GFLOP/img |")
    print("|---|---:|---:|---:|")
    for config in filter(None, args.configs.split(",")):
        batch = args.batch or default_batch("gpu", config)
        per_image = {}
        for mode in ("forward", "train"):
            spec = dict(config=config, mode=mode, dtype=args.dtype, batch=batch)
            jitted, step_args, _ = jax_step(spec)
            flops = step_flops(jitted.lower(*step_args))
            per_image[mode] = "—" if flops is None else f"{flops / batch / 1e9:.3f}"
        print(f"| {config} | {batch} | {per_image['forward']} | {per_image['train']} |")


if __name__ == "__main__":
    main()
