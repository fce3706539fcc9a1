"""Run by tests/test_export.py (test_accelerator_programs_lower) in a fresh process with 8
simulated CPU devices: the TPU and CUDA programs, lowered (never compiled) on a CPU-only machine.

For each of tpu and cuda:
  - the exported forward (`sepvit_jax.stablehlo.exported_program`, float32 with a symbolic batch
    and bfloat16 with a fixed one), which goes through `jax.export`'s checks of the module
    (e.g. that every custom call is one a serialized program may keep);
  - the sharded training step (`sepvit_jax.train.steps`) on a ("data"=2, "fsdp"=4) mesh whose
    rules shard every array of 1,024 elements or more over fsdp, traced once and lowered with
    `Traced.lower(lowering_platforms=(platform,))`; the custom VJPs' backward passes are in it.

Prints one JSON line (`RESULT {...}`): per program and platform, whether it lowered (or the
error), the platforms it was lowered for, the custom-call targets, and marks of the text; and
which parameters the fsdp axis shards.
"""

import json
import os
import re
import sys
import traceback

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sepvit_jax import sharding  # noqa: E402
from sepvit_jax.checkpoint import model_from_params  # noqa: E402
from sepvit_jax.core import table  # noqa: E402
from sepvit_jax.core.config import get_config  # noqa: E402
from sepvit_jax.stablehlo import exported_program  # noqa: E402
from sepvit_jax.train import optim, steps  # noqa: E402

PLATFORMS = ("tpu", "cuda")
# Dropout on: the training step's random masks are lowered too.
CONFIG = get_config("testing", dropout=0.1)
RULES = sharding.ShardingRules(fsdp_min_size=2**10)


def marks(text: str) -> dict:
    """What the test checks in a StableHLO module's text."""
    return {
        "stablehlo_ops": len(re.findall(r"\bstablehlo\.\w+", text)),
        "main": "func.func public @main" in text,
        "custom_calls": sorted(set(re.findall(r"custom_call @(\w+)", text))),
        "num_partitions": [int(n) for n in re.findall(r"mhlo\.num_partitions = (\d+)", text)],
        "mesh": re.findall(r"sdy\.mesh @\w+ = <(\[[^\]]*\])>", text),
        "fsdp_shardings": len(re.findall(r"sdy\.sharding<@\w+, \[[^>]*\"fsdp\"", text)),
        "mhlo_shardings": text.count("mhlo.sharding"),
        "bytes": len(text),
    }


def attempt(fn) -> dict:
    try:
        return {"ok": True, **fn()}
    except Exception as err:  # reported, not raised: a failing platform must not hide the rest
        lines = traceback.format_exception_only(err)
        return {"ok": False, "error": " ".join("".join(lines).split())[:2000]}


def forward_programs(model) -> dict:
    result = {}
    for platform in PLATFORMS:
        for name, kwargs in (("float32_any_batch", {}), ("bfloat16_batch_4", {"batch": 4})):
            dtype = "bfloat16" if "bfloat16" in name else None

            def lower(platform=platform, kwargs=kwargs, dtype=dtype):
                exported = exported_program(
                    model, image_size=56, platforms=(platform,), dtype=dtype, **kwargs
                )
                return {
                    "platforms": list(exported.platforms),
                    "in_shapes": [str(a) for a in exported.in_avals],
                    **marks(exported.mlir_module()),
                }

            result[f"forward_{name}/{platform}"] = attempt(lower)
    return result


def train_step_programs() -> tuple[dict, list[str]]:
    mesh = sharding.make_mesh("data=2,fsdp=4")
    optim_cfg = optim.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=10)
    optimizer = optim.make_optimizer(optim_cfg)
    plan = steps.plan_state(CONFIG, optimizer, mesh, seed=0, rules=RULES)
    step = steps.make_train_step(plan.graphs, optimizer, optim_cfg, plan.shardings, mesh)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        plan.shapes,
        plan.shardings,
    )
    batch = steps.batch_spec(CONFIG, 16, 56, mesh)
    traced = step.trace(state, batch)  # once; each platform lowers the same trace
    result = {}
    for platform in PLATFORMS:

        def lower(platform=platform):
            lowered = traced.lower(lowering_platforms=(platform,))
            # The platforms the lowering was made for: not public API, hence the fallback.
            made_for = getattr(getattr(lowered, "_lowering", None), "_platforms", None)
            text = lowered.as_text()
            return {"platforms": list(made_for or []), **marks(text)}

        result[f"train_step/{platform}"] = attempt(lower)
    specs = nnx.to_pure_dict(plan.shardings["params"])
    sharded = sorted(
        jax.tree_util.keystr(path)
        for path, s in jax.tree_util.tree_leaves_with_path(specs)
        if "fsdp" in str(s.spec)
    )
    return result, sharded


def main() -> None:
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    params: dict = {}
    for row in table.weight_table(CONFIG):
        node = params
        for part in row.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[row.flax_path[-1]] = 0.1 * rng.standard_normal(row.flax_shape, np.float32)
    model = model_from_params(CONFIG, params)
    programs = forward_programs(model)
    train, sharded = train_step_programs()
    print("RESULT " + json.dumps({"programs": {**programs, **train}, "fsdp_sharded": sharded}))


if __name__ == "__main__":
    sys.exit(main())
