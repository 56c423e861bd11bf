#!/usr/bin/env bash
# GPU check for a lent device machine (issue 8): items 1-3 of benchmarks/train_step.py on the GPU
# with ~0.5B and ~1.5B random-weight Qwen2 configs in bf16 compute (float32 master weights), at
# the paper's per-device shapes (SFT 4 x 2048 x 4 accumulation, DPO 2 pairs x 2048 x 16), and
# the projection residual with bf16 gradients under the default matmul precision vs float32;
# first, issue 2's projection-vs-byte-floor benchmark at k = 2 on 8 Qwen2-0.5B layers (119M
# parameters, 477 MB float32: well above the GPU's L2), where HBM serves reads and writes alike.
# Prints the tables last. Budget: < 9 minutes (each config writes its results as it finishes).
#
# No network there: it runs with the image's python3 (jax, flax, optax, chex, transformers are
# installed there). If the image's versions do not work with this code, carry pure-Python wheels
# (flax, optax, chex, orbax-checkpoint) in .whl, as the device README says:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl flax==0.12.12 optax==0.2.8
# and run it with carry [".whl"]. jaxlib and the CUDA plugin are too large to carry (> 64 MiB):
# the image's jax is used.
#
# Usage (from the repository root, on the device machine):  bash benchmarks/gpu_check.sh
#
# `bash benchmarks/gpu_check.sh scale` runs only the check of `ogpsa plan` and the cost model
# (issue 14, < 5 minutes): benchmarks/device_check.py plans SmolLM2-135M at the paper's
# per-device shapes (SFT 4 x 2048 x 4, bf16, remat=block, loss_chunk=512) on a virtual CPU
# device (peak memory, roofline step time and OGPSA overhead for this GPU), then runs the real
# step on the GPU with OGPSA off and with k = 2, and prints measured against predicted: peak
# bytes (device peak_bytes_in_use) and the OGPSA overhead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' || exit 1
if [ "${1:-}" = "scale" ]; then
  timeout 300 python3 benchmarks/device_check.py --preset tiny --stage sft --steps 5 \
    --set model.arch=smollm2_135m --set model.scan_unroll=1 --set model.dtype=bfloat16 \
    --set model.remat=block \
    --set model.loss_chunk=512 --set sft.batch_size=4 --set sft.accum_steps=4 \
    --set sft.max_length=2048 --json "$OUT_DIR/device_check.json"
  rc=$?
  echo "device check: exit status $rc (124 = cut at 300 s)"
  exit $rc
fi
timeout 90 python3 benchmarks/projection.py --layers 8 --reps 15 --ks 2 \
  --json "$OUT_DIR/projection_gpu.json" > "$OUT_DIR/projection_gpu.log" 2>&1
echo "projection benchmark: exit status $?"
grep '^|' "$OUT_DIR/projection_gpu.log" || tail -n 5 "$OUT_DIR/projection_gpu.log"
# 420 s for the train-step benchmark leaves the start and the transfers inside 9 minutes.
timeout 420 python3 benchmarks/train_step.py --gpu --reps 3 \
  --json "$OUT_DIR/train_step_gpu.json" > "$OUT_DIR/gpu_check.log" 2>&1
rc=$?
grep -v '^|' "$OUT_DIR/gpu_check.log" | tail -n 40
echo "exit status $rc (124 = cut at 420 s; the JSON holds the configs that finished)"
grep '^|' "$OUT_DIR/gpu_check.log" || python3 - "$OUT_DIR/train_step_gpu.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from train_step import table
print(table(json.load(open(sys.argv[1]))))
PY
exit $rc
