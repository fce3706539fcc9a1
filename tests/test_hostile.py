"""Hostile checkpoints: every file the converter reads is refused, or read, in bounded time.

Each case is crafted small on disk (deflated runs, shared pickle references, patched zip records)
the way an attacker would, then given to the real CLI in a child process (`convert inspect`, and
`convert torch2flax` for the main ones): exit status 2, exactly one `error: ...` line on stderr
naming the problem, no traceback, and seconds instead of minutes. The measured wall and CPU times
are printed (`pytest -s`). Before the bounds, the first case (a user's 292 KB `.pt` whose
data.pkl inflated to 300 MB of one-byte strings after an `os.system` GLOBAL) kept `convert inspect`
busy for 900 s at 1.26 GB; its 20-million-opcode version here, the nested-tuple key and the shared
dicts each ran past minutes, the hash flood took 91 s, the expanded view 29 s at 5.5 GB. Now each
is refused in the time it takes to import torch. Legitimate checkpoints, wrapped with many small
optimizer tensors and an argparse.Namespace, still load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from sepvit_jax.core.torch_io import read_state_dict

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "two_stage_56.pt"
# Wall time on a loaded 2-core machine (torch2flax alone imports JAX and torch: ~10-20 s there);
# CPU time of the child, which load does not inflate.
MAX_WALL_S, MAX_CPU_S = 60, 20

PROTO2 = b"\x80\x02"
TINY = b"U\x01a"  # SHORT_BINSTRING "a": one opcode in three bytes, which torch reads too
SYSTEM = b"cos\nsystem\n"  # GLOBAL os.system


# ---- crafting ------------------------------------------------------------------------------


def repeat(op: bytes, count: int, per_chunk: int = 1 << 18) -> Iterable[bytes]:
    """`op * count`, in chunks (the test never holds the whole payload)."""
    block = op * per_chunk
    for _ in range(count // per_chunk):
        yield block
    yield op * (count % per_chunk)


def torch_zip(path: Path, pickle_chunks: Iterable[bytes], records=(), *, level: int = 9) -> Path:
    """A zip laid out as torch.save lays it out: archive/data.pkl, archive/data/<key>, ...

    `records`: (key, chunks, deflate?) per storage. The pickle is deflated (streamed).
    """
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as f:
            for chunk in pickle_chunks:
                f.write(chunk)
        archive.writestr("archive/byteorder", "little", zipfile.ZIP_STORED)
        for key, chunks, deflate in records:
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            with archive.open(info, "w", force_zip64=True) as f:
                for chunk in chunks:
                    f.write(chunk)
        archive.writestr("archive/version", "3\n", zipfile.ZIP_STORED)
    return path


class StorageRef:
    """A storage to pickle as torch does: a persistent id naming its key and element count."""

    def __init__(self, key: str, numel: int, kind=torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class TensorRef:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, storage: StorageRef, size: tuple, stride: tuple):
        self.args = (storage, 0, size, stride, False, {})

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class TorchPickler(pickle.Pickler):
    legacy = False

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):  # legacy files add the view metadata
            return ("storage", obj.kind, obj.key, "cpu", obj.numel, *[None][: self.legacy])
        return None


def torch_pickle(obj, legacy: bool = False) -> bytes:
    """`obj` pickled as torch.save pickles it (protocol 2, storages as persistent ids)."""
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer, protocol=2)
    pickler.legacy = legacy
    pickler.dump(obj)
    return buffer.getvalue()


def dict_pickle(pairs: Iterable[bytes]) -> Iterable[bytes]:
    """A pickled dict of pre-encoded (key, value) opcode pairs, batched as pickle batches them."""
    yield PROTO2 + b"}"  # EMPTY_DICT
    batch: list[bytes] = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == 1000:
            yield b"(" + b"".join(batch) + b"u"  # MARK ... SETITEMS
            batch = []
    yield (b"(" + b"".join(batch) + b"u" if batch else b"") + b"."


def long1(value: int) -> bytes:
    data = pickle.encode_long(value)
    return b"\x8a" + bytes([len(data)]) + data


def with_entry_count(data: bytes, entries: int) -> bytes:
    """`data` (a zip with a zip64 end record, as torch writes) declaring `entries` entries."""
    at = data.rindex(b"PK\x06\x06")  # the zip64 end of central directory record
    return data[: at + 24] + struct.pack("<2Q", entries, entries) + data[at + 40 :]


def reuse_record(data: bytes, source: str, targets: set[str]) -> bytes:
    """`data` (a zip) with the directory records of members `targets` pointing at `source`'s."""
    end = data.rindex(b"PK\x05\x06")
    records, pos = {}, struct.unpack_from("<L", data, end + 16)[0]
    while data[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<3H", data, pos + 28)
        records[data[pos + 46 : pos + 46 + n].decode()] = pos
        pos += 46 + n + m + k
    out, src = bytearray(data), records[source]
    for name in targets:
        pos = records[name]
        out[pos + 16 : pos + 28] = data[src + 16 : src + 28]  # crc, sizes
        out[pos + 42 : pos + 46] = data[src + 42 : src + 46]  # local header offset
    return bytes(out)


# ---- the cases -----------------------------------------------------------------------------


def reported_case(tmp: Path) -> Path:
    """As reported, scaled to 20 million opcodes (60 MB inflated, tens of KB on disk)."""
    chunks = [PROTO2 + SYSTEM, *repeat(TINY, 20_000_000), b"."]
    return torch_zip(tmp / "reported.pt", chunks)


def global_after_junk(tmp: Path) -> Path:
    """Within the pickle bound (900 KB of junk), the global last: the scan walks it all."""
    return torch_zip(tmp / "late.pt", [PROTO2, *repeat(TINY, 300_000), SYSTEM, b"N."])


def storage_bomb(tmp: Path, numel: int = 1 << 24) -> Path:
    """A 64 MiB zero storage deflated a thousandfold (torch inflates it when not memory-mapping)."""
    state = {"w": TensorRef(StorageRef("0", numel), (numel,), (1,))}
    zeros = repeat(b"\0", numel * 4, per_chunk=1 << 22)
    return torch_zip(tmp / "bomb.pt", [torch_pickle(state)], [("0", zeros, True)])


def huge_entry_count(tmp: Path) -> Path:
    path = tmp / "entries.pt"
    path.write_bytes(with_entry_count(FIXTURE.read_bytes(), 10**12))
    return path


def miscounted_entries(tmp: Path) -> Path:
    path = tmp / "miscounted.pt"
    path.write_bytes(with_entry_count(FIXTURE.read_bytes(), 3))
    return path


def overlapping_records(tmp: Path, copies: int = 200) -> Path:
    """One 1 MiB record reused under 200 names (200 MiB read from a 1 MiB file without mmap)."""
    numel = 1 << 18
    state = {f"w{i}": TensorRef(StorageRef(str(i), numel), (numel,), (1,)) for i in range(copies)}
    records = [("0", [b"\0" * numel * 4], False)]
    records += [(str(i), [b""], False) for i in range(1, copies)]
    path = torch_zip(tmp / "overlap.pt", [torch_pickle(state)], records)
    copies = {f"archive/data/{i}" for i in range(1, copies)}
    path.write_bytes(reuse_record(path.read_bytes(), "archive/data/0", copies))
    return path


def oversized_storage(tmp: Path) -> Path:
    """A persistent id declaring 2**40 floats for a 4-byte record."""
    state = {"w": TensorRef(StorageRef("0", 1 << 40), (1,), (1,))}
    return torch_zip(tmp / "oversized.pt", [torch_pickle(state)], [("0", [b"\0" * 4], False)])


def expanded_view(tmp: Path) -> Path:
    """A SepViT checkpoint whose head is a stride-0 view of one float: 2.7 GB once copied."""
    state = torch.load(FIXTURE, weights_only=True)
    rows = state["mlp_head.2.weight"].shape[0]
    state["mlp_head.2.weight"] = torch.zeros(1).expand(rows, 1 << 26)
    torch.save(state, tmp / "expanded.pt")
    return tmp / "expanded.pt"


def hash_flood(tmp: Path, count: int = 50_000) -> Path:
    """A dict of big ints that all hash alike: building it takes time quadratic in its size."""
    pairs = (long1(7 + i * ((1 << 61) - 1)) + b"K\x00" for i in range(count))
    return torch_zip(tmp / "flood.pt", dict_pickle(pairs))


def hash_bomb(tmp: Path, depth: int = 100) -> Path:
    """A dict key holding t = (t', t') nested 100 deep through the memo: 2**100 steps to hash.

    (Each level leaves the previous one on the stack: MARK ... TUPLE makes them all the key.)"""
    level = b"h\x00h\x00\x86q\x00"  # BINGET 0, BINGET 0, TUPLE2, BINPUT 0
    ops = PROTO2 + b"}(K\x01K\x02\x86q\x00" + level * depth + b"tK\x00s."
    return torch_zip(tmp / "tuplebomb.pt", [ops])


def shared_dicts(tmp: Path, width: int = 300) -> Path:
    """Five levels of one dict shared under 300 keys each: 300**4 paths, 1,500 entries."""
    level: dict = {"leaf": 1}
    for _ in range(5):
        level = {f"k{i}": level for i in range(width)}
    torch.save(level, tmp / "shared.pt")
    return tmp / "shared.pt"


def legacy_global_first(tmp: Path) -> Path:
    """A legacy (non-zip) pickle: os.system, then 6 MB of one-byte strings."""
    path = tmp / "legacy_first.pth"
    with open(path, "wb") as f:
        for chunk in [PROTO2 + SYSTEM, *repeat(TINY, 2_000_000), b"."]:
            f.write(chunk)
    return path


def legacy_junk_first(tmp: Path) -> Path:
    path = tmp / "legacy_junk.pth"
    with open(path, "wb") as f:
        for chunk in [PROTO2, *repeat(TINY, 2_000_000), SYSTEM, b"N."]:
            f.write(chunk)
    return path


def legacy_oversized(tmp: Path) -> Path:
    """A legacy torch file whose pickle declares a 4 TiB storage, backed by 4 bytes."""
    state = {"w": TensorRef(StorageRef("0", 1 << 40), (1,), (1,))}
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {})]
    parts += [
        torch_pickle(state, legacy=True),
        pickle.dumps(["0"], protocol=2),
        struct.pack("<q", 1),
        b"\0" * 4,
    ]
    (tmp / "legacy_big.pth").write_bytes(b"".join(parts))
    return tmp / "legacy_big.pth"


