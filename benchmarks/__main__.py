"""`python -m benchmarks`: SepViT throughput, JAX against PyTorch side by side.

For each config (`digits`, 56x56; `sepvit_tiny`, 224x224) and mode (inference `forward`, AdamW
`train` step) it measures images per second of `sepvit_jax` under `jax.jit`, `sepvit_torch`
eager and `sepvit_torch` under `torch.compile`, with the same batch, dtype and thread count. Each
measurement runs in its own process (`benchmarks.throughput`): compilation and warm-up are timed
apart from the throughput, which is the median of at least 5 timed runs (min and max kept). Then
the conversion of a `sepvit_base`-sized checkpoint (`benchmarks.conversion`) is timed.

    python -m benchmarks                        # full run (2-core CPU: about 7 minutes,
                                                # most of it torch.compile compiling)
    python -m benchmarks --quick                # digits only, no torch.compile: under a minute
    python -m benchmarks --rounds 3 --json out.json --markdown out.md   # the committed results
    python -m benchmarks --configs sepvit_tiny --modes train --frameworks jax,torch_eager

Prints a markdown table on stdout and progress on stderr; `--json` writes
{meta, rows, ratios, conversion}, one row per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report, throughput

ROOT = Path(__file__).resolve().parent.parent
MIN_REPEATS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--quick", action="store_true", help="digits only, jax and torch eager")
    p.add_argument("--configs", help="comma-separated names (default: digits,sepvit_tiny)")
    p.add_argument("--modes", help="comma-separated: forward,train (default: both)")
    p.add_argument("--frameworks", help=f"comma-separated among {','.join(report.FRAMEWORKS)}")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="default: cpu float32, gpu bf16"
    )
    p.add_argument("--batch", type=int, help="one batch for every config (default: per config)")
    p.add_argument("--threads", type=int, help="CPU threads for both sides (default: all usable)")
    p.add_argument(
        "--repeats", type=int, default=MIN_REPEATS, help=f"timed runs (>= {MIN_REPEATS})"
    )
    p.add_argument("--iters", type=int, help="steps per timed run (default: fill --min-repeat-s)")
    p.add_argument(
        "--min-repeat-s", type=float, help="seconds per timed run (default 1, quick 0.2)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan this many times, interleaved, and pool the timed runs: on a "
        "shared machine both frameworks then sample the same periods of load",
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per measurement")
    p.add_argument("--json", type=Path, help="write the rows, ratios and facts as JSON here")
    p.add_argument("--markdown", type=Path, help="write the markdown table here as well")
    p.add_argument("--no-conversion", action="store_true", help="skip the conversion benchmark")
    p.add_argument("--conversion-variant", default="sepvit_base")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.repeats < MIN_REPEATS:
        p.error(f"--repeats must be at least {MIN_REPEATS} (the figure is their median)")
    split = lambda s: [x for x in s.split(",") if x] if s else None  # noqa: E731
    args.configs = split(args.configs) or (["digits"] if args.quick else ["digits", "sepvit_tiny"])
    args.modes = split(args.modes) or ["forward", "train"]
    default_fw = ["jax", "torch_eager"] if args.quick else list(report.FRAMEWORKS)
    args.frameworks = split(args.frameworks) or default_fw
    for fw in args.frameworks:
        if fw not in report.FRAMEWORKS:
            p.error(f"unknown framework {fw!r}; choose among {', '.join(report.FRAMEWORKS)}")
    for mode in args.modes:
        if mode not in ("forward", "train"):
            p.error(f"unknown mode {mode!r}; choose forward and/or train")
    if args.device == "auto":
        args.device = "gpu" if report.gpu_names() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.min_repeat_s = args.min_repeat_s or (0.2 if args.quick else 1.0)
    if args.quick:
        args.no_conversion = True
        args.timeout = min(args.timeout, 300)
    return args


def batch_for(args: argparse.Namespace, config: str) -> int:
    return args.batch or throughput.default_batch(args.device, config)


def measure(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh process; a failure becomes a row with `error`."""
    cmd = [sys.executable, "-m", "benchmarks.throughput", json.dumps(spec)]
    with tempfile.TemporaryDirectory() as cache:
        # torch.compile keeps compiled kernels on disk across processes; an empty cache makes
        # its compile time a cold one, like jax.jit's (no persistent cache by default).
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {**spec, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return {**spec, "error": f"exit status {proc.returncode}: {tail[0].strip()}"}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def describe(row: dict) -> str:
    if row.get("error"):
        return f"FAILED ({row['error']})"
    return (
        f"{row['img_per_s']:.1f} img/s [{row['img_per_s_min']:.1f}-{row['img_per_s_max']:.1f}], "
        f"first call {row['compile_s']:.1f} s, peak {row['peak_mem_mb']:.0f} MB"
    )


def run_all(args: argparse.Namespace, on_row=lambda rows, done: None) -> list[dict]:
    """Every measurement of the plan, `args.rounds` times; `on_row(rows so far, number of
    measurements done)` after each."""
    plan = [
        (config, mode, fw)
        for config in args.configs
        for mode in args.modes
        for fw in args.frameworks
    ]
    results: dict[tuple, list[dict]] = {key: [] for key in plan}
    total = len(plan) * args.rounds
    for r in range(args.rounds):
        for i, (config, mode, fw) in enumerate(plan, 1):
            spec = dict(
                config=config,
                mode=mode,
                framework=fw,
                device=args.device,
                dtype=args.dtype,
                batch=batch_for(args, config),
                threads=args.threads,
                repeats=args.repeats,
                iters=args.iters,
                warmup=args.warmup,
                min_repeat_s=args.min_repeat_s,
            )
            step = r * len(plan) + i
            progress(f"[{step}/{total}] {config} {mode} {fw} (batch {spec['batch']}) ...")
            start = time.perf_counter()
            row = measure(spec, args.timeout)
            progress(f"    {describe(row)}  ({time.perf_counter() - start:.0f} s)")
            results[(config, mode, fw)].append(row)
            on_row([pool(rounds) for rounds in results.values() if rounds], step)
    return [pool(rounds) for rounds in results.values()]


def pool(rounds: list[dict]) -> dict:
    """One row from the same measurement's rounds: the median over every timed run."""
    good = [r for r in rounds if not r.get("error")]
    if not good:
        return rounds[0]
    row = dict(good[0])
    rates = [x for r in good for x in r["rates"]]
    row.update(
        rates=rates,
        img_per_s=statistics.median(rates),
        img_per_s_min=min(rates),
        img_per_s_max=max(rates),
        compile_s=statistics.median(r["compile_s"] for r in good),
        peak_mem_mb=max(r["peak_mem_mb"] for r in good),
        load_avg=max(r["load_avg"] for r in good),
        rounds=len(good),
        repeats=len(rates),
    )
    for key in ("tflop_per_s", "mfu"):  # scale with the pooled speed
        if key in row:
            row[key] *= row["img_per_s"] / good[0]["img_per_s"]
    if "peak_device_mem_mb" in row:
        row["peak_device_mem_mb"] = max(r["peak_device_mem_mb"] for r in good)
    if len(good) < len(rounds):
        row["failed_rounds"] = [r["error"] for r in rounds if r.get("error")]
    return row


def share_model_flops(rows: list[dict]) -> None:
    """Give the torch rows the JAX step's FLOPs per image, so their TFLOP/s and MFU compare.

    All three run the same model function, so XLA's count for the JAX executable is the work
    per image of each; torch has no count of its own.
    """
    jax_rows = {
        (r["config"], r["mode"]): r
        for r in rows
        if r["framework"] == "jax" and r.get("tflop_per_s")
    }
    for row in rows:
        ref = jax_rows.get((row["config"], row["mode"]))
        if row["framework"] == "jax" or ref is None or not row.get("img_per_s"):
            continue
        scale = row["img_per_s"] / ref["img_per_s"]
        row["tflop_per_s"] = ref["tflop_per_s"] * scale
        if "mfu" in ref:
            row["mfu"] = ref["mfu"] * scale


def run_conversion(variant: str, repeat: int = 3) -> dict:
    """Time `convert torch2flax` on a random `variant` checkpoint: median seconds, worst peak."""
    from benchmarks.conversion import bench_conversion

    progress(f"[conversion] {variant} torch2flax ...")
    try:
        runs = bench_conversion(variant, repeat=repeat)  # in a temporary directory of its own
        result = {
            "variant": variant,
            "file_mb": runs[0]["file_mb"],
            "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "runs": runs,
        }
        result["ratio"] = round(result["peak_rss_mb"] / result["file_mb"], 2)
        progress(
            f"    {result['seconds']} s (median of {len(runs)}), peak {result['peak_rss_mb']} MB"
        )
    except Exception as err:  # record the failure next to the throughput figures
        result = {"variant": variant, "error": f"{type(err).__name__}: {err}"}
        progress(f"    FAILED ({result['error']})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = report.machine_info()
    meta.update(
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        repeats=args.repeats * args.rounds,
        rounds=args.rounds,
        quick=args.quick,
    )
    total = len(args.configs) * len(args.modes) * len(args.frameworks) * args.rounds

    def write(rows: list[dict], conversion: dict | None, done: int, complete: bool) -> str:
        """The table (and --json/--markdown files, replaced atomically) for `rows` so far.

        Written after every measurement, so that a run cut short (a time limit on a lent GPU,
        say) keeps what it measured, marked incomplete.
        """
        rows = [dict(r) for r in rows]
        share_model_flops(rows)
        ratio_rows = report.ratios(rows)
        by_key = {(r["config"], r["mode"]): r for r in ratio_rows}
        for row in rows:  # each jax row also carries its ratios
            if row["framework"] == "jax":
                entry = by_key[(row["config"], row["mode"])]
                row.update({k: v for k, v in entry.items() if k.startswith("jax_over")})
        status = dict(meta, complete=complete, measured=done, planned=total)
        status["load_avg_end"] = round(os.getloadavg()[0], 2)
        table = report.markdown(status, rows, ratio_rows, conversion)
        payload = dict(meta=status, rows=rows, ratios=ratio_rows, conversion=conversion)
        for path, text in ((args.markdown, table), (args.json, json.dumps(payload, indent=2))):
            if path:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text if text.endswith("\n") else text + "\n")
                os.replace(tmp, path)
        return table

    rows = run_all(args, on_row=lambda so_far, done: write(so_far, None, done, complete=False))
    conversion = None if args.no_conversion else run_conversion(args.conversion_variant)
    print(write(rows, conversion, total, complete=True), end="")
    return 1 if any(r.get("error") and r["framework"] != "torch_compile" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
