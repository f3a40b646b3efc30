# Container images for the edgecom gRPC service.
#
#   docker build -t edgecom:0.1.0 .                      # runtime image (the last stage)
#   docker build --target test -t edgecom-test:0.1.0 .   # runtime deps + dev group + tests
#
# There is no lock file: uv resolves from pyproject.toml, and [tool.uv] exclude-newer
# pins the result, so the sync steps deliberately use neither --frozen nor --locked.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------
# build: the runtime virtual environment in /app/.venv, made by a pinned uv.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /app

# Dependencies first, so editing the service does not reinstall them.
COPY pyproject.toml .python-version ./
# Both default groups stay out of the runtime venv: dev (tests, linters) and
# embedded (the bundled PostgreSQL; a container always gets a database configured).
RUN uv sync --no-default-groups

# ---------------------------------------------------------------------------
# test: what `docker compose --profile test up` runs. The whole (filtered) build
# context is copied so the suite sees the same tree as a checkout.
# ---------------------------------------------------------------------------
FROM build AS test

# tests/test_edgecom_process.py makes its TLS certificates with the openssl command. The base
# image has it only as a dependency of ca-certificates, so it is asked for by name.
# Unpinned on purpose: the suite needs any openssl, and a pinned Debian revision would
# stop building as soon as a security update replaces it in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/*

RUN uv sync --no-default-groups --group dev

COPY . .

# `uv run` would otherwise re-sync the default groups, pulling the embedded
# PostgreSQL back in; the venv built above is already complete.
ENV UV_NO_SYNC=1 \
    PATH=/app/.venv/bin:$PATH

CMD ["uv", "run", "pytest"]

# ---------------------------------------------------------------------------
# runtime: the default target. Non-root, read-only friendly, python as PID 1.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="edgecom" \
      org.opencontainers.image.description="gRPC service over a PostgreSQL copy of EdgeCom Energy API time series" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"

# Bytecode is compiled below at build time; at run time the root filesystem may be
# read-only, so Python must not try to write .pyc files.
ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric UID/GID lets Kubernetes verify runAsNonRoot (runAsUser: 10001).
RUN groupadd --system --gid 10001 edgecom \
    && useradd --system --uid 10001 --gid edgecom --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin edgecom

WORKDIR /app

COPY --from=build /app/.venv /app/.venv
COPY *.py config.yaml ./
COPY proto/ proto/
COPY migrations/ migrations/
RUN python -m compileall -q ./*.py

# Application files stay root-owned: the service user can read but not change them.
USER 10001:10001

# gRPC (server.port) and Prometheus metrics (metrics.port, path /metrics).
EXPOSE 50051 9090

# `edgecom.py --health-check` asks the standard grpc.health.v1 service on server.port,
# reading the same config file (EDGECOM_CONFIG) and EDGECOM_* variables as the service,
# over TLS when server.tls is set: SERVING (exit 0) once the database is reachable and
# migrated, exit 1 otherwise. Pass a config file as EDGECOM_CONFIG, not --config, so the
# health check reads it too.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/edgecom.py", "--health-check"]

# The service flips health to NOT_SERVING and drains within server.grace_period.
STOPSIGNAL SIGTERM

# Exec form: python is PID 1 and receives SIGTERM itself. Extra arguments are
# appended, e.g. `docker run edgecom:0.1.0 --demo`.
ENTRYPOINT ["python", "/app/edgecom.py"]
CMD []
