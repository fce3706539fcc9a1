"""Checking a torch zip checkpoint's structure before torch reads it, without inflating anything.

torch's zip reader (miniz) inflates a member whole into memory before unpickling it, and trusts
the sizes the central directory declares. Before `torch.load` sees the file, this module reads
the end records and the central directory (with `zipfile`, which only parses them) and refuses:

- a central directory that declares more than MAX_ENTRIES entries (zip64 allows 2**64), or that
  does not hold exactly the records it declares (Python's `zipfile` builds an object per record
  present, whatever the count says);
- a member compressed with anything but stored/deflate (torch's reader knows no other), a stored
  member whose two sizes differ, members whose data overlap (a record reused under many names);
- deflated members that inflate more than MAX_RATIO times, past RATIO_FLOOR bytes in all: a zip
  bomb (torch itself never compresses, and float weights deflate by a few percent);
- a pickle (`.pkl`) that inflates past `pickscan.pickle_limit(storages)`, the bytes a checkpoint
  with that many storage records under `data/` can need (see PICKLE_SLACK there);
- two members whose names torch's reader cannot tell apart (it ignores ASCII case).

Malformed structure (no end record, inconsistent offsets) raises ValueError, which the caller words
as a damaged file; hostile sizes raise CheckpointError.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.pickscan import pickle_limit

# Entries: a sepvit_base checkpoint with AdamW state and an EMA copy has about 1,300 storages;
# 2**17 is a hundred times that, and parsing so many records takes well under a second.
MAX_ENTRIES = 1 << 17
MAX_RATIO = 100  # deflate's own maximum is about 1032:1 (long runs of one byte)
RATIO_FLOOR = 1 << 20  # members inflating more may do so up to this many bytes in all

_EOCD = struct.Struct("<4s4H2LH")  # signature, disks, entries here, entries, cd size, offset
_LOCATOR = struct.Struct("<4sLQL")  # zip64 end record locator: signature, disk, offset, disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end record: ..., entries, cd size, cd offset
_CD_RECORD = struct.Struct("<4s24x3H12x")  # signature, ..., name/extra/comment lengths, ...
_LOCAL_HEADER = 30


@dataclass
class TorchZip:
    """What torch will read: the pickle member (None if absent) and the storage records."""

    pickle: zipfile.ZipInfo | None
    records: dict[str, int]  # storage key (lower case) -> bytes of its record


def check_torch_zip(path: Path) -> TorchZip:
    """Refuse what would make torch's zip reader inflate or allocate beyond bounds (see above)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        entries, cd_offset, cd_size = _end_record(f, size, path)
        f.seek(cd_offset)
        _count_records(f.read(cd_size), entries)
    with zipfile.ZipFile(path) as archive:  # parses the central directory only
        infos = archive.infolist()
    _check_layout(infos, cd_offset, path)
    # torch's reader takes the folder of the first entry as the archive's name.
    folder = infos[0].orig_filename.split("/", 1)[0].lower() + "/" if infos else ""
    by_name = {info.orig_filename.lower(): info for info in infos}
    records = {
        name[len(folder) + 5 :]: info.file_size
        for name, info in by_name.items()
        if name.startswith(folder + "data/")
    }
    excess = 0  # bytes inflating more than MAX_RATIO times, in all
    for info in infos:
        excess += _check_member(info, len(records), path)
        if excess > RATIO_FLOOR:
            raise CheckpointError(
                f"refusing to load {path}: zip member {info.orig_filename!r} inflates "
                f"{info.file_size // max(info.compress_size, 1):,} times ({info.compress_size:,} "
                f"to {info.file_size:,} bytes; at most {MAX_RATIO}): a zip bomb"
            )
    return TorchZip(by_name.get(folder + "data.pkl"), records)


