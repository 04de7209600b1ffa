#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the Python 3.12 wheels that bench/gpu_validate.sh installs on
# the GPU machine, whose image lacks them or has older ones and cannot reach PyPI.
# Run here, from the repository root, before the device call that carries .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.15.0 hjson==3.1.0 transformers==5.23.0
# pytest for `pytest -m gpu`, installed there only where the image lacks it (its plugins would
# clash with a second pytest): a folder of its own, outside the .whl/*.whl that are always installed.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl/pytest pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
# deepspeed ships only as a source distribution; built with no ops it is pure Python.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
ls .whl .whl/pytest
