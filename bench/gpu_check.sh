#!/usr/bin/env bash
# Kernel check for a lent CUDA machine (python3 with torch + triton, nothing
# else installed, no network). From any directory:
#
#     bash bench/gpu_check.sh
#
# 1. the Triton kernel tests and the sampler's seeded-generator tests on CUDA
#    (tests/test_kernels_triton.py and tests/test_sampling.py import only
#    torch, triton, kernels, loramux.server.engine.sampling, pytest);
# 2. the kernel benchmark (bench/kernels.py): the two H200 targets first,
#    then a sweep of decode/prefill shapes cut off by a time budget;
# 3. a summary table, last.
# Each step has a timeout so the whole script ends within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET LORAMUX_TRITON
export PYTHONDONTWRITEBYTECODE=1
work=$(mktemp -d)
began=$SECONDS
# Nothing is installed there: the import names loramux.* come from links to
# the folders (what pyproject.toml's package-dir maps when installed).
mkdir -p "$work/ns/loramux"
for pkg in server kernels adapters_store bench; do ln -s "$PWD/$pkg" "$work/ns/loramux/$pkg"; done
export PYTHONPATH="$work/ns${PYTHONPATH:+:$PYTHONPATH}"

echo "== machine =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'

echo "== tests (CUDA) =="
if python3 -c 'import pytest' 2>/dev/null; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_sampling.py 2>&1 | tee "$work/tests.txt"
    tests_rc=${PIPESTATUS[0]}
    tests_line=$(grep -E '(passed|failed|error)' "$work/tests.txt" | tail -1)
else
    tests_rc=1
    tests_line="pytest is not installed: tests not run"
    echo "$tests_line"
fi
[ "$tests_rc" = 124 ] && tests_line="timed out after 240 s: $tests_line"

echo "== kernel benchmark =="
timeout 210 python3 bench/kernels.py --budget-s 120 --summary "$work/summary.txt" 2>&1 | tee "$work/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "== gpu_check summary ($((SECONDS - began)) s) =="
printf '%-58s  %s\n' "kernel tests (rc $tests_rc)" "${tests_line:-no result}"
if [ -s "$work/summary.txt" ]; then
    cat "$work/summary.txt"
else
    printf '%-58s  %s\n' "kernel benchmark" "failed (rc $bench_rc): $(tail -1 "$work/bench.txt")"
fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
