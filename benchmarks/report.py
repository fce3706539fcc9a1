"""The benchmark's output: machine and version facts, jax/torch ratios, the markdown table.

Rows are the dicts that `benchmarks.throughput` prints (one per config, mode and framework); a
row that failed carries `error` and no figures. Nothing here imports JAX or PyTorch: versions are
read from the installed package metadata, so the parent process stays light.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata

FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "numpy")
# Environment variables that change what the frameworks do on the same hardware.
TUNING_ENV = ("XLA_FLAGS", "GLIBC_TUNABLES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine_info() -> dict:
    """Where and with what the benchmark ran, for the results file's header."""
    mem_gb = None
    with contextlib.suppress(ValueError, OSError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:]),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gb": mem_gb,
        "gpus": gpu_names(),
        "versions": versions(),
        "env": {k: os.environ[k] for k in TUNING_ENV if k in os.environ},
        "load_avg_start": round(os.getloadavg()[0], 2),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """jax img/s over torch eager and over torch.compile img/s, per (config, mode)."""
    speed = {
        (r["config"], r["mode"], r["framework"]): r["img_per_s"] for r in rows if r.get("img_per_s")
    }
    out = []
    for config, mode in dict.fromkeys((r["config"], r["mode"]) for r in rows):
        jax_speed = speed.get((config, mode, "jax"))
        entry = {"config": config, "mode": mode}
        for other in ("torch_eager", "torch_compile"):
            theirs = speed.get((config, mode, other))
            entry[f"jax_over_{other}"] = jax_speed / theirs if jax_speed and theirs else None
        out.append(entry)
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def markdown(meta: dict, rows: list[dict], ratio_rows: list[dict], conversion: dict | None) -> str:
    """The results as markdown: a header of facts, the throughput table, the conversion row."""
    v = meta["versions"]
    device = ", ".join(meta["gpus"]) if meta["gpus"] and meta["device"] == "gpu" else meta["cpu"]
    lines = [
        f"Machine: {device}; {meta['cpus_usable']} of {meta['cpu_count']} CPUs usable, "
        f"{meta['memory_gb']} GiB; {meta['platform']}.",
        f"Versions: python {v['python']}, jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, "
        f"optax {v['optax']}, torch {v['torch']}, numpy {v['numpy']}.",
        f"Run: {meta['date']}, `{meta['command']}`; dtype {meta['dtype']}, {meta['threads']} "
        f"threads on both sides, median of {meta['repeats']} timed runs [min–max]"
        + (f" ({meta['rounds']} interleaved rounds)" if meta.get("rounds", 1) > 1 else "")
        + "; load average "
        f"{meta['load_avg_start']} at the start, {meta.get('load_avg_end', '?')} at the end.",
        "compile s: the first call, timed apart (tracing and compilation for jax.jit and "
        "torch.compile, one plain step for eager); peak MB: the process's peak resident memory; "
        "load: the 1-minute load average when the row finished (the benchmark's own threads "
        "count; well above the thread count, other processes competed for the cores).",
    ]
    if meta.get("complete") is False:
        lines.append(
            f"**Incomplete:** {meta['measured']} of {meta['planned']} measurements so far."
        )
    if meta["env"]:
        lines.append("Environment: " + ", ".join(f"`{k}={v}`" for k, v in meta["env"].items()))
    # On an accelerator: achieved TFLOP/s and MFU and the device's peak memory.
    device_cols = any("peak_device_mem_mb" in r or "mfu" in r for r in rows)
    if device_cols:
        lines.append(
            "TFLOP/s and MFU: the FLOPs of one JAX step by XLA's cost analysis of the lowered "
            "program (every operation, elementwise ones and the backward's recomputations "
            "included; the torch rows compute the same function and get the same count) over "
            "the measured step time, and over the chip's dense bf16 peak; device peak MB: the "
            "framework's own peak of allocated device memory."
        )
    extra = " TFLOP/s | MFU | device peak MB |" if device_cols else ""
    lines += [
        "",
        "| config | mode | framework | batch | img/s median [min–max] | compile s | peak MB "
        "| jax / torch eager | jax / torch.compile | load |" + extra,
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" * 3 if device_cols else ""),
    ]
    by_key = {(r["config"], r["mode"]): r for r in ratio_rows}
    for r in rows:
        if r.get("error"):
            speed, compile_s, peak = f"failed: {r['error'][:80]}", "—", "—"
        else:
            speed = f"{r['img_per_s']:.1f} [{r['img_per_s_min']:.1f}–{r['img_per_s_max']:.1f}]"
            compile_s, peak = _fmt(r["compile_s"]), _fmt(r["peak_mem_mb"], 0)
        eager = compiled = ""
        if r["framework"] == "jax":
            entry = by_key[(r["config"], r["mode"])]
            eager = _ratio(entry["jax_over_torch_eager"])
            compiled = _ratio(entry["jax_over_torch_compile"])
        cells = f"| {r['config']} | {r['mode']} | {r['framework']} | {r['batch']} | {speed} "
        cells += f"| {compile_s} | {peak} | {eager} | {compiled} | {_fmt(r.get('load_avg'))} |"
        if device_cols:
            mfu = r.get("mfu")
            cells += f" {_fmt(r.get('tflop_per_s'))} | {'—' if mfu is None else f'{mfu:.1%}'} "
            cells += f"| {_fmt(r.get('peak_device_mem_mb'), 0)} |"
        lines.append(cells)
    if conversion:
        lines += ["", "| conversion | file MB | seconds | peak RSS MB | peak / file |"]
        lines.append("|---|---:|---:|---:|---:|")
        if conversion.get("error"):
            lines.append(
                f"| {conversion['variant']} | failed: {conversion['error'][:80]} | — | — | — |"
            )
        else:
            lines.append(
                f"| {conversion['variant']} torch2flax ({len(conversion.get('runs', [1]))} runs, "
                f"median s, worst peak) | {conversion['file_mb']} "
                f"| {conversion['seconds']} | {conversion['peak_rss_mb']} "
                f"| {conversion['ratio']} |"
            )
    return "\n".join(lines) + "\n"
