"""A bounded, code-free scan of a torch pickle, run before torch's own unpickler reads it.

Python's pure-Python unpickler (`pickle._Unpickler`) walks the opcodes and builds the plain data
(strings, numbers, lists, dicts, tuples), but every global the pickle names resolves to an inert
stand-in (a `_Stub` subclass): nothing is imported and nothing from the file is called. The scan
checks what torch's weights-only unpickler will meet when it reads the same bytes, and stops at
the first problem:

- a global outside the allowlist (or an OBJ/EXT opcode) stops it and is named (`UnsafeGlobal`);
  `builtins.getattr` is noted and the scan goes on to the next global, because protocols 0-2
  spell `pathlib.Path.touch` as getattr(pathlib.Path, "touch");
- at most `budget` bytes are read, a budget that grows by `per_id` with each persistent id (the
  caller bounds a pickle by the storages it declares, see PICKLE_SLACK);
- each storage a persistent id declares must fit its zip record, or (legacy files) all of them
  together the file, so torch never allocates memory the file does not back;
- tensors that are views larger than their storage (stride-0 expansions, which copies would
  materialise) may span at most UNBACKED_LIMIT bytes beyond their storages in all;
- dict keys and set items must hash in bounded time (no deep tuples: a tuple shared at every
  level hashes in time exponential in its depth) and may not flood one dict with equal hashes
  (ints, floats and tuples have unsalted hashes that can be made to collide; str and bytes
  hashes are salted per process and are not tracked).

Work is linear in the bytes read: a few microseconds per opcode, no step more than linear in its
own argument. Refusals raise CheckpointError (bounds) or pickle.UnpicklingError (damage, or data
the file does not hold: the caller words it as a damaged file).
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

from sepvit_jax.core.errors import CheckpointError
from sepvit_jax.core.unpickler import InertUnpickler

# A legitimate pickle holds roughly 100-220 bytes per storage record (measured: a bare
# state_dict, timm's checkpoint with AdamW state, an EMA copy and 200 argparse arguments, a
# Lightning checkpoint, 20,000 one-element tensors), plus metadata of a few KiB (arguments,
# hyper-parameters, loop and callback state; ImageNet-1k class names are 30 KiB). 1 KiB per
# record is five times the largest measured; 1 MiB of slack covers even big metadata. Scanning
# a full 1 MiB of the tiniest opcodes takes well under a second.
PICKLE_SLACK = 1 << 20
PICKLE_PER_STORAGE = 1 << 10
# Expanded (stride-0) views beyond their storage, in all: legitimate ones are small buffers
# (position ids and the like), and nothing SepViT-shaped needs any.
UNBACKED_LIMIT = 64 << 20
_MAX_EQUAL_HASHES = 32  # keys of one container with one (unsalted) hash; real dicts: 1-2
_MAX_KEY_ATOMS = 256  # scalars inside one tuple key, nesting included
_MAX_DIMS = 64  # torch's own limit on tensor dimensions
_KEYED = {"builtins.set": False, "collections.Counter": False, "collections.OrderedDict": True}
_HASH_MODULUS = (1 << 61) - 1  # ints in (-M, M) hash to themselves (but -1): no collisions
_BIG = 1 << 63
# Bytes per element of torch's legacy storage classes (torch.FloatStorage...) and of dtypes
# (`_rebuild_tensor_v3` names one); unknown ones count 1 byte, which never over-refuses.
_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4}
_STORAGE_ITEMSIZE.update(Short=2, ComplexDouble=16, ComplexFloat=8, QInt32=4)
_DTYPE_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16}
_DTYPE_ITEMSIZE.update(complex64=8, int64=8, int32=4, int16=2, uint16=2, uint32=4, uint64=8)


def pickle_limit(storages: int) -> int:
    """The most bytes a pickle declaring `storages` storages is allowed (see PICKLE_SLACK)."""
    return PICKLE_SLACK + PICKLE_PER_STORAGE * storages


class UnsafeGlobal(Exception):
    """The pickle imports or calls `names` (the first disallowed one last)."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


class _Storage:
    """What a persistent id stands for: a storage of `nbytes` bytes of `itemsize`-byte items."""

    __slots__ = ("itemsize", "nbytes")

    def __init__(self, nbytes: int, itemsize: int):
        self.nbytes, self.itemsize = nbytes, itemsize


class _Stub:
    """An allowed global, or what calling it built: inert; reports tensors and keys to the scan."""

    name = ""
    scan: Scan

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        cls.scan.called(cls.name, args)
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # BUILD: torch calls Tensor.set_(*state) for 4-tuples
        if isinstance(state, tuple) and len(state) >= 4:
            self.scan.tensor(state[0], state[2])

    def __setitem__(self, key, value):  # keys are checked by the SETITEM(S) opcodes
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):  # set items are checked by the ADDITEMS opcode
        pass