def safetensors_file(tmp: Path, name: str, header_length: int | None, entry: dict) -> Path:
    header = json.dumps({"w": entry}).encode()
    length = len(header) if header_length is None else header_length
    (tmp / name).write_bytes(struct.pack("<Q", length) + header + b"\0" * 16)
    return tmp / name


CASES = {
    # name: (builder, what the error line must say, also run torch2flax?)
    "reported": (reported_case, r"refusing to load .*reported.pt: its pickle .*data.pkl' "
                 r"inflates to 60,000,014 bytes, more than a checkpoint of 0 tensor", True),
    "global_after_junk": (global_after_junk, r"would execute code .*os\.system", False),
    "storage_bomb": (storage_bomb, r"refusing to load .*bomb.pt: zip member 'archive/data/0' "
                     r"inflates [\d,]+ times .*a zip bomb", False),
    "huge_entry_count": (huge_entry_count, r"refusing to load .*entries.pt: its zip directory "
                         r"declares 1,000,000,000,000 entries", False),
    "miscounted_entries": (miscounted_entries, r"not a readable .*miscounted.pt .*holds more "
                           r"records than the 3 declared", False),
    "overlapping_records": (overlapping_records, r"refusing to load .*overlap.pt: zip member "
                            r"'archive/data/0' overlaps the next one", False),
    "oversized_storage": (oversized_storage, r"not a readable .*oversized.pt .*storage data/0 "
                          r"declares 4,398,046,511,104 bytes but its record holds 4", False),
    "expanded_view": (expanded_view, r"refusing to load .*expanded.pt: a tensor of shape "
                      r"\(\d+, 67108864\) spans .*an expanded view", False),
    "hash_flood": (hash_flood, r"refusing to load .*flood.pt: .* keys of one hash", False),
    "hash_bomb": (hash_bomb, r"refusing to load .*tuplebomb.pt: a dict key .* nests over", False),
    "shared_dicts": (shared_dicts, r"shared.pt: (found no state_dict|does not look like)", False),
    "legacy_global_first": (legacy_global_first, r"would execute code .*os\.system", True),
    "legacy_junk_first": (legacy_junk_first, r"refusing to load .*legacy_junk.pth: its pickle "
                          r"stream runs past 1,048,576 bytes", False),
    "legacy_oversized": (legacy_oversized, r"not a readable .*legacy_big.pth .*its storages "
                         r"declare 4,398,046,511,104 bytes, more than the whole file", False),
    "safetensors_header_length": (
        lambda tmp: safetensors_file(tmp, "len.safetensors", 1 << 62, {}),
        r"not a readable .*len.safetensors .*header length [\d,]+ runs past the end", True),
    "safetensors_offsets": (
        lambda tmp: safetensors_file(
            tmp, "off.safetensors", None,
            {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}),
        r"not a readable .*off.safetensors .*tensor 'w' declares bytes 0\.\.4,294,967,296 but "
        r"the file holds 16 bytes", False),
    "safetensors_shape": (
        lambda tmp: safetensors_file(
            tmp, "shape.safetensors", None,
            {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 16]}),
        r"not a readable .*shape.safetensors .*needs 4,398,046,511,104 bytes but declares 16",
        False),
}  # fmt: skip


