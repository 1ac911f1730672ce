"""A whole editfarm cluster on one machine, as real processes: the engine of `editfarm dev`,
`editfarm demo` and the integration tests.

Redis (given, or started locally with AOF), a real S3 server (SeaweedFS, data under the
workdir) with the bucket created, the API (uvicorn), render worker(s) and a webhook worker
(Celery prefork), each its own process with ``EDITFARM_`` settings in its environment.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from broker.celery_app import RENDER_QUEUE_ORDER
from broker.queues import RenderQueue
from cli.lifetime import parent_death_signal
from cli.localservices import (
    ManagedProcess,
    ServiceDied,
    free_port,
    start_moto,
    start_redis,
    start_s3,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent

MANAGED_SETTINGS = frozenset({
    # the services the cluster runs and its credentials: the cluster sets them
    "EDITFARM_REDIS_URL", "EDITFARM_S3_ENDPOINT_URL", "EDITFARM_S3_BUCKET", "EDITFARM_S3_ACCESS_KEY_ID",
    "EDITFARM_S3_SECRET_ACCESS_KEY", "EDITFARM_API_KEYS", "EDITFARM_WEBHOOK_SECRET", "EDITFARM_MODEL",
    "EDITFARM_MODELS_FILE", "EDITFARM_DEVICE",
    # one process's identity and files: shared by two processes they would clash
    "EDITFARM_WORKER_ROLE", "EDITFARM_WORKER_MODEL", "EDITFARM_WORKER_NAME", "EDITFARM_WORKER_INSTANCE", "EDITFARM_READY_FILE",
    "EDITFARM_HEARTBEAT_FILE", "EDITFARM_METRICS_PORT",
})


def exported_settings(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The ``EDITFARM_`` settings in ``environ`` that a cluster passes on to its processes as they
    are (a renderer, the URL policy, limits…): all but :data:`MANAGED_SETTINGS`."""
    return {k: v for k, v in environ.items() if k.startswith("EDITFARM_") and k not in MANAGED_SETTINGS}


@dataclass
class ClusterConfig:
    workdir: Path
    redis_url: str | None = None          # None → start a local Redis
    model: str | None = None              # None → build the tiny model in workdir
    # a model catalog (EDITFARM_MODELS_FILE) instead of the one model; then render_pools says how many
    # render workers serve each of its models (model name → count) and render_workers is not used
    models_file: Path | None = None
    render_pools: dict[str, int] = field(default_factory=dict)
    api_port: int | None = None
    render_workers: int = 1
    device: str = "cpu"
    api_keys: str = ""                    # "tenant:key,..."; empty → one random dev key
    webhook_secret: str = ""              # empty → a random whsec_ secret
    extra_env: dict[str, str] = field(default_factory=dict)
    quiet: bool = True
    redis_appendfsync: str = "everysec"   # "always": a SIGKILLed Redis loses no write (fault tests)
    # settings the user exported (`editfarm dev`: exported_settings(os.environ)); they override the
    # cluster's local-development defaults, not what it manages (MANAGED_SETTINGS) nor extra_env
    user_env: dict[str, str] = field(default_factory=dict)
    # every process started gets killed by the kernel if this one dies, even by SIGKILL
    # (cli/lifetime.py; only when the cluster is started from the main thread)
    die_with_parent: bool = False
    s3_server: str = "seaweedfs"          # "moto": the mock, for benchmarks that compare the two


class LocalCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (also a context manager)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.workdir = config.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis: ManagedProcess | None = None
        self.s3: ManagedProcess | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.api_keys = config.api_keys or f"dev:ef_{secrets.token_urlsafe(24)}"
        self.webhook_secret = config.webhook_secret or "whsec_" + __import__("base64").b64encode(
            secrets.token_bytes(24)).decode()
        self.api_port = config.api_port or free_port()
        self.redis_url = config.redis_url or ""
        self.env: dict[str, str] = {}
        self.metrics_ports: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        try:
            self._start_services()
            self.env = self._environment()
            self.start_api()
            self.start_webhook_worker()
            if self.config.models_file is not None:
                pools = [model for model, count in self.config.render_pools.items() for _ in range(count)]
                for index, model in enumerate(pools):
                    self.start_render_worker(index, model=model)
            else:
                for index in range(self.config.render_workers):
                    self.start_render_worker(index)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_process(name)
        for managed in (self.s3, self.redis):
            if managed is not None:
                managed.stop()

    # -- parts -------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_url(self) -> str:
        assert self.s3 is not None
        return self.s3.url

    def api_key(self, tenant: str | None = None) -> str:
        pairs = [p.split(":", 1) for p in self.api_keys.split(",") if ":" in p]
        for t, key in pairs:
            if tenant is None or t == tenant:
                return key
        raise KeyError(tenant)

    def _start_services(self) -> None:
        log_dir = self.workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        if not self.redis_url:
            self.redis = start_redis(workdir=self.workdir / "redis", log=log_dir / "redis.log",
                                     appendfsync=self.config.redis_appendfsync,
                                     die_with_parent=self.config.die_with_parent)
            self.redis_url = f"redis://127.0.0.1:{self.redis.port}/0"
        if self.config.s3_server == "moto":
            self.s3 = start_moto(log=log_dir / "s3.log", bucket="editfarm", die_with_parent=self.config.die_with_parent)
        else:
            self.s3 = start_s3(log=log_dir / "s3.log", workdir=self.workdir / "s3", bucket="editfarm",
                               die_with_parent=self.config.die_with_parent)
        if not self.config.model and self.config.models_file is None:
            model_dir = self.workdir / "models" / "tiny-edit"
            if not (model_dir / "model_index.json").exists():
                subprocess.run([sys.executable, "-m", "cli.main", "model", "tiny", str(model_dir)],
                               check=True, cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=self._guard())
            self.config.model = str(model_dir)

    def _guard(self) -> Callable[[], None] | None:
        """The ``preexec_fn`` of a child process: dies with this one if the config asks for it."""
        return parent_death_signal() if self.config.die_with_parent else None

    def _environment(self) -> dict[str, str]:
        # this process's EDITFARM_ settings reach the cluster only through user_env: a test's or a
        # shell's leftovers must not configure it by accident
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
        env.update({
            # local development: webhooks and image URLs on loopback over http are allowed
            "EDITFARM_WEBHOOK_ALLOW_PRIVATE": "true",
            "EDITFARM_WEBHOOK_ALLOW_HTTP": "true",
            "EDITFARM_ALLOW_PRIVATE_URLS": "true",
            "EDITFARM_ALLOW_HTTP_URLS": "true",
            # the web UI and `jobs watch` show them; cheap on the tiny model
            "EDITFARM_PREVIEW_EVERY_N_STEPS": "2",
            # everything the cluster writes stays in its workdir
            "EDITFARM_LORA_CACHE_DIR": str(self.workdir / "loras"),
        })
        env.update(self.config.user_env)
        env.update({
            "EDITFARM_REDIS_URL": self.redis_url,
            "EDITFARM_S3_ENDPOINT_URL": self.s3_url,
            "EDITFARM_S3_BUCKET": "editfarm",
            "EDITFARM_S3_ACCESS_KEY_ID": "test",
            "EDITFARM_S3_SECRET_ACCESS_KEY": "test",
            "EDITFARM_API_KEYS": self.api_keys,
            "EDITFARM_WEBHOOK_SECRET": self.webhook_secret,
            **({"EDITFARM_MODELS_FILE": str(self.config.models_file)} if self.config.models_file is not None
               else {"EDITFARM_MODEL": str(self.config.model)}),
            "EDITFARM_DEVICE": self.config.device,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.config.extra_env)
        return env

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            args, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self._guard(),
        )

    def start_api(self) -> None:
        self._spawn("api", [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
                            "--host", "127.0.0.1", "--port", str(self.api_port), "--log-level", "warning"])

    def start_render_worker(self, index: int, extra_env: dict[str, str] | None = None,
                            queues: tuple[str, ...] | None = None, model: str | None = None) -> str:
        """Start render worker ``index`` serving ``model`` (None: the catalog's only one) on its model's
        queues, or on ``queues``; its node is ``render<index>[-<model>]@local``."""
        name = f"render{index}"
        ready = self.workdir / "ready" / f"{name}.ready"
        ready.unlink(missing_ok=True)
        self.metrics_ports[name] = free_port()
        if queues is None:
            queues = RenderQueue(model=model).order if model else RENDER_QUEUE_ORDER
        node = f"{name}-{model}@local" if model else f"{name}@local"
        self._spawn(name, [sys.executable, "-m", "celery", "-A", "workers.celery_worker:app", "worker",
                           "-Q", ",".join(queues), "-P", "prefork", "-c", "1", "-n", node,
                           "-E", "--without-gossip", "--without-mingle", "-l", "INFO"],
                    {"EDITFARM_WORKER_ROLE": "render", "EDITFARM_READY_FILE": str(ready),
                     **({"EDITFARM_WORKER_MODEL": model} if model else {}),
                     "EDITFARM_HEARTBEAT_FILE": str(self.workdir / "ready" / f"{name}.heartbeat"),
                     "EDITFARM_METRICS_PORT": str(self.metrics_ports[name]), **(extra_env or {})})
        return name

    def start_webhook_worker(self) -> None:
        self.metrics_ports["webhooks"] = free_port()
        self._spawn("webhooks", [sys.executable, "-m", "celery", "-A", "workers.celery_worker:app", "worker",
                                 "-Q", "webhooks", "-P", "threads", "-c", "8", "-n", "webhooks@local", "-E",
                                 "--without-gossip", "--without-mingle", "-l", "INFO"],
                    {"EDITFARM_WORKER_ROLE": "webhooks", "EDITFARM_METRICS_PORT": str(self.metrics_ports["webhooks"]),
                     "EDITFARM_HEARTBEAT_FILE": str(self.workdir / "ready" / "webhooks.heartbeat")})

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20,
                     group: bool = True) -> int | None:
        """Signal a process (its whole group, or like Kubernetes only the main process) and wait.

        Returns its exit code; SIGKILLs the group after ``timeout_s``.
        """
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Wait for the API to answer /readyz and every render worker to write its ready file."""
        def api_ready() -> bool:
            return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        wait_until(api_ready, timeout_s, "API")
        for name in self.procs:
            if name.startswith("render"):
                self.wait_worker_ready(name, timeout_s)

    def wait_worker_ready(self, name: str, timeout_s: float = 120) -> None:
        ready = self.workdir / "ready" / f"{name}.ready"
        proc = self.procs[name]

        def check() -> bool:
            if proc.poll() is not None:
                raise ServiceDied(f"{name} exited: see {self.workdir / 'logs' / (name + '.log')}")
            return ready.exists()
        wait_until(check, timeout_s, name, interval_s=0.1)