class Scan:
    """The state of one file's scan; `load(f)` scans one pickle of it.

    `records`: a zip's storage records, {key: bytes}; None for a legacy file, whose storages
    must fit `file_size` together. `budget`: the bytes the pickles may take so far, grown by
    `per_id` with each persistent id (enforced by the reader, `unpickler.BoundedReader`).
    """

    def __init__(
        self,
        source: str,
        allowed: Callable[[str, str], tuple[str, bool]],
        budget: int,
        *,
        per_id: int = 0,
        records: dict[str, int] | None = None,
        file_size: int = 0,
    ):
        self.source, self.allowed, self.budget, self.per_id = source, allowed, budget, per_id
        self.records, self.file_size = records, file_size
        self.storages: dict[Any, _Storage] = {}
        self.declared = 0  # bytes of the distinct storages (legacy files)
        self.persistent_ids = 0
        self.unbacked = 0
        self.hashes: Counter = Counter()
        self.flagged: list[str] = []
        self._stubs: dict[str, type] = {}

    def load(self, f: IO[bytes]) -> Any:
        return InertUnpickler(f, self).load()

    def refuse(self, why: str) -> CheckpointError:
        return CheckpointError(f"refusing to load {self.source}: {why}")

    # ---- globals -------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> type:
        full, ok = self.allowed(module, name)
        if not ok:
            self.flagged.append(full)
            if full != "builtins.getattr":
                raise UnsafeGlobal(self.flagged)
        stub = self._stubs.get(full)
        if stub is None:
            stub = self._stubs[full] = type("_Stub", (_Stub,), {"name": full, "scan": self})
        return stub

    def code_op(self, name: str) -> None:
        self.flagged.append(f"the {name} opcode")
        raise UnsafeGlobal(self.flagged)

    # ---- storages and tensors ------------------------------------------------------------

    def storage(self, pid: Any) -> _Storage:
        self.persistent_ids += 1
        self.budget += self.per_id
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            return _Storage(0, 1)  # torch refuses it
        kind, key, numel = pid[1], pid[2], pid[4]
        if type(key) is not str:  # torch writes string keys (and hashing others may be slow)
            return _Storage(0, 1)
        if key in self.storages:
            return self.storages[key]  # torch keeps the first declaration, too
        if type(numel) is not int or not 0 <= numel < _BIG:
            raise pickle.UnpicklingError(f"storage {_brief(key)} declares {_brief(numel)} elements")
        name = getattr(kind, "name", "").rsplit(".", 1)[-1].removesuffix("Storage")
        itemsize = _STORAGE_ITEMSIZE.get(name, 1)
        nbytes = numel * itemsize
        if self.records is not None:
            have = self.records.get(key.lower())  # torch's zip reader ignores case
            if have is None:
                raise pickle.UnpicklingError(f"its pickle names storage data/{key}, not in the zip")
            if nbytes > have:
                raise pickle.UnpicklingError(
                    f"storage data/{key} declares {nbytes:,} bytes but its record holds {have:,}"
                )
        else:
            self.declared += nbytes
            if self.declared > self.file_size:  # truncated, or crafted
                raise pickle.UnpicklingError(
                    f"its storages declare {self.declared:,} bytes, more than the whole file "
                    f"({self.file_size:,} bytes)"
                )
        self.storages[key] = _Storage(nbytes, itemsize)
        return self.storages[key]

    def called(self, name: str, args: tuple) -> None:
        if len(args) >= 4 and isinstance(args[0], _Storage):  # torch._utils._rebuild_tensor*
            dtype = args[6] if name.endswith("_v3") and len(args) > 6 else None
            itemsize = _DTYPE_ITEMSIZE.get(getattr(dtype, "name", "").removeprefix("torch."))
            self.tensor(args[0], args[2], itemsize)
        elif name in _KEYED and args and isinstance(args[0], list | tuple):
            # set(items), Counter(items), OrderedDict(pairs): the items become keys
            pairs = _KEYED[name]
            for item in args[0]:
                is_pair = pairs and isinstance(item, list | tuple) and item
                self.key(args, item[0] if is_pair else item)

    def tensor(self, storage: Any, size: Any, itemsize: int | None = None) -> None:
        if not isinstance(storage, _Storage):
            return
        if isinstance(size, _Stub) and size.name == "torch.Size" and size.args:
            size = size.args[0]
        ok = isinstance(size, tuple | list) and len(size) <= _MAX_DIMS
        if not ok or not all(type(d) is int and 0 <= d < _BIG for d in size):
            raise pickle.UnpicklingError(f"a tensor's size is {_brief(size)}, not a tuple of sizes")
        nbytes = math.prod(size) * (itemsize or storage.itemsize)
        self.unbacked += max(0, nbytes - storage.nbytes)
        if self.unbacked > UNBACKED_LIMIT:
            raise self.refuse(
                f"a tensor of shape {tuple(size)} spans {nbytes:,} bytes over a storage of "
                f"{storage.nbytes:,} (an expanded view): the file does not hold that data"
            )

    # ---- keys ----------------------------------------------------------------------------

    def key(self, container: Any, key: Any) -> None:
        kind = type(key)
        if kind is str or kind is bytes or (kind is int and -_HASH_MODULUS < key < _HASH_MODULUS):
            return
        if not _bounded(key):
            raise self.refuse(
                f"a dict key or set item in its pickle nests over {_MAX_KEY_ATOMS} values "
                "(hashing a shared nested tuple takes time exponential in its depth)"
            )
        slot = (id(container), hash(key))
        self.hashes[slot] += 1
        if self.hashes[slot] > _MAX_EQUAL_HASHES:
            raise self.refuse(
                f"a dict or set in its pickle holds over {_MAX_EQUAL_HASHES} keys of one hash "
                "(a hash-collision flood)"
            )


def _brief(value: Any) -> str:
    """A short description of a value from the file (whose repr could be huge or slow)."""
    if type(value) in (str, bytes) or (type(value) is int and abs(value) < _BIG):
        return repr(value)[:40]
    return f"a {type(value).__name__}"


def _bounded(key: Any) -> bool:
    """Whether `key` nests at most _MAX_KEY_ATOMS values (tuples and frozensets included)."""
    todo, atoms = [key], 0
    while todo:
        item = todo.pop()
        atoms += 1
        if atoms > _MAX_KEY_ATOMS:
            return False
        if isinstance(item, tuple | frozenset):
            todo.extend(item)
    return True
