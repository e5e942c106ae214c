#!/usr/bin/env bash
# Wheels for the packages that the lent GPU machine's image lacks and that
# bench/gpu_check.sh's steps 2-4 import (the adapter loader's google-re2; the
# server's FastAPI stack), for its Python 3.12, into .whl/ (gitignored).
# Run here, where pip reaches the index; then name .whl in the device run's
# carry, and bench/gpu_check.sh installs them into a temporary folder.
# The image already has (/work/.library/device/KINDS.md): anyio, h11, click,
# typing-extensions, annotated-doc, prometheus-client, httpx, transformers,
# tokenizers, safetensors, peft, pytest, pytest-xdist.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
# the versions of this project's venv, so that the GPU runs what the tests ran
wheels=(
    google-re2==1.1.20251105
    fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2
    pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
    uvicorn==0.55.0 python-multipart==0.0.34
)
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
du -sh .whl
