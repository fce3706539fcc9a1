"""The opcode machine of the pickle scan (`sepvit_jax.core.pickscan`): pickle's own pure-Python
unpickler with globals, persistent ids and the keys of every dict and set sent to the scan, and a
reader that stops at the scan's byte limit.

Nothing here imports or calls what a pickle names: `scan.find_class` answers with inert stubs.
Opcodes that torch checkpoints never hold and that would cost more than their own bytes
(BYTEARRAY8 allocates its declared length first) are damage; OBJ and EXT* are code.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import IO, Any


class InertUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler, with globals, ids, keys and code opcodes sent to `scan`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f: IO[bytes], scan: Any):
        super().__init__(f, encoding="utf-8")  # as torch.load decodes protocol-2 strings
        self.scan = scan

    def find_class(self, module, name):
        return self.scan.find_class(module, name)

    def persistent_load(self, pid):
        return self.scan.storage(pid)

    def _fill(self, target, items):  # SETITEM(S), DICT: every key checked before it goes in
        for i in range(0, len(items), 2):
            self.scan.key(target, items[i])
            target[items[i]] = items[i + 1]

    def _add(self, target, items):  # ADDITEMS, FROZENSET
        for item in items:
            self.scan.key(target, item)
            target.add(item)

    def _memo_index(self) -> int:  # PUT, GET: text indices bounded like the binary ones
        i = int(self.readline()[:-1])
        if not 0 <= i < 1 << 32:
            raise pickle.UnpicklingError("a memo index out of range")
        return i


def _setitems(self: InertUnpickler) -> None:
    items = self.pop_mark()
    self._fill(self.stack[-1], items)


def _setitem(self: InertUnpickler) -> None:
    value, key = self.stack.pop(), self.stack.pop()
    self._fill(self.stack[-1], [key, value])


def _dict(self: InertUnpickler) -> None:
    items = self.pop_mark()
    self.append({})
    self._fill(self.stack[-1], items)


def _additems(self: InertUnpickler) -> None:
    items = self.pop_mark()
    self._add(self.stack[-1], items)


def _frozenset(self: InertUnpickler) -> None:
    items, target = self.pop_mark(), set()
    self._add(target, items)
    self.append(frozenset(target))


def _put(self: InertUnpickler) -> None:
    self.memo[self._memo_index()] = self.stack[-1]


def _get(self: InertUnpickler) -> None:
    self.append(self.memo[self._memo_index()])


def _bytearray8(self: InertUnpickler) -> None:  # would allocate its declared length before reading
    raise pickle.UnpicklingError("a BYTEARRAY8 opcode (never in a torch checkpoint)")


def _code_op(name: str) -> Callable[[InertUnpickler], None]:
    return lambda self: self.scan.code_op(name)


InertUnpickler.dispatch.update({op[0]: f for op, f in [
    (pickle.SETITEM, _setitem), (pickle.SETITEMS, _setitems), (pickle.DICT, _dict),
    (pickle.ADDITEMS, _additems), (pickle.FROZENSET, _frozenset), (pickle.PUT, _put),
    (pickle.GET, _get), (pickle.BYTEARRAY8, _bytearray8), (pickle.OBJ, _code_op("OBJ")),
    (pickle.EXT1, _code_op("EXT1")), (pickle.EXT2, _code_op("EXT2")),
    (pickle.EXT4, _code_op("EXT4")),
]})  # fmt: skip


class BoundedReader:
    """`f` as read by the scan, which stops it past `scan.budget` bytes from the start."""

    def __init__(self, f: IO[bytes], scan: Any, what: str):
        self.f_read, self.f_readline, self.scan, self.what, self.used = (
            f.read,
            f.readline,
            scan,
            what,
            0,
        )

    def _over(self) -> None:
        raise self.scan.refuse(
            f"its pickle {self.what} runs past {self.scan.budget:,} bytes, more than a checkpoint "
            f"of {self.scan.persistent_ids:,} tensors needs (a pickle padded to waste time)"
        )

    def read(self, n: int) -> bytes:
        self.used += n
        if self.used > self.scan.budget:
            self._over()
        return self.f_read(n)

    def readline(self) -> bytes:
        line = self.f_readline(max(self.scan.budget - self.used, 0) + 1)
        self.used += len(line)
        if self.used > self.scan.budget:
            self._over()
        return line
