# syntax=docker/dockerfile:1
# The engine on CPU (`semipd serve --device cpu`), with torch's CPU wheels and the embedded tiny model baked in at
# /models/tiny-llama (what the chart's example SemiPDService serves). Also holds `semipd operator`.
#   docker build -f docker/engine-cpu.Dockerfile -t ghcr.io/semipd/semipd-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/semipd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY operator/ operator/
COPY policy/ policy/
COPY bench/loadgen/ bench/loadgen/
COPY bench/sim/ bench/sim/
RUN /opt/semipd/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[engine]"
# The tiny random model (no network), so the image serves something out of the box.
RUN /opt/semipd/bin/semipd tiny-model /models/tiny-llama

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/semipd/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/semipd /opt/semipd
COPY --from=build /models /models
RUN groupadd --gid 1000 semipd && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin semipd
USER 1000:1000
# Caches (torch, the default model cache) go under HOME; with readOnlyRootFilesystem the operator mounts /tmp.
ENV HOME=/tmp/semipd
# The operator gives engine pods startup, readiness and liveness probes on GET /health; this is for `docker run`.
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["semipd"]
CMD ["serve", "--model", "/models/tiny-llama", "--device", "cpu", "--host", "0.0.0.0", "--port", "8000"]
