# syntax=docker/dockerfile:1
# The engine on NVIDIA GPUs (H100/H200): torch's CUDA 12.8 wheels (they bring Triton and the CUDA libraries),
# cuda-python for green contexts, and the embedded tiny model at /models/tiny-llama. Also holds `semipd operator`.
#   docker build -f docker/engine-cuda.Dockerfile -t ghcr.io/semipd/semipd-cuda:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/semipd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY operator/ operator/
COPY policy/ policy/
COPY bench/loadgen/ bench/loadgen/
COPY bench/sim/ bench/sim/
RUN /opt/semipd/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cu128 ".[engine,gpu]"
RUN /opt/semipd/bin/semipd tiny-model /models/tiny-llama

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PATH=/opt/semipd/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Triton compiles its small launcher module with the C compiler at first use, against Python's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/semipd /opt/semipd
COPY --from=build /models /models
# ubuntu 24.04 images ship a user 'ubuntu' with uid 1000; the pods run as uid 1000 (the operator's securityContext).
RUN id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /usr/sbin/nologin semipd
USER 1000:1000
# Triton's cache and the default model cache go under HOME; with readOnlyRootFilesystem the operator mounts one.
ENV HOME=/tmp/semipd
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["semipd"]
CMD ["serve", "--model", "/models/tiny-llama", "--host", "0.0.0.0", "--port", "8000"]
