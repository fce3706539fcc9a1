"""Reading .safetensors files, their header checked against the file before the library reads it.

The format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data,
each tensor at [begin, end) from the end of the header. `check_safetensors` makes sure that a
crafted header can make no reader allocate or read beyond the file: N fits the file and
MAX_HEADER, and every tensor's byte range lies inside the data and matches its shape and dtype.
A header that fails raises ValueError (the caller words it as a damaged file).

`load_safetensors` then reads every tensor with the safetensors library (memory-mapped): as torch
tensors when torch is installed (bfloat16 read as torch reads it), as numpy arrays otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sepvit_jax.core.errors import CheckpointError

# A header costs about 100-150 bytes per tensor: 16 MiB is over 100,000 tensors, far more than any
# model's (sepvit_base has 330), and parses in a fraction of a second.
MAX_HEADER = 16 << 20
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16}
_BITS.update(U16=16, F16=16, BF16=16, I32=32, U32=32, F32=32, I64=64, U64=64, F64=64, C64=64)
_BITS.update(F4=4, F6_E2M3=6, F6_E3M2=6)
_MAX_DIMS = 64


def load_safetensors(path: Path) -> dict[str, Any]:
    """{name: tensor} of a checked .safetensors file (ValueError and the library's own errors
    for a damaged one)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            "reading .safetensors files needs safetensors: pip install 'sepvit-jax[torch]'"
        ) from None
    try:
        import torch  # noqa: F401  (the "pt" framework reads bfloat16 as torch does)

        framework = "pt"
    except ImportError:
        framework = "numpy"
    check_safetensors(path)
    with safe_open(str(path), framework=framework) as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)


def check_safetensors(path: Path) -> None:
    """Raise ValueError unless `path`'s header fits the file and every tensor lies inside it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(
                f"its header length {length:,} runs past the end of the file ({size:,} bytes) "
                f"or the {MAX_HEADER:,}-byte limit"
            )
        header = f.read(length)
    try:
        entries = json.loads(header)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"its header is not JSON ({type(err).__name__})") from None
    if not isinstance(entries, dict):
        raise ValueError("its header is not a JSON object")
    data = size - 8 - length
    for name, entry in entries.items():
        if name != "__metadata__":
            _check_entry(name, entry, data)


def _check_entry(name: str, entry: Any, data: int) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"header entry {name[:80]!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_count(d) for d in shape)):
        raise ValueError(f"tensor {name[:80]!r} has no valid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
        raise ValueError(f"tensor {name[:80]!r} has no valid data_offsets")
    begin, end = offsets
    if not begin <= end <= data:
        raise ValueError(
            f"tensor {name[:80]!r} declares bytes {begin:,}..{end:,} but the file holds "
            f"{data:,} bytes of data"
        )
    bits = _BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is not None and (math.prod(shape) * bits + 7) // 8 != end - begin:
        raise ValueError(
            f"tensor {name[:80]!r} of shape {shape} and dtype {dtype} needs "
            f"{(math.prod(shape) * bits + 7) // 8:,} bytes but declares {end - begin:,}"
        )


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


# ---- writing (no library needed: the format is a JSON header and raw bytes) ----------------

_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def write_safetensors(arrays: dict[str, Any], file) -> None:
    """Write `{name: C-contiguous little-endian numpy array}` to the open binary `file`.

    Needs neither torch nor the safetensors library, so a torch-free install can write files
    torch and the safetensors library read (`safetensors.torch.load_file`).
    """
    header, offset = {}, 0
    for name, array in arrays.items():
        code = _CODES.get(array.dtype.name)
        if code is None:
            raise CheckpointError(f"cannot write {name!r} as safetensors: dtype {array.dtype}")
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    file.write(len(text).to_bytes(8, "little"))
    file.write(text)
    for array in arrays.values():
        file.write(memoryview(array.reshape(-1).view(np.uint8)))
