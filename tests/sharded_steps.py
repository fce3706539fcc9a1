"""Run by tests/test_train.py (test_meshes_give_the_one_device_parameters) in a fresh process
with 8 simulated CPU devices.

Trains the same model on the same three batches on one device and on meshes (data=8),
(data=4, fsdp=2), (data=2, fsdp=4), and prints one JSON line: for every mesh, the largest
elementwise parameter difference from the one-device run, and which arrays the fsdp axis
sharded; that given parameters (--init-from) land on an fsdp mesh unchanged; and the error for a
batch the mesh cannot split.
"""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sepvit_jax import sharding  # noqa: E402
from sepvit_jax.core.config import SepViTConfig  # noqa: E402
from sepvit_jax.train import optim, steps  # noqa: E402

MESHES = ("data=8", "data=4,fsdp=2", "data=2,fsdp=4")


# One stage (compiles in half the time of two): a 14x14 map in 2x2 windows of 7, so both the
# windowed and the among-windows attention run. Dropout is on: the masks must not depend on the
# sharding either. The rules shard arrays from 16,384 elements (the default is 4 MiB, more than
# this small model has), which takes the feed-forward kernels (64 x 256).
CONFIG = SepViTConfig(num_classes=10, dim=64, depth=(1,), heads=2, dim_head=16, dropout=0.1)
RULES = sharding.ShardingRules(fsdp_min_size=2**14)


def train_three_steps(mesh) -> tuple[dict, dict]:
    optim_cfg = optim.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=3)
    optimizer = optim.make_optimizer(optim_cfg)
    plan = steps.plan_state(CONFIG, optimizer, mesh, seed=0, rules=RULES)
    state, shardings = plan.build(), plan.shardings
    train_step = steps.make_train_step(plan.graphs, optimizer, optim_cfg, shardings, mesh)
    rng = np.random.default_rng(0)
    bsharding = sharding.batch_sharding(mesh)
    for _ in range(3):
        batch = {
            "image": rng.standard_normal((16, 56, 56, 3), dtype=np.float32),
            "label": rng.integers(0, 10, 16).astype(np.int32),
        }
        state, _ = train_step(state, sharding.global_batch(batch, bsharding))
    params = jax.device_get(nnx.to_pure_dict(state["params"]))
    specs = jax.tree.map(lambda s: str(s.spec), nnx.to_pure_dict(shardings["params"]))
    return params, specs


def max_abs_difference(a: dict, b: dict) -> float:
    """The largest elementwise difference over every parameter."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.abs(x - y).max()) for x, y in pairs)


def init_from_given_params(mesh, given: dict) -> float:
    """Difference between host parameters handed to init_state and the sharded state."""
    optimizer = optim.make_optimizer(optim.OptimConfig())
    state = steps.plan_state(CONFIG, optimizer, mesh, seed=1, rules=RULES, params=given).build()
    return max_abs_difference(jax.device_get(nnx.to_pure_dict(state["params"])), given)


def main() -> None:
    assert jax.device_count() == 8
    reference, _ = train_three_steps(sharding.make_mesh("data=1", devices=jax.devices()[:1]))
    result = {"meshes": {}}
    for spec in MESHES:
        params, specs = train_three_steps(sharding.make_mesh(spec))
        sharded = sorted(
            jax.tree_util.keystr(path)
            for path, s in jax.tree_util.tree_leaves_with_path(specs)
            if "fsdp" in s
        )
        result["meshes"][spec] = {
            "max_abs_diff": max_abs_difference(params, reference),
            "fsdp_sharded": sharded,
        }
    # Converted weights (--init-from) placed on an fsdp mesh: the same values, sharded.
    result["init_from_max_abs_diff"] = init_from_given_params(
        sharding.make_mesh("data=2,fsdp=4"), reference
    )
    try:
        sharding.check_batch_size(12, sharding.make_mesh("data=8"))
        result["bad_batch_error"] = None
    except ValueError as err:
        result["bad_batch_error"] = str(err)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
