#!/usr/bin/env bash
# The GPU half of the benchmarks in one go, for a machine with one NVIDIA GPU and its own
# CUDA builds of jax and torch (nothing is installed from the network):
#
#   bash benchmarks/on_gpu.sh            # writes into $OUT (default: benchmarks/results/gpu-run)
#
# 1. a smoke test of the model on the GPU; if the machine's flax cannot run it, flax is
#    installed from wheels placed in .whl/ (pip download flax==<our version>);
# 2. `python -m benchmarks` on the GPU in bfloat16: the throughput table with MFU and peak
#    device memory (gpu.md, gpu.json);
# 3. the golden-fixture and torch-vs-Flax equivalence tests with JAX on the GPU (equivalence.log).
# Each stage has its own time limit (BENCH_TIMEOUT_S, TESTS_TIMEOUT_S), so a slow stage cannot
# cost the others their results; the benchmark's files are rewritten after every measurement.
# On an H200 the benchmark took about 8 minutes (torch.compile compiling most of it) and the
# tests a little over 2: on a lease of 10-minute calls, run the stages in separate calls with
# STAGES=bench and STAGES=tests.
set -uo pipefail
OUT=$(realpath -m "${OUT:-$(dirname "${BASH_SOURCE[0]}")/results/gpu-run}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

smoke='
import jax, jax.numpy as jnp, flax
from flax import nnx
from sepvit_jax import SepViT, get_config
assert jax.devices()[0].platform == "gpu", f"JAX sees no GPU: {jax.devices()}"
model = SepViT.from_config(get_config("digits"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
print("smoke:", jax.devices()[0].device_kind, "jax", jax.__version__, "flax", flax.__version__,
      model(jnp.ones((2, 56, 56, 1))).shape)
'
if ! "$PY" -c "$smoke"; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "the model does not run here, and .whl/ is empty"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    "$PY" -c "$smoke" || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    | tee "$OUT/nvidia-smi.csv"

stages=" ${STAGES:-bench tests} "
if [[ $stages == *" bench "* ]]; then
    timeout "${BENCH_TIMEOUT_S:-540}" "$PY" -m benchmarks --device gpu --no-conversion \
        --repeats 5 --min-repeat-s 0.5 --warmup 3 --timeout 150 \
        --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.log"
fi
if [[ $stages == *" tests "* ]]; then
    timeout "${TESTS_TIMEOUT_S:-300}" "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_golden.py tests/test_sweep.py 2>&1 | tee "$OUT/equivalence.log"
fi
