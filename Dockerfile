# syntax=docker/dockerfile:1
#
# dispatch — container image.
#
#   docker build -t dispatch .
#   docker run --rm -p 8080:8080 -e DISPATCH_AUTH_SECRET=... -v dispatch-data:/var/lib/dispatch dispatch
#
# Two stages: `builder` has compilers and builds a wheel for dispatch and for every dependency
# (with the `speed` extra: uvloop); the final image is python:3.11-slim with only those wheels
# installed into /opt/dispatch/.venv — no compiler, no pip cache, no source tree. It runs as the
# unprivileged user `dispatch` (uid 10001). See deploy/README.md for several instances on Redis.

ARG PYTHON_VERSION=3.11

# ------------------------------------------------------------------------------------ builder
# The full (non-slim) Debian image already ships gcc, make and the Python headers, so packages
# without a binary wheel for this platform still build.
FROM python:${PYTHON_VERSION}-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# .dockerignore lets in only pyproject.toml, setup.py, README.md and dispatch/ (plus config/ and
# static/, which the final stage copies). setup.py compiles the responder index's C search; the
# image insists on it (DISPATCH_REQUIRE_SPEEDUPS), so a broken compile fails the build.
COPY pyproject.toml setup.py README.md ./
COPY dispatch ./dispatch
RUN DISPATCH_REQUIRE_SPEEDUPS=1 pip wheel --wheel-dir /wheels ".[speed]"

# -------------------------------------------------------------------------------------- final
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/dispatch/.venv/bin:$PATH

# An unprivileged system user; its home is the data volume.
RUN groupadd --system --gid 10001 dispatch \
 && useradd --system --uid 10001 --gid dispatch --home-dir /var/lib/dispatch \
        --no-create-home --shell /usr/sbin/nologin dispatch \
 && mkdir -p /var/lib/dispatch \
 && chown dispatch:dispatch /var/lib/dispatch

# Install only the wheels built above: --no-index means nothing is fetched or compiled here. The
# wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/dispatch/.venv \
 && /opt/dispatch/.venv/bin/pip install --no-index --find-links=/wheels "dispatch[speed]" \
 && /opt/dispatch/.venv/bin/dispatch --help > /dev/null

# The wall-screen page and the configuration (the example points at the demo town in
# /etc/dispatch/demo/; mount your own /etc/dispatch, or single files, to run a real one).
COPY static /opt/dispatch/static
COPY config /etc/dispatch

# Defaults for a container; every one can be overridden with -e / `environment:`.
# The sqlite store is the single-instance default: set DISPATCH_STORE_URL=redis://… to run
# several instances (compose.yaml does). DISPATCH_AUTH_SECRET has no default: `serve` refuses to
# start without it.
ENV DISPATCH_SERVER_HOST=0.0.0.0 \
    DISPATCH_SERVER_PORT=8080 \
    DISPATCH_SERVER_STATIC_DIR=/opt/dispatch/static \
    DISPATCH_STORE_URL=sqlite:////var/lib/dispatch/dispatch.db \
    DISPATCH_LOG_FORMAT=json

WORKDIR /var/lib/dispatch
VOLUME ["/var/lib/dispatch"]
EXPOSE 8080

# Numeric, so that an orchestrator (runAsNonRoot) can tell it is not root; 10001 = dispatch.
USER 10001:10001

# Liveness: /healthz answers 200 while the process serves HTTP. (Readiness, /readyz, is what
# the load balancer checks.) The slim image has no curl: python's urllib raises — exit 1 — on
# a refused connection, a timeout or any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DISPATCH_SERVER_PORT', '8080'), timeout=4)"]

# The server handles SIGTERM itself (graceful shutdown within 10 s).
STOPSIGNAL SIGTERM
CMD ["dispatch", "serve", "--config", "/etc/dispatch/dispatch.toml"]
