"""Benchmark: images per second of the imagefolder training pipeline, full DeiT recipe, 224 px.

Writes ImageNet-like JPEGs (about 500x375, ~100 KB at quality 90: smooth colour fields, shapes,
blur and multi-scale grain, so decoding costs what it costs for photos) into a temporary
`train/CLASS/` tree, then reads it with `sepvit_jax.data.train_iterator` at 224 px with decode,
random-resized crop, flip, RandAugment rand-m9-mstd0.5-inc1 and random erasing 0.25, for each
number of Grain worker processes (0: in the training process, with `prefetch` threads).

    python -m benchmarks.input_pipeline [--images 512] [--workers 0,1,2] [--rounds 3] [--json FILE]

Per setting: the first batches (worker start-up, filling the prefetch buffers) are excluded,
then `--batches` batches are timed; the settings take turns for `--rounds` rounds and the
median is reported. img/s is per training process. CPU s/img is the CPU time of this process
and all its descendants (the workers) over the timed window, per image; times an accelerator's
training rate (img/s) it gives the host cores that accelerator needs. Cores used is that CPU
time per second of the window; other cores busy, the rest of the machine's (near 0 when nothing
else ran). A single-threaded breakdown by stage follows. The files sit in the page cache: this
measures CPU, not disk. Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.report import cpu_model

RECIPE = {"randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25}
# JAX sepvit_tiny training on one H200, bf16, batch 128 (benchmarks/results/h200-2026-11-27).
H200_TINY_TRAIN_IMG_S = 5528.0
_SIZES = ((500, 375), (500, 375), (375, 500), (500, 333))  # ImageNet's common shapes
_GRAIN = 16.0  # std of the grain: files average ~100 KB (ImageNet train JPEGs: ~110 KB)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random RGB image with a photo's mix of smooth areas, edges and fine texture."""
    field = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, 180)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    grain = np.zeros((height, width), np.float32)
    for scale in (1, 2, 4, 8):  # grain at several scales, like sensor noise and fine detail
        noise = rng.standard_normal((-(-height // scale), -(-width // scale)), dtype=np.float32)
        grain += noise.repeat(scale, 0).repeat(scale, 1)[:height, :width]
    pixels = np.asarray(img, np.float32) + _GRAIN * grain[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_tree(root: Path, images: int, classes: int, seed: int = 0) -> dict:
    """`root/{train,val}/classK/*.jpg`; returns the train files' count and mean size."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(images):
        d = root / "train" / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:06d}.jpg"
        photo_like(rng, *_SIZES[i % len(_SIZES)]).save(path, quality=90)
        sizes.append(path.stat().st_size)
        if i % 64 == 63 or i == images - 1:
            print(f"\rwriting JPEGs: {i + 1}/{images}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for c in range(classes):  # the pipeline checks that val has the same classes
        (root / "val" / f"class{c}").mkdir(parents=True)
        photo_like(rng, 500, 375).save(root / "val" / f"class{c}" / "0.jpg", quality=90)
    return {"images": images, "classes": classes, "mean_kb": round(np.mean(sizes) / 1e3, 1)}


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live descendant (Linux /proc)."""
    parents, times = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:  # the process ended while we looked
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(root: Path, workers: int, args: argparse.Namespace) -> dict:
    """img/s and CPU s/img of `train_iterator` with `workers` Grain workers, warm-up excluded."""
    from sepvit_jax import data

    cfg = data.DataConfig(
        name="imagefolder", data_dir=str(root), image_size=args.image_size, num_workers=workers,
        prefetch=args.prefetch, **RECIPE,
    )  # fmt: skip
    # Past the batches the buffers could hold, every batch is waited for: the timed window
    # starts and ends with empty buffers.
    warmup = args.warmup + max(1, workers) * args.prefetch
    it = data.train_iterator(cfg, global_batch_size=args.batch)
    try:
        for _ in range(warmup):
            next(it)
        load_before = os.getloadavg()[0]
        start, cpu, busy = time.perf_counter(), tree_cpu_seconds(), machine_busy_seconds()
        for i in range(args.batches):
            next(it)
            rate = (i + 1) * args.batch / (time.perf_counter() - start)
            print(
                f"\rworkers={workers}: batch {i + 1}/{args.batches}, {rate:.1f} img/s",
                end="", file=sys.stderr, flush=True,
            )  # fmt: skip
        seconds, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu
        busy = machine_busy_seconds() - busy
    finally:
        if hasattr(it, "close"):
            it.close()
    print(file=sys.stderr)
    n = args.batches * args.batch
    return {
        "workers": workers,
        "images": n,
        "seconds": round(seconds, 3),
        "img_per_s": round(n / seconds, 1),
        "cpu_s_per_img": round(cpu / n, 5),
        "warmup_batches": warmup,
        # Cores this benchmark's processes kept busy, and the cores everything else did: the
        # latter shows whether other work competed for the machine during the window.
        "cores_used": round(cpu / seconds, 2),
        "other_cores_busy": round(max(0.0, busy - cpu) / seconds, 2),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }


def stage_costs(root: Path, image_size: int, count: int = 48) -> dict:
    """Milliseconds per image of each step of the recipe, single-threaded, in this process."""
    from sepvit_jax.data.erasing import random_erasing
    from sepvit_jax.data.randaugment import RandAugment
    from sepvit_jax.data.transforms import normalize, random_resized_crop_box

    ra = RandAugment.from_string(RECIPE["randaugment"])
    files = sorted(root.glob("train/*/*.jpg"))[:count]
    rng = np.random.default_rng(0)
    totals = dict.fromkeys(("decode", "crop_resize_flip", "randaugment", "normalise", "erase"), 0.0)
    for path in files:
        t0 = time.perf_counter()
        with Image.open(path) as im:
            img = im.convert("RGB")
        t1 = time.perf_counter()
        box = random_resized_crop_box(img.width, img.height, rng)
        img = img.resize((image_size,) * 2, Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t2 = time.perf_counter()
        img = ra(img, rng)
        t3 = time.perf_counter()
        x = normalize(img)
        t4 = time.perf_counter()
        random_erasing(x, rng, RECIPE["random_erasing"])
        t5 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            totals[key] += dt
    costs = {k: round(v / len(files) * 1e3, 3) for k, v in totals.items()}
    costs["total"] = round(sum(costs.values()), 3)
    return costs


def machine() -> dict:
    packages = ("grain", "pillow", "numpy", "jax")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.input_pipeline " + " ".join(sys.argv[1:]),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "versions": {"python": platform.python_version()}
        | {p: metadata.version(p) for p in packages},
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def summarize(rows: list[dict], step_rate: float) -> list[dict]:
    """Per worker count, the median over rounds (img/s with its min and max), and the cores."""
    out = []
    for workers in dict.fromkeys(r["workers"] for r in rows):
        runs = [r for r in rows if r["workers"] == workers]
        rates = [r["img_per_s"] for r in runs]
        cpu = statistics.median(r["cpu_s_per_img"] for r in runs)
        out.append({
            "workers": workers,
            "img_per_s": statistics.median(rates),
            "img_per_s_min": min(rates),
            "img_per_s_max": max(rates),
            "cpu_s_per_img": cpu,
            "cores_used": statistics.median(r["cores_used"] for r in runs),
            "other_cores_busy_max": max(r["other_cores_busy"] for r in runs),
            "cores_per_accelerator": round(step_rate * cpu, 1),
        })  # fmt: skip
    return out


def table(summary: list[dict], stages: dict, step_rate: float) -> str:
    lines = [
        "| workers | img/s per process, median [min–max] | CPU ms/img | cores used | "
        f"other cores busy, max | cores per accelerator at {step_rate:,.0f} img/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['workers']} | {r['img_per_s']:.1f} [{r['img_per_s_min']:.1f}–"
            f"{r['img_per_s_max']:.1f}] | {r['cpu_s_per_img'] * 1e3:.2f} | {r['cores_used']:.2f} "
            f"| {r['other_cores_busy_max']:.2f} | {r['cores_per_accelerator']:.1f} |"
        )
    lines.append("")
    lines.append(
        "stages, ms/img single-threaded: " + ", ".join(f"{k} {v}" for k, v in stages.items())
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__)
    p.add_argument("--images", type=int, default=512, help="JPEGs to write (default 512)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--workers", default="0,1,2", help="Grain worker counts (default 0,1,2)")
    p.add_argument("--batch", type=int, default=32, help="batch per step (default 32)")
    p.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches beyond the buffers")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats (median reported)")
    p.add_argument("--prefetch", type=int, default=2, help="DataConfig.prefetch (default 2)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--step-rate", type=float, default=H200_TINY_TRAIN_IMG_S,
        help="accelerator img/s to size the host for (default: JAX sepvit_tiny train, H200)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="write {meta, dataset, rows, stages} here")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.images < args.batch or min(args.workers) < 0 or args.rounds < 1:
        p.error("need --images >= --batch, --workers counts >= 0 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    meta = machine()
    with tempfile.TemporaryDirectory(prefix="sepvit-input-bench-") as tmp:
        root = Path(tmp)
        dataset = write_tree(root, args.images, args.classes)
        # Rounds interleave the settings, so slow drifts of the machine hit each of them alike.
        rows = [
            measure(root, w, args) | {"round": k} for k in range(args.rounds) for w in args.workers
        ]
        stages = stage_costs(root, args.image_size)
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    summary = summarize(rows, args.step_rate)
    print(table(summary, stages, args.step_rate))
    if args.json:
        result = {"meta": meta, "settings": settings, "recipe": RECIPE, "dataset": dataset}
        result |= {"summary": summary, "rows": rows, "stages_ms_per_img": stages}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
