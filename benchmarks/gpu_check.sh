#!/usr/bin/env bash
# GPU validation in one prepared run: build fastgen with CUDA for this device, run the tests marked `gpu` and
# the cuda/triton halves of the op tests, then time the benchmarks in order of value, within 8 minutes on an
# H100/H200; the report (JSON + markdown + log) goes to $OUT, else benchmarks/results/. The steps, their time
# limits and the report are fastgen/bench/gpu_check.py (also `fastgen bench --gpu-check`).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, once: diffusers and what it needs, as wheels in .whl/
#   bash benchmarks/gpu_check.sh --dry-run        # here: the same steps with CPU stand-ins
#   bash benchmarks/gpu_check.sh                  # on the lent GPU machine: device run, carry [".whl"]
#
# The GPU machine has no network and no diffusers (it has torch, Triton, nvcc, transformers, peft,
# torchmetrics): .whl/ travels with the run (git ignores it: .git/info/exclude) and is installed with
# --no-index into /tmp/site. Other arguments go to the Python driver (--budget-s, --only, --out).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# diffusers' own needs that the GPU image lacks (it has huggingface-hub, numpy, regex, requests, safetensors,
# filelock, Pillow); one version of each, pure Python.
WHEELS=("diffusers==0.42.1" "importlib-metadata==8.7.0")

case " $* " in
  *" --fetch-wheels "*)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # the GPU machine's python is 3.12; these are pure-Python wheels, so the platform tags only satisfy pip
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ;;
  *" --dry-run "*)
    exec "$PY" -m fastgen.bench.gpu_check "$@"
    ;;
esac

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_check: no .whl/ carried: the diffusers comparisons will be skipped (bash benchmarks/gpu_check.sh --fetch-wheels)"
fi
cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))") \
  || { echo "gpu_check: torch sees no CUDA device (use --dry-run on a CPU machine)"; exit 1; }
export FASTGEN_CUDA_ARCH=$cap MAX_JOBS=$(nproc)
echo "gpu_check: device capability $cap, building for it with $MAX_JOBS jobs"
exec "$PY" -m fastgen.bench.gpu_check "$@"
