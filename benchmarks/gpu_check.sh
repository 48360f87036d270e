#!/usr/bin/env bash
# One prepared GPU session for the kernels (device time is scarce: run once, read, fix, rerun).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 0. the deviceless prediction (python -m elas_jax.aot, what CI's gate compiles): the 1B
#    steps' memory and per-kernel resources, to compare with the device's,
# 1. the GPU kernel tests (every FFN implementation compiled, vs the pure-jnp reference; the
#    stand-alone Triton ops),
# 2. the headline benchmark row (1B shapes, 64K tokens, masked) with a small tile sweep,
#    xla, triton and mosaic side by side (ffn_kernels times every implementation on a GPU),
# 3. the full preset (60M/350M/1B x 16K/64K/128K, masked) if time allows.
set -uo pipefail
OUT=${1:-${OUT:-results/gpu}}
mkdir -p "$OUT"
# The kernels are imported as elas_kernels (`pip install -e .` maps kernels/ to that name); on a
# machine where the project is not installed a symlink in a scratch directory does the same.
SHIM=$(mktemp -d) && ln -s "$PWD/kernels" "$SHIM/elas_kernels"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=".:$SHIM"
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/env.txt"
timeout 300 python -m elas_jax.aot --config configs/llama_1b.py:elas --target h200 --config.model.kernel=triton \
  --no-fit --json > "$OUT/aot_1b.json" 2> "$OUT/aot_1b.err"; tail -3 "$OUT/aot_1b.err"
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_ffn_core.py tests/test_kernels_triton.py \
  tests/test_sparse_mma.py 2>&1 \
  | tail -25 | tee "$OUT/tests.txt"
timeout 240 python -m benchmarks.ffn_kernels --preset gpu --sizes 1b --tokens 65536 --modes masked \
  --blocks 32x128,64x128,32x256,64x256 --no-peak_memory --out "$OUT/1b_64k" 2>&1 | tail -40
timeout 300 python -m benchmarks.ffn_kernels --preset gpu --modes masked,split --out "$OUT/all" 2>&1 | tail -60
