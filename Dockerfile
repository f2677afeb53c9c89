# syntax=docker/dockerfile:1.7
# offline-conversions: a two-stage image. The builder makes a wheel of the project and installs it,
# with its pinned dependencies, into /opt/venv; the runtime stage copies only that venv.
# Both stages MUST use the same base image: the venv's interpreter is a symlink into it.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): metadata first, then the package and its schema.
# README.md* (a glob) is the long description pyproject names; the build does not fail without it.
COPY pyproject.toml README.md* ./
COPY consumer ./consumer
COPY schemas ./schemas

# Dependencies from binary wheels only (every pinned one has them for linux amd64 and arm64): no compiler
# in the build (it cost ~45 s of a 65 s build), and a platform without a wheel fails here, naming the
# package, instead of compiling something untested.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install --only-binary=:all: /wheels/*.whl \
 && offline-conversions --help >/dev/null

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="offline-conversions" \
      org.opencontainers.image.description="Streams offline purchases from Kafka into Kameleoon, Convert and Conductrics as experiment conversions." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without /etc/passwd lookups.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
 && mkdir -p /etc/offline-conversions

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /tmp

EXPOSE 9400
STOPSIGNAL SIGTERM

# /healthz is liveness only (the process answers); readiness is /readyz. No curl in slim: use Python.
# It probes [metrics] port (9400 by default): a config that moves the port sets this variable to match.
ENV OFFLINE_CONVERSIONS_HEALTHCHECK_PORT=9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ['OFFLINE_CONVERSIONS_HEALTHCHECK_PORT']; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["offline-conversions"]
CMD ["run", "--config", "/etc/offline-conversions/config.toml"]
