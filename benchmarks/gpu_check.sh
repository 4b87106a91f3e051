#!/usr/bin/env bash
# The GPU check: the kernels' GPU tests and trimmed benchmarks on one GPU, in under 8 minutes.
#
#   benchmarks/gpu_check.sh [OUT]     # from the repository root; OUT defaults to $OUT or gpu_check/
#
# It uses the machine's own jax (0.10.2 through 0.11.x) and installs nothing from the network.
# The train-step rows import train.py, which needs grain, ml_collections and tensorboardX; a
# machine without them gets them from wheels in .whl/ when they are there, made beforehand on a
# machine with network access:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       grain==0.2.18 array_record==0.8.6 portpicker ml_collections==1.1.0 tensorboardX==2.6.5
#
# Steps, each under its own time limit (seconds, from the environment), each writing under OUT:
#   1. tests/test_gpu.py: the compiled kernels at the models' shapes against the f32 references
#      (bf16 by the error-ratio rule, gradients included)                 GPU_CHECK_TESTS_S=110
#   2. benchmarks/ops.py --quick: dense attention against cuDNN and jax's Triton kernel, windows,
#      routing, lightning against cuDNN's causal softmax, timed by CUPTI   GPU_CHECK_SUITE_S=50 each
#   3. benchmarks/models.py: one bf16 train step per family               GPU_CHECK_MODELS_S=140
# then OUT/gpu_check.json (every row, the environment, the test outcome) and OUT/gpu_check.md.
set -uo pipefail

out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the zoo's packages, not installed there
if ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
fi
if ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu_check.sh: expected a GPU (jax.default_backend() == 'gpu'); found $("$python" -c \
    'import jax; print(jax.devices())' 2>&1 | tail -1)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"

timeout "${GPU_CHECK_TESTS_S:-110}" "$python" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gpu.py --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log"

for suite in attention window routing lightning; do
  timeout "${GPU_CHECK_SUITE_S:-50}" "$python" benchmarks/ops.py --suite "$suite" --quick \
    --json "$out/ops_$suite.json" 2>&1 | tee "$out/ops_$suite.log"
done

timeout "${GPU_CHECK_MODELS_S:-140}" "$python" benchmarks/models.py --reps 5 \
  --models hornet_tiny_7x7 maxvit_tiny_tf_224 biformer_tiny itransformer_etth1_96 \
  transnormer_llm_385m matlm_olmo_180m --json "$out/models.json" 2>&1 | tee "$out/models.log"

"$python" benchmarks/gpu_check_report.py "$out"
