"""Hostile checkpoint files for tests/test_hostile.py, crafted small on disk the way an attacker
would (deflated runs, shared pickle references, patched zip records), each with what the
converter's one error line must say."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "two_stage_56.pt"
PROTO2 = b"\x80\x02"
TINY = b"U\x01a"  # SHORT_BINSTRING "a": one opcode in three bytes, which torch reads too
SYSTEM = b"cos\nsystem\n"  # GLOBAL os.system


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
