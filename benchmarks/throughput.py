"""One throughput measurement, run in its own process: `python -m benchmarks.throughput SPEC`.

SPEC is a JSON object {config, mode, framework, device, dtype, batch, threads, repeats, iters,
warmup, min_repeat_s, backward ("lean", the default, or "autodiff")}; `iters` may be null: then
each timed run takes as many steps as fill
`min_repeat_s` seconds, judged from the warm-up steps. The result is one JSON line on stdout
(prefixed `RESULT `) with images per second (the median of `repeats` timed runs of `iters` steps,
plus their min and max), the first-call time `compile_s` (tracing and compilation included for
jax.jit and torch.compile; the first eager step for torch eager) and the peak memory of the
process. Running each (config, mode, framework) in a fresh process keeps the peak memory its own,
pins the thread count before any library starts its pools, and keeps the frameworks from
competing for the cores.

Both sides see the same random batch (resident in memory, no data loading), the same model
function and AdamW hyper-parameters; images are NHWC for JAX and NCHW for torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

# Both frameworks: torch.optim.AdamW's defaults, written out so optax gets the same numbers.
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

# Dense bf16 peak FLOP/s by accelerator kind, for MFU; unknown kinds (and CPUs) get no MFU.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}

IMAGE_SIZES = {"digits": 56, "testing": 56}  # every other named config: 224
# Batch per config: CPU batches keep a full run in minutes; GPU batches fill the device.
DEFAULT_BATCH = {
    "cpu": {"digits": 64, "testing": 64, "default": 8},
    "gpu": {"digits": 512, "testing": 512, "default": 128},
}


def image_size(config: str) -> int:
    return IMAGE_SIZES.get(config, 224)


def default_batch(device: str, config: str) -> int:
    table = DEFAULT_BATCH[device]
    return table.get(config, table["default"])


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind, matching the longest known prefix."""
    for kind in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if device_kind.startswith(kind):
            return PEAK_BF16_FLOPS[kind]
    return None


