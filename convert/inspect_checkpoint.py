"""`convert inspect PATH`: the config of a torch checkpoint or a sepvit_jax directory (and where
each value came from), its stages at an input size, its size and dtypes. Needs no JAX."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from convert.console import Step
from sepvit_jax.core import table
from sepvit_jax.core.config import SepViTConfig, format_value
from sepvit_jax.core.format import read_metadata, read_preprocessing
from sepvit_jax.core.infer import resolve_config
from sepvit_jax.core.preprocessing import imagenet
from sepvit_jax.core.torch_io import read_state_dict_and_dtypes


def run(args) -> int:
    path = Path(args.path)
    info = _describe_directory(path, args) if path.is_dir() else _describe_file(path, args)
    config = SepViTConfig.from_dict(info["config"])
    size = args.image_size or tuple(info["preprocessing"]["image_size"])
    info["image_size"] = list(size)
    info["stages"] = _stages(config, *size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print(info)
    return 0


def _describe_directory(path: Path, args) -> dict:
    config, meta = read_metadata(path)
    sources = dict.fromkeys(config.to_dict(), "config.json")
    if args.window_size is not None:  # only for the stage table: a what-if
        config = config.replace(window_size=args.window_size)
        sources["window_size"] = "flag"
    return {
        "path": str(path.absolute()),
        "format": "sepvit_jax",
        "config": config.to_dict(),
        "sources": sources,
        "num_params": meta.get("num_params"),
        "dtypes": {meta.get("param_dtype", "float32"): len(table.weight_table(config))},
        "source": meta.get("source", {}),
        "preprocessing": read_preprocessing(path).to_dict(config),
        "class_names": meta.get("class_names"),
    }


def _describe_file(path: Path, args) -> dict:
    with Step(f"reading {path}", quiet=args.json):
        state_dict, stored = read_state_dict_and_dtypes(
            path, key=args.key, unsafe_pickle=args.unsafe_pickle
        )
    resolved = resolve_config(state_dict, flags={"window_size": args.window_size}, source=str(path))
    return {
        "path": str(path.absolute()),
        "format": "torch",
        "config": resolved.config.to_dict(),
        "sources": {k: v for k, v in resolved.sources.items() if k != "dtype"},
        "num_params": int(sum(v.size for v in state_dict.values())),
        "dtypes": dict(Counter(stored.values())),
        "layout": {"name": resolved.layout.name, "vit_pytorch": resolved.layout.versions},
        # A torch checkpoint does not say: what converting it records by default.
        "preprocessing": imagenet(resolved.config).to_dict(resolved.config),
    }


def _stages(config: SepViTConfig, height: int, width: int) -> list[dict]:
    rows = []
    for i, (h, w) in enumerate(config.feature_map_sizes(height, width)):
        ws = config.stage_window_sizes[i]
        rows.append(
            {
                "stage": i,
                "width": config.stage_dims[i],
                "depth": config.depth[i],
                "heads": config.stage_heads[i],
                "dim_head": config.dim_head,
                "window_size": ws,
                "feature_map": [h, w],
                # None: this image size does not tile into whole windows (the model refuses it).
                "windows": (h // ws) * (w // ws) if h % ws == 0 and w % ws == 0 else None,
            }
        )
    return rows


def _print(info: dict) -> None:
    print(f"{info['path']} ({info['format']})")
    print("config:")
    for k, v in info["config"].items():
        print(f"  {k:<12} {format_value(v):<18} {info['sources'][k]}")
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
    layout = info.get("layout") or info.get("source", {}).get("layout")
    if layout:
        converted = "" if info["format"] == "torch" else "converted from "
        print(f"layout: {converted}vit-pytorch {layout['vit_pytorch']} '{layout['name']}' layout")
    p = info["preprocessing"]
    h, w = p["image_size"]
    print(
        f"preprocessing ({p['origin']}): {h}x{w}, mean {format_value(p['mean'])}, std "
        f"{format_value(p['std'])}, {p['interpolation']}, crop {p['crop_fraction']}"
    )
    if info.get("class_names"):
        names = info["class_names"]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)})" if len(names) > 8 else "")
        print(f"classes: {shown}")
