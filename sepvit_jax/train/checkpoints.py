"""Orbax checkpoints of a training run: train state + the Grain iterator's position.

Layout: `runs/NAME/checkpoints/<step>/{state,data}`. `state` is the sharded train state of
`sepvit_jax.train.steps` (typed PRNG keys stored as their raw uint32 data); `data` holds one JSON
file per process with that process's iterator state, so `--resume` continues bitwise exactly.
Saves are asynchronous (arrays are copied to host before `save` returns, so the donated buffers
may be reused at once); the manager keeps the last `keep` checkpoints plus the best `keep` by
test accuracy. All processes call every method; Orbax coordinates the writes.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def abstract_saveable(state, shardings):
    """ShapeDtypeStructs (with shardings) of `to_saveable(state)`, the restore target."""

    def one(x, s):
        x = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, state, shardings)


def from_saveable(saved, like):
    """Re-wraps raw key data as typed keys where `like` (arrays or abstract) has typed keys.

    The keys were made by `jax.random.key`, i.e. with the default PRNG implementation, which
    `wrap_key_data` assumes too (`key_impl` cannot read an abstract restore target).
    """

    def one(x, ref):
        return jax.random.wrap_key_data(x) if _is_key(ref) else x

    return jax.tree.map(one, saved, like)


def _test_accuracy(metrics: dict) -> float:
    return metrics["test_accuracy"]


class Checkpoints:
    """The CheckpointManager of one run directory.

    Args:
      directory: where the numbered step directories go.
      keep: how many recent checkpoints to keep (and as many best by accuracy).
      create: make `directory` if missing (not for a read-only use such as --eval-only).
    """

    def __init__(self, directory: str | Path, keep: int = 2, *, create: bool = True):
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(
                    get_metric_fn=_test_accuracy,
                    reverse=False,
                    n=keep,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # best_fn also makes Orbax write each step's metrics to disk, so that the best
            # checkpoints are still known (and kept) after a resume.
            best_fn=_test_accuracy,
            best_mode="max",
            enable_async_checkpointing=True,
            create=create,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator=None, metrics: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(to_saveable(state))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, state_like, shardings, iterator=None, step: int | None = None):
        """Restores `step` (default: latest) into arrays placed by `shardings`."""
        step = self.manager.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_saveable(state_like, shardings))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return from_saveable(restored["state"], state_like), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