def random_batch(cfg, batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (B, H, W, C) float32 and int labels, the same for both frameworks."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, size, size, cfg.channels), dtype=np.float32)
    labels = rng.integers(0, cfg.num_classes, batch).astype(np.int32)
    return images, labels


def time_steps(
    step: Callable[[], object], sync: Callable[[object], None], spec: dict, setup_s: float = 0.0
) -> dict:
    """First call (compile / warm-up) time, then `repeats` timed runs of `iters` steps each.

    `setup_s` (ahead-of-time compilation) is added to the first call's time.
    """
    t0 = time.perf_counter()
    sync(step())
    first_call = setup_s + time.perf_counter() - t0
    warm = []
    for _ in range(max(1, spec.get("warmup", 1))):
        t0 = time.perf_counter()
        sync(step())
        warm.append(time.perf_counter() - t0)
    iters = spec.get("iters") or max(1, math.ceil(spec["min_repeat_s"] / statistics.median(warm)))
    rates = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = step()  # no host sync inside the loop: async dispatch may run ahead
        sync(out)
        rates.append(spec["batch"] * iters / (time.perf_counter() - t0))
    return dict(
        img_per_s=statistics.median(rates),
        img_per_s_min=min(rates),
        img_per_s_max=max(rates),
        compile_s=first_call,
        iters=iters,
        rates=rates,
    )


# ---- JAX -----------------------------------------------------------------------------------


def jax_step(spec: dict):
    """(jitted step, its argument list, device) for `spec`'s config, mode, dtype and batch.

    forward: the model in eval mode. train: loss, gradients and the AdamW update in one program,
    with parameters and optimizer state donated (updated in place); the step returns
    (params, opt_state, loss).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sepvit_jax import SepViT, get_config
    from sepvit_jax.kernels import lean_backward

    cfg = get_config(spec["config"])
    dtype = jnp.dtype(spec["dtype"])
    device = jax.devices()[0]
    model = SepViT.from_config(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    images, labels = random_batch(cfg, spec["batch"], image_size(spec["config"]))
    images, labels = jax.device_put(images, device), jax.device_put(labels, device)

    if spec["mode"] == "forward":
        model.eval()
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, images):
            return nnx.merge(graphdef, state)(images)

        args = [state, images]
        jitted = forward

    else:
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(
            ADAMW["lr"], ADAMW["b1"], ADAMW["b2"], ADAMW["eps"], weight_decay=ADAMW["weight_decay"]
        )
        opt_state = tx.init(params)

        # The state is donated: XLA updates parameters and moments in place.
        # As train.py's step: the memory-lean backward passes (sepvit_jax.kernels), unless the
        # spec asks for plain autodiff ({"backward": "autodiff"}, to measure what they buy).
        backward = (
            lean_backward if spec.get("backward", "lean") == "lean" else contextlib.nullcontext
        )

        @jax.jit(donate_argnums=(0, 1))
        def train_step(params, opt_state, rest, images, labels):
            def loss_fn(params):
                with backward():
                    logits = nnx.merge(graphdef, params, rest)(images)
                ce = optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), labels
                )
                return ce.mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        args = [params, opt_state, rest, images, labels]
        jitted = train_step
    return jitted, args, device


def bench_jax(spec: dict) -> dict:
    import jax

    jitted, args, device = jax_step(spec)
    # Compile ahead of time, once: the executable that is timed.
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    setup_s = time.perf_counter() - t0

    if spec["mode"] == "forward":

        def step():
            return compiled(*args)

    else:

        def step():
            args[0], args[1], loss = compiled(*args)
            return loss

    result = time_steps(step, jax.block_until_ready, spec, setup_s)
    result.update(device_kind=device.device_kind, platform=device.platform)
    flops = step_flops(lowered)
    if flops:
        step_s = spec["batch"] / result["img_per_s"]
        result["gflop_per_img"] = flops / spec["batch"] / 1e9
        result["tflop_per_s"] = flops / step_s / 1e12
        peak = peak_flops(device.device_kind) if device.platform != "cpu" else None
        if peak and spec["dtype"] == "bfloat16":
            result["mfu"] = flops / step_s / peak
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_device_mem_mb"] = stats["peak_bytes_in_use"] / 2**20
    return result


def step_flops(lowered) -> float | None:
    """FLOPs of one step by XLA's cost analysis of the program as lowered (None if absent).

    The lowered, not the compiled, program: after compilation for a GPU the matrix products are
    library calls (cuBLAS, cuDNN) that the cost analysis counts as zero FLOPs (seen on an H200:
    a twentieth of the true count for sepvit_tiny's training step). Before compilation no
    library call hides any work, and the count barely depends on the platform.
    """
    try:
        cost = lowered.cost_analysis()
    except Exception:  # cost analysis is best-effort; some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ---- PyTorch -------------------------------------------------------------------------------


def bench_torch(spec: dict, compile: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from sepvit_torch import SepViT, get_config

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = get_config(spec["config"])
    device = torch.device("cuda" if spec["device"] == "gpu" else "cpu")
    model = SepViT.from_config(cfg).to(device)
    images, labels = random_batch(cfg, spec["batch"], image_size(spec["config"]))
    images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    labels = torch.from_numpy(labels).long().to(device)
    net = torch.compile(model) if compile else model
    # bfloat16 the way torch users run it: autocast, float32 master weights (as in sepvit_jax).
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16"
    )

    if spec["mode"] == "forward":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                return net(images)

    else:
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=ADAMW["lr"],
            betas=(ADAMW["b1"], ADAMW["b2"]),
            eps=ADAMW["eps"],
            weight_decay=ADAMW["weight_decay"],
        )

        def step():
            with autocast:
                loss = F.cross_entropy(net(images).float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    def sync(out):
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = time_steps(step, sync, spec)
    result["platform"] = device.type
    if device.type == "cuda":
        result["device_kind"] = torch.cuda.get_device_name()
        result["peak_device_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ---- process entry -------------------------------------------------------------------------


def run(spec: dict) -> dict:
    if spec["framework"] == "jax":
        result = bench_jax(spec)
    elif spec["framework"] in ("torch_eager", "torch_compile"):
        result = bench_torch(spec, compile=spec["framework"] == "torch_compile")
    else:
        raise ValueError(f"unknown framework {spec['framework']!r}")
    # Linux reports ru_maxrss in KiB: the peak resident memory of this whole process.
    result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Other processes on the machine skew CPU timings: keep the load average next to the figure.
    result["load_avg"] = round(os.getloadavg()[0], 2)
    return {**spec, **result}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m benchmarks.throughput '<json spec>'")
    spec = json.loads(argv[0])
    # Pin the cores before any thread pool exists, so XLA and torch use the same `threads`.
    cpus = sorted(os.sched_getaffinity(0))
    if spec["threads"] < len(cpus):
        os.sched_setaffinity(0, cpus[: spec["threads"]])
    print("RESULT " + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
