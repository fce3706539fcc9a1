"""`convert flax2torch DIR`: a sepvit_jax checkpoint directory -> a PyTorch state_dict file.

The stored parameter tree goes through the weight table as it is (no model is built), in its
stored dtype, and is written atomically as a torch pickle or a safetensors file that loads into
vit-pytorch's `SepViT` with `strict=True`: today's layout by default, or with `--layout` one an
older vit-pytorch reads (`sepvit_jax.core.layouts`).
"""

from __future__ import annotations

from pathlib import Path

from convert.console import Step, quiet_orbax_logging, require_torch
from sepvit_jax.checkpoint import directory_state_dict
from sepvit_jax.core.format import read_metadata
from sepvit_jax.core.layouts import LAYOUTS
from sepvit_jax.core.torch_io import save_state_dict


def run(args) -> int:
    directory = Path(args.directory)
    suffix = ".safetensors" if args.safetensors else ".pt"
    out = Path(args.output) if args.output else Path(str(directory.absolute()) + suffix)
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a directory; give a file name with -o")
    read_metadata(directory)  # a clear error before reading any array
    if not args.safetensors and out.suffix.lower() != ".safetensors":
        require_torch("writing a PyTorch .pt file", "or --safetensors, which needs no torch")
    quiet_orbax_logging()
    layout = LAYOUTS[args.layout]
    with Step(f"reading {directory}"):
        config, state_dict, meta = directory_state_dict(directory, layout)
    print(f"config: {config.to_json(indent=None)}")
    stored = meta.get("param_dtype", "float32")
    print(f"parameters: {sum(v.size for v in state_dict.values()):,} ({stored}, written as is)")
    with Step(f"writing {out}"):
        save_state_dict(state_dict, out, safetensors=True if args.safetensors else None)
    print(f"wrote {out.absolute()} ({layout.label}: loads into that SepViT with strict=True)")
    return 0
