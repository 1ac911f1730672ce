# The GPU render worker image: CUDA runtime base + CUDA torch + the project. Build context =
# the repository root:
#
#   docker build -f deploy/docker/worker.Dockerfile -t editfarm-worker:dev .
#
# torch 2.14.1 from PyPI is built against CUDA 13.0 and brings its CUDA libraries as wheels
# (cuda-toolkit, nvidia-cudnn-cu13, ...); the base image matches that CUDA major and sets the
# NVIDIA container runtime variables. Host requirement: an NVIDIA driver that supports
# CUDA 13.0 (R580 or newer) and the NVIDIA container toolkit / Kubernetes device plugin.
#
# Model weights are NOT baked in (~40 GB): mount a folder and point EDITFARM_MODEL at it.

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Ubuntu 24.04's CPython 3.12 (the project needs >= 3.11); tini as PID 1 forwards SIGTERM
# to the Celery main process (warm shutdown = drain) and reaps exec-probe zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 editfarm \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/editfarm \
       --shell /usr/sbin/nologin editfarm \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH

# 1. torch, pinned (the largest layer, and the one that changes least). Same pins as the
#    Makefile's TORCH_SPEC: an unpinned resolver may pick other builds.
RUN pip install --require-virtualenv torch==2.14.1 torchvision==0.29.1

# 2. The dependencies: the pinned CPU runtime set shared with the slim image (Celery, Redis,
#    boto3, prometheus-client, ...) plus those of pyproject.toml (diffusers, transformers, ...),
#    with torch held at the pins above. Reused until either file changes.
COPY pyproject.toml deploy/docker/requirements-api.txt /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements-project.txt \
    && printf 'torch==2.14.1\ntorchvision==0.29.1\n' > /tmp/constraints.txt \
    && pip install --require-virtualenv -c /tmp/constraints.txt \
        -r /tmp/requirements-api.txt -r /tmp/requirements-project.txt

# 3. The project itself.
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
    && cd / && rm -rf /src \
    && python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"

# Writable places for a read-only root filesystem: the ready/heartbeat files live in
# /tmp/editfarm; Hugging Face caches default under HOME (mount a volume at HF_HOME).
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/editfarm \
    HF_HOME=/home/editfarm/.cache/huggingface \
    EDITFARM_DEVICE=cuda \
    EDITFARM_READY_FILE=/tmp/editfarm/ready \
    EDITFARM_HEARTBEAT_FILE=/tmp/editfarm/heartbeat \
    EDITFARM_METRICS_PORT=9100

WORKDIR /home/editfarm
# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001:10001

# Prometheus metrics
EXPOSE 9100

# Healthy = model loaded and warmed up (ready file) and the heartbeat is fresh. Loading ~40 GB
# of weights takes minutes: failures during the start period do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["sh", "-c", "editfarm probe ready && editfarm probe live --max-age-s 60"]

# Exec form: SIGTERM goes tini -> editfarm (the Celery main process), which finishes the
# running job (or hands it back after EDITFARM_DRAIN_TIMEOUT_S) and takes no new one.
ENTRYPOINT ["/usr/bin/tini", "--", "editfarm"]
CMD ["worker", "--gpus", "all"]