def _end_record(f, size: int, path: Path) -> tuple[int, int, int]:
    """(entries, central directory offset, its size) from the (zip64) end of central directory."""
    tail_start = max(0, size - _EOCD.size - 0xFFFF)  # the record, then up to 64 KiB of comment
    f.seek(tail_start)
    tail = f.read()
    at = len(tail) - _EOCD.size
    if tail[at : at + 4] != b"PK\x05\x06":  # not at the very end: a comment follows
        at = tail.rfind(b"PK\x05\x06")  # the last one, as zipfile and miniz take it
    if at < 0 or at + _EOCD.size > len(tail):
        raise ValueError("no zip end-of-central-directory record")
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    end = tail_start + at  # where the central directory (or the zip64 end record) must end
    locator = tail_start + at - _LOCATOR.size
    if locator >= 0:
        f.seek(locator)
        signature, _, record64, _ = _LOCATOR.unpack(f.read(_LOCATOR.size))
        if signature == b"PK\x06\x07":
            end = locator - _EOCD64.size
            if record64 != end or end < 0:
                raise ValueError("misplaced zip64 end-of-central-directory record")
            f.seek(end)
            fields = _EOCD64.unpack(f.read(_EOCD64.size))
            if fields[0] != b"PK\x06\x06":
                raise ValueError("no zip64 end-of-central-directory record")
            entries, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if entries > MAX_ENTRIES:
        raise CheckpointError(
            f"refusing to load {path}: its zip directory declares {entries:,} entries "
            f"(at most {MAX_ENTRIES:,}: a checkpoint has one per tensor storage)"
        )
    if cd_offset + cd_size != end:
        raise ValueError(
            f"the zip directory ({cd_size:,} bytes at {cd_offset:,}) does not end where its end "
            f"record starts ({end:,})"
        )
    return entries, cd_offset, cd_size


def _count_records(directory: bytes, entries: int) -> None:
    """The central directory must hold exactly `entries` records, and nothing after them."""
    at = count = 0
    while at < len(directory):
        if count == entries:
            raise ValueError(f"the zip directory holds more records than the {entries:,} declared")
        if directory[at : at + 4] != b"PK\x01\x02" or at + _CD_RECORD.size > len(directory):
            raise ValueError(f"a malformed zip directory record at byte {at:,}")
        _, name, extra, comment = _CD_RECORD.unpack_from(directory, at)
        at += _CD_RECORD.size + name + extra + comment
        count += 1
    if count != entries:
        raise ValueError(f"the zip directory holds {count:,} records but declares {entries:,}")


def _check_layout(infos: list[zipfile.ZipInfo], cd_offset: int, path: Path) -> None:
    """Distinct names; each member's header and data before the next member and the directory."""
    names: set[str] = set()
    for info in infos:
        name = info.orig_filename.lower()
        if name in names:
            raise CheckpointError(f"refusing to load {path}: two zip members are named {name!r}")
        names.add(name)
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for info, after in zip(ordered, [*ordered[1:], None], strict=True):
        limit = cd_offset if after is None else after.header_offset
        raw_name = len(info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"))
        if info.header_offset + _LOCAL_HEADER + raw_name + info.compress_size > limit:
            raise CheckpointError(
                f"refusing to load {path}: zip member {info.orig_filename!r} overlaps the next "
                "one (data reused under several names: a zip bomb)"
            )


def _check_member(info: zipfile.ZipInfo, storages: int, path: Path) -> int:
    """The member's bytes if it inflates more than MAX_RATIO times (else 0), after checks."""
    name, inflated, stored = info.orig_filename, info.file_size, info.compress_size
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"zip member {name!r} uses compression method {info.compress_type}")
    if info.compress_type == zipfile.ZIP_STORED and inflated != stored:
        raise ValueError(f"stored zip member {name!r} declares {inflated:,} and {stored:,} bytes")
    if name.lower().endswith(".pkl") and inflated > pickle_limit(storages):
        raise CheckpointError(
            f"refusing to load {path}: its pickle {name!r} inflates to {inflated:,} bytes, more "
            f"than a checkpoint of {storages:,} tensor storages needs "
            f"(at most {pickle_limit(storages):,}: a pickle padded to waste time)"
        )
    return inflated if inflated > MAX_RATIO * stored else 0
