"""Device mesh, sharding rules and global batches for SepViT training.

The mesh has two axes:

    data  pure data parallelism: parameters replicated, batch split.
    fsdp  fully-sharded data parallelism (ZeRO-3): the batch is split over it too, and large
          parameters (and their optimizer moments) are sharded along one dimension, gathered by
          XLA when a layer needs them.

So every device gets a distinct slice of the batch: the batch axis (NHWC's N) is sharded over
`("data", "fsdp")` and the global batch must be divisible by `data * fsdp` (the data-parallel
size). Sharding is data, not code: `ShardingRules` decides per array from its shape alone, so the
same rule places a parameter and its Adam moments identically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device (data * fsdp slices)


class MeshError(ValueError):
    """A mesh specification that does not fit the devices, with a message for the user."""


def parse_mesh(spec: str) -> dict[str, int]:
    """Parses `"data=-1,fsdp=1"` into `{"data": -1, "fsdp": 1}` (-1: all remaining devices).

    Axes left out get size 1; at most one axis may be -1.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise MeshError(f"bad mesh entry {part!r} in {spec!r}; expected e.g. 'data=-1,fsdp=2'")
        if name in seen:
            raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name}={value!r} is not an int") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise MeshError(f"mesh axis {name}={sizes[name]}: use a positive size or -1")
    if list(sizes.values()).count(-1) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {spec!r}")
    return sizes


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Replaces -1 by whatever is left of `num_devices`; checks the product."""
    known = math.prod(v for v in sizes.values() if v != -1)
    shape = []
    for name in MESH_AXES:
        v = sizes.get(name, 1)
        if v == -1:
            if num_devices % known:
                raise MeshError(
                    f"mesh {dict(sizes)}: {num_devices} devices are not divisible by {known}"
                )
            v = num_devices // known
        shape.append(v)
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} has {math.prod(shape)} devices "
            f"but {num_devices} are available; use -1 for one axis to fill the rest"
        )
    return tuple(shape)


def make_mesh(spec: str | Mapping[str, int] = "data=-1,fsdp=1", devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    # Auto axes: jit's in/out shardings drive the partitioner (explicit sharding-in-types
    # is not needed for this model and would make every op spell its output sharding).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Placement of parameters and optimizer state, decided from an array's shape.

    Args:
      fsdp_min_size: arrays with fewer elements stay replicated (sharding small tensors costs
        more in collective latency than it saves in memory). 2**20 float32 elements is 4 MiB,
        big_vision's threshold; sepvit_base's feed-forward kernels are 4M elements.
      fsdp_axis: the mesh axis large arrays are sharded over.
    """

    fsdp_min_size: int = 2**20
    fsdp_axis: str = "fsdp"

    def spec(self, shape: tuple[int, ...], mesh: Mesh) -> P:
        """Shards the largest dimension divisible by the fsdp size; else replicates."""
        n = mesh.shape[self.fsdp_axis]
        if n == 1 or math.prod(shape) < self.fsdp_min_size:
            return P()
        # Largest dimension first; ties: the later (output-feature) dimension.
        for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
            if shape[dim] % n == 0:
                return P(*(self.fsdp_axis if d == dim else None for d in range(len(shape))))
        return P()

    def shardings(self, tree, mesh: Mesh):
        """A tree of NamedSharding matching `tree` (arrays or ShapeDtypeStructs)."""
        return jax.tree.map(lambda x: NamedSharding(mesh, self.spec(np.shape(x), mesh)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; the rest of each array whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """Raises MeshError unless every device gets whole, equal slices of every micro-batch."""
    dp = data_parallel_size(mesh)
    if global_batch_size % grad_accum:
        raise MeshError(
            f"global batch size {global_batch_size} is not divisible by --grad-accum {grad_accum}"
        )
    micro = global_batch_size // grad_accum
    if micro % dp:
        what = f"micro-batch size {micro}" if grad_accum > 1 else f"global batch size {micro}"
        raise MeshError(
            f"{what} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}: the batch is split over data x fsdp)"
        )


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles one global batch from every process's local share (rows in process order)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
