"""Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``) as Grain index arithmetic.

DeiT's sampler, per epoch: shuffle the ``N`` training images, repeat each index ``K`` times in a
row, deal the result round-robin to the ``R`` ranks and let each rank keep only its first
``~N / R`` samples. An epoch therefore still has ``~N`` samples, drawn from the first ``N / K``
images of that epoch's shuffle, each ``K`` times, and with ``R = K`` the copies of an image sit in
the same step on ``K`` different ranks.

Here the same, in terms of this package's layout (the global batch of step ``t`` is cut into
contiguous process blocks), but independent of the process count:

* slots ``s = 0 .. steps*G - 1`` of an epoch hold image ``order[s // K]`` (``order`` is the
  epoch's shuffle), copy ``s % K``; step ``t`` gets slots ``[t*G, (t+1)*G)``;
* within a step the rows list the slots by copy, then slot: every copy 0 first, then every
  copy 1, ... So the ``K`` copies of an image are about ``G / K`` rows apart and land in
  different process blocks whenever there are at least ``K`` processes (exactly one copy per
  process when ``R = K`` and ``K`` divides ``G``, as in DeiT), and the global batch does not
  depend on ``R`` at all.

Each row is a distinct position of the epoch, so Grain's ``random_map`` after this gives every
copy its own rng: the copies are augmented differently, reproducibly per (seed, epoch, step).
"""

from __future__ import annotations

import grain


def slot_of_row(step: int, row: int, global_batch: int, repeats: int) -> int:
    """The epoch slot (image ``slot // repeats``, copy ``slot % repeats``) at ``row`` of ``step``.

    Args:
      step: the step within the epoch.
      row: the row within the global batch, ``0 <= row < global_batch``.
      global_batch: G, examples per step over all processes.
      repeats: K, copies of each image.
    """
    if not 0 <= row < global_batch:
        raise IndexError(f"row {row} is not in a global batch of {global_batch}")
    start = step * global_batch
    stop = start + global_batch
    for copy in range(repeats):
        first = start + (copy - start) % repeats  # first slot of this copy index in the step
        count = max(0, -(-(stop - first) // repeats))
        if row < count:
            return first + row * repeats
        row -= count
    raise AssertionError("unreachable: the copies' counts sum to global_batch")


class RepeatedAugmentation(grain.MapDataset):
    """``steps * global_batch`` positions per epoch over the first ``ceil(len / repeats)``
    elements of the parent's epoch (a shuffle), each ``repeats`` times; see the module doc.

    Index ``e * len(self) + i`` reads the parent at ``e * len(parent) + ...``, so a parent
    shuffle draws a fresh order for every epoch ``e``, as DeiT's sampler does.
    """

    def __init__(self, parent: grain.MapDataset, *, steps: int, global_batch: int, repeats: int):
        super().__init__(parent)
        if steps * global_batch > len(parent):
            raise ValueError(f"{steps} steps of {global_batch} exceed the {len(parent)} examples")
        self._global_batch = global_batch
        self._repeats = repeats
        self._length = steps * global_batch

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"RepeatedAugmentation(repeats={self._repeats}, global_batch={self._global_batch})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._length)
        step, row = divmod(position, self._global_batch)
        slot = slot_of_row(step, row, self._global_batch, self._repeats)
        return self._parent[epoch * len(self._parent) + slot // self._repeats]
