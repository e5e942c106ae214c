#!/usr/bin/env bash
# The one prepared check for a lent CUDA machine (python3 with torch + triton,
# no network, the project not installed). From any directory:
#
#     bash bench/gpu_check.sh                        # on the GPU: about 7.5 minutes at most
#     GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh   # here: the same plumbing in its CPU smoke forms
#
# Steps, each under its own timeout (1-4 run side by side, then 5 and 6 alone,
# since they time the GPU):
#   1 kernels    the Triton kernel, paged-attention and sampler tests on CUDA
#   2 model      the model-level exactness tests on the Triton path on CUDA
#                against transformers + PEFT (mixed adapters, DoRA, base rows, bf16)
#   3 engine     chunked prefill and preemption on CUDA equal each request alone
#                (bench/cuda_engine_check.py)
#   4 serve      a real `loramux serve` on CUDA: greedy, chat, adapter, seeded
#                sampling over HTTP (bench/cuda_serve_check.py)
#   5 roofline   LoRA kernels and paged decode attention as % of the HBM
#                roofline (bench/kernels.py, target 80%)
#   6 overhead   LoRA/base decode and prefill on a Llama-3-8B-shaped random
#                bf16 model (bench/lora_overhead.py --shape llama3-8b, target <= 1.10)
# then a summary table, last. A step whose Python packages are missing is
# reported "skipped: <package> missing". Packages the machine lacks can travel
# as wheels: bench/gpu_wheels.sh puts them in .whl/ (carry it); they are
# installed into a temporary folder first.
#
# GPU_CHECK_TOTAL_S (default 450) is the whole script's deadline: every
# step's timeout is cut to what is left of it. Budgets: steps 1-4 at most 150 s
# together (each its own timeout, 120-150 s), 5 at most 150 s (sweep budget 60 s),
# 6 at most 130 s; with the machine lines, about 7.5 minutes at worst.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
PY=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1  # PYTHONSAFEPATH: see the Makefile
unset LORAMUX_TRITON
[ "$DEVICE" = cuda ] && unset TRITON_INTERPRET
work=$(mktemp -d)
began=$SECONDS
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