# ---- running the CLI -----------------------------------------------------------------------


def run_cli(*args) -> tuple[subprocess.CompletedProcess, float, float]:
    """`python -m convert ARGS` in a child; (result, wall seconds, child CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return result, wall, cpu


def assert_refused(result, wall: float, cpu: float, pattern: str, label: str) -> None:
    print(f"\n{label}: exit {result.returncode}, {wall:.1f} s wall, {cpu:.1f} s CPU")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert wall < MAX_WALL_S and cpu < MAX_CPU_S, (wall, cpu)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    return {name: build(tmp) for name, (build, _, _) in CASES.items()}


def test_hostile_files_are_small_on_disk(crafted):
    for name, path in crafted.items():
        assert path.stat().st_size < 7_000_000, (name, path.stat().st_size)


@pytest.mark.parametrize("name", CASES)
def test_inspect_refuses_quickly(crafted, name):
    _, pattern, _ = CASES[name]
    result, wall, cpu = run_cli("inspect", crafted[name])
    assert_refused(result, wall, cpu, pattern, f"inspect {name}")


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[2]])
def test_torch2flax_refuses_quickly(crafted, name, tmp_path):
    _, pattern, _ = CASES[name]
    out = tmp_path / "out"
    result, wall, cpu = run_cli("torch2flax", crafted[name], "-o", out)
    assert_refused(result, wall, cpu, pattern, f"torch2flax {name}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- legitimate files still load -------------------------------------------------------------


def test_fixture_still_inspects():
    result, wall, cpu = run_cli("inspect", FIXTURE)
    print(f"\ninspect fixture: {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr


def _wrapped(sd: dict) -> dict:
    """A training checkpoint: weights, an AdamW-like state of 3,000 small tensors, arguments."""
    optimizer = {
        "state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(4),
                      "exp_avg_sq": torch.zeros(4)} for i in range(1000)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(1000))}],
    }  # fmt: skip
    args = argparse.Namespace(**{f"option_{i}": f"value {i}" for i in range(200)})
    return {"epoch": 3, "state_dict": sd, "optimizer": optimizer, "args": args}


@pytest.mark.parametrize("legacy", [False, True])
def test_wrapped_checkpoint_with_optimizer_and_namespace_loads(tmp_path, legacy):
    sd = torch.load(FIXTURE, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save(_wrapped(sd), path, _use_new_zipfile_serialization=not legacy)
    got = read_state_dict(path)
    assert sorted(got) == sorted(sd)
    for key, value in sd.items():
        assert (got[key] == value.numpy()).all(), key


def test_wrapped_checkpoint_via_cli(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save(_wrapped(torch.load(FIXTURE, weights_only=True)), path)
    result, wall, cpu = run_cli("inspect", path)
    print(f"\ninspect wrapped: {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert result.returncode == 0, result.stderr


def test_real_zip_bounds_are_generous():
    """A real checkpoint uses a small part of each bound."""
    from sepvit_jax.core import zipcheck
    from sepvit_jax.core.pickscan import pickle_limit

    layout = zipcheck.check_torch_zip(FIXTURE)
    assert layout.pickle is not None and len(layout.records) == 46
    assert layout.pickle.file_size < pickle_limit(len(layout.records)) / 100


# ---- a tampered converted directory --------------------------------------------------------


def test_tampered_directory_is_refused_quickly(tmp_path):
    converted = tmp_path / "model_flax"
    result, _, _ = run_cli("torch2flax", FIXTURE, "-o", converted)
    assert result.returncode == 0, result.stderr
    config_path = converted / "config.json"
    config = json.loads(config_path.read_text())
    config["depth"] = [2000, 1]
    config_path.write_text(json.dumps(config))
    result, wall, cpu = run_cli("flax2torch", converted, "-o", tmp_path / "back.pt")
    # The stored tree is checked against config.json's before any model or array is built.
    pattern = r"model_flax does not fit the SepViT: missing keys \([\d,]+\)"
    assert_refused(result, wall, cpu, pattern, "flax2torch tampered")
    assert not (tmp_path / "back.pt").exists()
    shutil.rmtree(converted)
