# The slim CPU image: the submission API, and also the webhook worker and Flower
# (neither needs torch). Build context = the repository root:
#
#   docker build -f deploy/docker/api.Dockerfile -t editfarm-api:dev .
#
# The project is installed with `pip install --no-deps .` on top of the pinned CPU runtime
# set in deploy/docker/requirements-api.txt: torch, diffusers and transformers are not in
# this image, so it cannot run render workers (see deploy/docker/worker.Dockerfile).

# ---- build: a virtualenv with the pinned runtime dependencies and the project ----------
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first: this layer is reused until requirements-api.txt changes.
COPY deploy/docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install --require-virtualenv -r /tmp/requirements-api.txt

# Then the project itself (no dependency resolution: the set above is the whole runtime).
COPY pyproject.toml README.md /src/
COPY api /src/api
COPY broker /src/broker
COPY cli /src/cli
COPY storage /src/storage
COPY workers /src/workers
# The wheel carries only the .py files: copy the packages' data files (api/ui/*) next to them.
RUN pip install --require-virtualenv --no-deps /src \
    && SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && cd /src \
    && find api broker cli storage workers -type f ! -name '*.py' ! -name '*.pyc' \
        -exec install -D -m 0644 {} "$SITE/{}" \; \
    && python -m compileall -q /opt/venv/lib/python3.11/site-packages

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

# tini is PID 1: it forwards SIGTERM to editfarm (uvicorn / Celery shut down gracefully on
# it) and reaps the zombies of exec probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 editfarm \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/editfarm \
       --shell /usr/sbin/nologin editfarm

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDITFARM_HOST=0.0.0.0 \
    EDITFARM_PORT=8000

WORKDIR /home/editfarm
# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001:10001

EXPOSE 8000

# Liveness of the API process. Compose overrides this for the webhook worker and Flower,
# which run from this image too; Kubernetes uses its own probes (/healthz, /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Exec form: no shell in between, SIGTERM reaches tini and then editfarm.
ENTRYPOINT ["/usr/bin/tini", "--", "editfarm"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
