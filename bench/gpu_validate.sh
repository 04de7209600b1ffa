#!/usr/bin/env bash
# GPU validation of ltune's trainer and planner, in one device call: the GPU-only tests
# (pytest -m gpu) and the measurement checks of bench/gpu_validate/ (cuda_context,
# trainer_runs, memory_matrix, longest_context; see bench/gpu_validate/__init__.py).
#
# The device call (one call, <= 10 minutes; H100 80GB or H200), from the repository root, with
# the commit substituted (the device copy has no .git; commit first so the tree is clean):
#
#   run(command="LTUNE_COMMIT=<git rev-parse HEAD> bash bench/gpu_validate.sh",
#       carry=[".whl"], timeout_s=600)
#
# First, here: bash bench/fetch_wheels.sh (fills .whl). .whl (git-ignored) holds what the device image lacks or has too old: deepspeed 0.19.8 (no
# ops), pydantic 2.13 + pydantic_core (cp312) + annotated_types + typing_inspection +
# typing_extensions 4.15, hjson, and transformers 5.23.0 (the device has 5.17, which lacks
# transformers.integrations.deepspeed.prevent_arange_dtype_change that ltune's ZeRO-3 build
# imports). DeepSpeed's other needs (ninja, numpy, packaging, psutil, py-cpuinfo, tqdm,
# msgpack, einops, nvidia-ml-py) and pytest (with pluggy, iniconfig) are in the image (KINDS.md's
# package list); .whl/pytest/ holds pytest's wheels, installed only where the image lacks pytest.
#
# Time: the GPU tests get at most GPU_TESTS_TIMEOUT_S (default 120 s); the checks then get what
# is left of TOTAL_S (default 540 s, so the call ends well within its 600 s), at most 450 s.
#
# Writes under $OUT: results.json (rewritten after every check), log.txt (everything, the
# table printed last), gpu_tests.txt (pytest -m gpu's report) and gpu_tests.rc (its exit
# status). Then, here: cp /work/.device/.../results.json bench/results/<gpu>-<commit>.json
# (see bench/results/README.md). The exit status is the checks', else the tests'.
#
# Here, without a GPU (tiny sizes, CPU, gloo; ~4-5 min on 2 cores; the GPU tests are skipped):
#   bash bench/gpu_validate.sh --cpu-smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_validate_out}"
TOTAL_S="${TOTAL_S:-540}"
GPU_TESTS_TIMEOUT_S="${GPU_TESTS_TIMEOUT_S:-120}"
mkdir -p "$OUT"
: >"$OUT/log.txt"
if [[ " $* " != *" --cpu-smoke "* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "gpu_validate: wheel install failed" | tee -a "$OUT/log.txt"; exit 1; }
  if ! python3 -c "import pytest" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest/*.whl \
      || echo "gpu_validate: pytest missing and its wheels did not install" | tee -a "$OUT/log.txt"
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export LTUNE_COMMIT="${LTUNE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

# The GPU-only tests (tests/test_trainer_cuda.py, the CUDA test of tests/test_chunked_loss.py),
# which run nowhere else; a test module that fails to import is reported, the others still run.
# Third-party pytest plugins of the image are not loaded.
echo "== pytest -m gpu (timeout ${GPU_TESTS_TIMEOUT_S} s)" | tee -a "$OUT/log.txt"
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout -k 10 "$GPU_TESTS_TIMEOUT_S" \
  python3 -m pytest -p no:cacheprovider --continue-on-collection-errors -m gpu -rA tests >"$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
echo "$tests_rc" >"$OUT/gpu_tests.rc"
tail -n 15 "$OUT/gpu_tests.txt" | tee -a "$OUT/log.txt"
echo "== pytest -m gpu: exit $tests_rc$([[ $tests_rc == 124 ]] && echo ' (timed out)')" | tee -a "$OUT/log.txt"

# The checks: they stop starting probes so that they end within --budget-s.
budget_s=$(( TOTAL_S - SECONDS ))
(( budget_s > 450 )) && budget_s=450
(( budget_s < 60 )) && budget_s=60
python3 -m bench.gpu_validate --out "$OUT" --budget-s "$budget_s" "$@" 2>&1 | tee -a "$OUT/log.txt"
checks_rc=${PIPESTATUS[0]}
(( checks_rc != 0 )) && exit "$checks_rc"
exit "$tests_rc"
