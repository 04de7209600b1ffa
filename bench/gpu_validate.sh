#!/usr/bin/env bash
# GPU validation of ltune's trainer and planner: issues 3 (section 4), 4 and 5 (GPU bullets).
#
# The device call (one call, <= 8 minutes; H100 80GB or H200), from the repository root, with
# the commit substituted (the device copy has no .git; commit first so the tree is clean):
#
#   run(command="LTUNE_COMMIT=<git rev-parse HEAD> bash bench/gpu_validate.sh",
#       carry=[".whl"], timeout_s=540)
#
# First, here: bash bench/fetch_wheels.sh (fills .whl). .whl (git-ignored) holds what the device image lacks or has too old: deepspeed 0.19.8 (no
# ops), pydantic 2.13 + pydantic_core (cp312) + annotated_types + typing_inspection +
# typing_extensions 4.15, hjson, and transformers 5.23.0 (the device has 5.17, which lacks
# transformers.integrations.deepspeed.prevent_arange_dtype_change that ltune's ZeRO-3 build
# imports). DeepSpeed's other needs (ninja, numpy, packaging, psutil, py-cpuinfo, tqdm,
# msgpack, einops, nvidia-ml-py) are in the image (KINDS.md's package list).
#
# Writes $OUT/results.json (rewritten after every phase) and $OUT/log.txt; the table is
# printed last. Then, here: cp /work/.device/.../results.json bench/results/<gpu>-<commit>.json
# (see bench/results/README.md).
#
# Here, without a GPU (tiny sizes, CPU, gloo; ~2-3 min on 2 cores):
#   bash bench/gpu_validate.sh --cpu-smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_validate_out}"
mkdir -p "$OUT"
if [[ " $* " != *" --cpu-smoke "* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "gpu_validate: wheel install failed" | tee "$OUT/log.txt"; exit 1; }
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  : >"$OUT/log.txt"
fi
export PYTHONUNBUFFERED=1
export LTUNE_COMMIT="${LTUNE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
# budget: the python run stops starting probes so that it ends within --budget-s (default 450 s)
python3 bench/gpu_validate.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
