# syntax=docker/dockerfile:1
# The operator alone (`semipd operator`): the base install, no torch or other engine packages (about 150 MB).
#   docker build -f docker/operator.Dockerfile -t ghcr.io/semipd/semipd-operator:0.1.0 .
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
RUN /opt/semipd/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/semipd/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/semipd /opt/semipd
RUN groupadd --gid 1000 semipd && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin semipd
USER 1000:1000
WORKDIR /home/semipd
# The chart probes /healthz (liveness) and /readyz (readiness) on this port; this is for plain `docker run`.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["semipd", "operator"]