# Nothing is installed there: the import names loramux.* come from links to
# the folders (what pyproject.toml's package-dir maps when installed).
mkdir -p "$work/ns/loramux"
for pkg in server kernels adapters_store bench; do ln -s "$PWD/$pkg" "$work/ns/loramux/$pkg"; done
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .whl/*.whl; then
        site="$work/site:"
        echo "installed $(find .whl -name '*.whl' | wc -l) carried wheels"
    else
        echo "the carried wheels in .whl/ did not install; going on without them"
    fi
fi
export PYTHONPATH="$work/ns:$site${PYTHONPATH:-}"

left() { echo $((TOTAL_S - (SECONDS - began))); }
# limit WANT [RESERVE]: WANT seconds, or less so that RESERVE seconds stay for later steps
limit() { local l=$(($(left) - ${2:-0})); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

# The first of these modules that does not import, as the package a user would install.
missing() {
    "$PY" - "$@" <<'EOF' 2>/dev/null || echo "python3"
import importlib, sys
names = {"re2": "google-re2", "yaml": "pyyaml"}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or module).split(".")[0]
        print(names.get(top, top) + (f" (for {module})" if top != module.split(".")[0] else ""))
        break
EOF
}

# step NAME SECONDS "MODULES" RESULT_REGEX CMD...: run CMD under a timeout of
# SECONDS; write NAME.status (ok | FAILED (rc N) | timed out | skipped: ...)
# and NAME.detail (the last log line matching RESULT_REGEX; else, when it
# failed, the log's last line).
step() {
    local name=$1 secs=$2 mods=$3 pattern=$4; shift 4
    local log="$work/$name.log" miss rc
    if [ "$secs" -lt 20 ]; then echo "skipped: out of time" >"$work/$name.status"; return; fi
    # shellcheck disable=SC2086  # MODULES is a list
    miss=$(missing $mods)
    if [ -n "$miss" ]; then echo "skipped: $miss missing" >"$work/$name.status"; return; fi
    timeout -k 10 "$secs" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) echo ok ;;
        124|137) echo "timed out after $secs s" ;;
        *) echo "FAILED (rc $rc)" ;;
    esac >"$work/$name.status"
    grep -aE "$pattern" "$log" | tail -1 >"$work/$name.detail"
    [ "$rc" != 0 ] && [ ! -s "$work/$name.detail" ] && tail -n 1 "$log" >"$work/$name.detail"
    return 0
}

echo "== machine =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device: run with GPU_CHECK_DEVICE=cpu for the CPU smoke forms"
    exit 1
fi

kernel_tests=(tests/test_kernels_triton.py tests/test_sampling.py)
[ -f tests/test_paged_attention_triton.py ] && kernel_tests+=(tests/test_paged_attention_triton.py)
# The model tests of the Triton path (ids name it; the pool-layout test's ids are 0/1); on
# CUDA they put the model there (tests/helpers/tiny.py TRITON_DEVICE, tests/conftest.py).
model_tests=(tests/test_model.py tests/test_dora.py tests/test_bf16.py)
model_select="triton or pool_layout_and_dtype"
pytest_opts=(-q -p no:cacheprovider)
kernel_workers=() model_workers=()  # pytest-xdist where present: Triton compiles on several cores
if [ -z "$(missing xdist)" ]; then kernel_workers=(-n 4) model_workers=(-n 3); fi
if [ "$DEVICE" = cpu ]; then
    # here: the selections must collect; the tests themselves run in `make test`
    pytest_opts+=(--collect-only)
    engine_args=(--device cpu --requests 8)
    kernel_args=(--quick --budget-s 20)
    overhead_args=(--shape tiny --device cpu --dtype float32 --repeats 3)
else
    engine_args=(--device cuda --requests 24)
    kernel_args=(--budget-s 60)
    overhead_args=(--shape llama3-8b --device cuda --dtype bfloat16 --repeats 7)
fi
pytest_pattern='([0-9]+ (passed|failed|errors?|tests? collected|skipped))|no tests ran|ERROR'

echo "== steps 1-4 side by side (logs at the end) =="
# one process group each, so that a timeout or the exit trap ends the whole step
set -m
step kernels "$(limit 150 280)" "pytest triton" "$pytest_pattern" \
    "$PY" -m pytest "${pytest_opts[@]}" "${kernel_workers[@]}" "${kernel_tests[@]}" &
pids+=($!)
step model "$(limit 150 280)" "pytest triton transformers peft safetensors loramux.adapters_store.peft_format" \
    "$pytest_pattern" "$PY" -m pytest "${pytest_opts[@]}" "${model_workers[@]}" -k "$model_select" "${model_tests[@]}" &
pids+=($!)
step engine "$(limit 120 280)" "transformers safetensors loramux.server.llm" "engine check" \
    "$PY" bench/cuda_engine_check.py "${engine_args[@]}" &
pids+=($!)
step serve "$(limit 150 280)" "transformers tokenizers safetensors loramux.server.llm loramux.server.api.app uvicorn" \
    "serve check" "$PY" bench/cuda_serve_check.py --device "$DEVICE" &
pids+=($!)
wait
set +m
pids=()
for name in kernels model engine serve; do
    echo "== $name: $(cat "$work/$name.status") =="
    [ -f "$work/$name.log" ] && tail -n 40 "$work/$name.log"
done

echo "== 5 roofline: kernel benchmark =="
step roofline "$(limit 150 130)" "triton" "Error" \
    "$PY" bench/kernels.py "${kernel_args[@]}" --summary "$work/roofline.rows"
[ -f "$work/roofline.log" ] && cat "$work/roofline.log"

echo "== 6 overhead: LoRA/base on $([ "$DEVICE" = cpu ] && echo tiny || echo Llama-3-8B) shapes =="
step overhead "$(limit 130 5)" "transformers safetensors loramux.bench.lora_overhead" "Error" \
    "$PY" bench/lora_overhead.py "${overhead_args[@]}" --summary "$work/overhead.rows"
[ -f "$work/overhead.log" ] && cat "$work/overhead.log"

echo
echo "== gpu_check summary ($DEVICE, $((SECONDS - began)) s of $TOTAL_S) =="
all_ok=1
row() { printf '%-58s  %s\n' "$1" "$2"; }
for name in kernels model engine serve roofline overhead; do
    status=$(cat "$work/$name.status" 2>/dev/null || echo "not run")
    detail=$(cat "$work/$name.detail" 2>/dev/null)
    case $status in ok) ;; "skipped: out of time") all_ok=0 ;; skipped*) ;; *) all_ok=0 ;; esac
    case $name in
        kernels) what="1 kernel tests (${#kernel_tests[@]} files)" ;;
        model) what="2 model exactness tests (Triton path)" ;;
        engine) what="3 engine: chunked prefill + preemption" ;;
        serve) what="4 loramux serve over HTTP" ;;
        roofline) what="5 kernel roofline benchmark" ;;
        overhead) what="6 end-to-end LoRA overhead" ;;
    esac
    row "$what" "$status${detail:+: $detail}"
    [ -s "$work/$name.rows" ] && cat "$work/$name.rows"
done
[ "$all_ok" = 1 ]
