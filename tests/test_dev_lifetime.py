"""`editfarm dev` as a user runs it (issue 16.7, 16.9): real processes, found through /proc.

`python -m cli.main dev` starts in a subprocess with a workdir under tmp and a marker variable in
its environment, which every process it starts inherits (Redis, the S3 server, the API, the workers
and their pool children). Once the cluster is up: the settings the user exported reach the
processes, a LoRA is cached under the workdir, and after SIGTERM, SIGHUP or SIGKILL of the command
no process carrying the marker is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from cli.cluster import ROOT
from cli.localservices import free_port, wait_until
from tests.e2e_support import API_KEYS, auth

pytestmark = pytest.mark.integration

MARK = "DEVTEST_MARK_"  # not an EDITFARM_ setting: a plain variable every process inherits


def processes_of(marker: str, workdir: Path) -> dict[int, str]:
    """Live processes (not zombies) whose environment holds ``marker`` or whose working directory
    is in ``workdir`` (Redis rewrites its environment area with its process title, and works in
    its --dir), as pid → command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker.encode() not in (entry / "environ").read_bytes() and \
                    not Path(os.readlink(entry / "cwd")).is_relative_to(workdir):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


class Dev:
    """One `editfarm dev` command in a subprocess, its output in a file."""

    def __init__(self, tmp: Path, exported: dict[str, str]) -> None:
        self.workdir = tmp / "workdir"
        self.out = tmp / "dev.out"
        self.marker = f"{MARK}{uuid.uuid4().hex}=1"
        name, value = self.marker.split("=")
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
        env.update({name: value, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk")]),
                    "PYTHONUNBUFFERED": "1", "EDITFARM_API_KEYS": API_KEYS, "EDITFARM_MODEL": "standin",
                    **exported})
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "dev", "--workdir", str(self.workdir), "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_up(self, timeout_s: float = 180) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"editfarm dev exited {self.proc.returncode}:\n{self.output()}")
            return "Ctrl-C to stop" in self.output()
        wait_until(up, timeout_s, "editfarm dev", interval_s=0.2)

    def s3_url(self) -> str:
        found = re.search(r"^S3\s+(http://127\.0\.0\.1:\d+)", self.output(), re.M)
        assert found, self.output()
        return found.group(1)

    def children(self) -> dict[int, str]:
        return {pid: cmd for pid, cmd in processes_of(self.marker, self.workdir).items() if pid != self.proc.pid}

    def kill(self) -> None:
        """Last resort after a failed test: the command's group and every marked process."""
        for pid in [self.proc.pid, *processes_of(self.marker, self.workdir)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


@pytest.fixture()
def dev_run(tmp_path: Path) -> Iterator[list[Dev]]:
    runs: list[Dev] = []
    yield runs
    for run in runs:
        run.kill()


def start(runs: list[Dev], tmp: Path, exported: dict[str, str] | None = None) -> Dev:
    run = Dev(tmp, {"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": "0.2", **(exported or {})})
    runs.append(run)
    run.wait_up()
    return run


def the_cluster_processes(run: Dev) -> dict[int, str]:
    """Every process of the running cluster, checked to be all there."""
    children = run.children()
    commands = " | ".join(children.values())
    for part in ("redis-server|valkey-server", "weed mini", "uvicorn", "render0@local", "webhooks@local"):
        assert re.search(part, commands), commands
    render = [cmd for cmd in children.values() if "render0@local" in cmd]
    assert len(render) >= 2, render  # the Celery worker and its pool child
    return children


def wait_all_gone(run: Dev, pids: dict[int, str], timeout_s: float = 60) -> None:
    def gone() -> bool:
        return not run.children()
    try:
        wait_until(gone, timeout_s, "the cluster's processes to end", interval_s=0.2)
    except TimeoutError:
        raise AssertionError(f"still running: {run.children()} (of {pids})") from None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_the_whole_cluster(dev_run: list[Dev], tmp_path: Path, signum: int) -> None:
    run = start(dev_run, tmp_path)
    pids = the_cluster_processes(run)
    run.proc.send_signal(signum)
    assert run.proc.wait(90) == 0, run.output()
    assert f"stopped ({signal.Signals(signum).name})" in run.output()
    wait_all_gone(run, pids, timeout_s=10)  # stopped before the command returned: nothing to wait for


def test_no_process_outlives_a_sigkilled_dev(dev_run: list[Dev], tmp_path: Path) -> None:
    run = start(dev_run, tmp_path)
    pids = the_cluster_processes(run)
    run.proc.kill()
    run.proc.wait(10)
    wait_all_gone(run, pids)


def test_exported_settings_reach_the_cluster_and_it_writes_only_under_its_workdir(
        dev_run: list[Dev], tmp_path: Path) -> None:
    run = start(dev_run, tmp_path, {
        "EDITFARM_MAX_PROMPT_CHARS": "20",        # a limit
        "EDITFARM_ALLOW_PRIVATE_URLS": "false",   # the URL policy, stricter than dev's default
        "EDITFARM_WORKER_NAME": "shared",         # one process's identity: not for every worker
    })
    render = next(pid for pid, cmd in run.children().items() if "render0@local" in cmd)
    env = environ_of(render)
    assert env["EDITFARM_RENDERER"] == "standin" and env["EDITFARM_MAX_PROMPT_CHARS"] == "20"
    assert env["EDITFARM_ALLOW_PRIVATE_URLS"] == "false"
    assert env["EDITFARM_ALLOW_HTTP_URLS"] == "true"  # dev's default where the user set nothing
    assert env.get("EDITFARM_WORKER_NAME") != "shared"
    assert Path(env["EDITFARM_LORA_CACHE_DIR"]).is_relative_to(run.workdir)

    too_long = httpx.post(f"{run.api_url}/v1/jobs", headers=auth(), timeout=30,
                          json={"operation": "generate", "prompt": "x" * 21, "width": 64, "height": 48})
    assert too_long.status_code == 422, too_long.text
    refused = httpx.post(f"{run.api_url}/v1/jobs", headers=auth(), timeout=30,
                         json={"operation": "edit", "prompt": "p", "image": "http://127.0.0.1:9/in.png"})
    # refused by the user's policy, not fetched (dev's own default allows loopback)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "url_not_allowed", refused.text

    # a LoRA job: the worker's cache is in the workdir
    s3 = boto3.client("s3", endpoint_url=run.s3_url(), region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    s3.put_object(Bucket="editfarm", Key="loras/style.safetensors", Body=b"stand-in weights")
    created = httpx.post(f"{run.api_url}/v1/jobs", headers=auth(), timeout=30, json={
        "operation": "generate", "prompt": "a ball", "width": 64, "height": 48,
        "loras": [{"uri": "s3://editfarm/loras/style.safetensors"}]})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    def finished() -> bool:
        job = httpx.get(f"{run.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()
        assert job["status"] in {"queued", "running", "succeeded"}, job
        return bool(job["status"] == "succeeded")
    wait_until(finished, 60, "the LoRA job", interval_s=0.2)
    cached = list((run.workdir / "loras" / "files").glob("*.safetensors"))
    assert [p.read_bytes() for p in cached] == [b"stand-in weights"]
