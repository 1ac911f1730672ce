"""`editfarm submit` and `editfarm jobs …` against a real cluster, as a script would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.cluster import ROOT, LocalCluster
from tests.e2e_support import TENANTS, png_bytes

pytestmark = pytest.mark.integration


def editfarm(cluster: LocalCluster, *args: str, tenant: str = "acme") -> subprocess.CompletedProcess[str]:
    env = {"EDITFARM_API_URL": cluster.api_url, "EDITFARM_API_KEY": TENANTS[tenant], "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes())
    return path


def test_submit_waits_saves_the_output_and_exits_zero(shared_cluster: LocalCluster, image: Path,
                                                       tmp_path: Path) -> None:
    done = editfarm(shared_cluster, "submit", str(image), "-p", "make it blue", "--seed", "5", "--steps", "2",
                    "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and len(job["saved"]) == 1
    assert Path(job["saved"][0]).exists()


def test_bad_input_exits_two_with_the_api_error_code(shared_cluster: LocalCluster, tmp_path: Path) -> None:
    bogus = tmp_path / "not-an-image.png"
    bogus.write_bytes(b"hello")
    done = editfarm(shared_cluster, "submit", str(bogus), "-p", "x", "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["code"] == "invalid_image"


def test_an_unreachable_api_exits_three(image: Path) -> None:
    from cli.localservices import free_port

    env = {"EDITFARM_API_URL": f"http://127.0.0.1:{free_port()}", "EDITFARM_API_KEY": "k", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(image), "-p", "x"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3


def test_jobs_list_get_cancel_and_watch(shared_cluster: LocalCluster, image: Path) -> None:
    queued = editfarm(shared_cluster, "submit", str(image), "-p", "x", "--steps", "40", "--no-wait", "--json")
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["id"]
    listing = editfarm(shared_cluster, "jobs", "list", "--json")
    assert listing.returncode == 0, listing.stderr[-2000:]
    listed = json.loads(listing.stdout)
    assert job_id in [j["id"] for j in listed["data"]]
    got = json.loads(editfarm(shared_cluster, "jobs", "get", job_id, "--json").stdout)
    assert got["id"] == job_id
    assert editfarm(shared_cluster, "jobs", "get", job_id, "--json", tenant="globex").returncode == 2
    canceled = editfarm(shared_cluster, "jobs", "cancel", job_id, "--json")
    assert canceled.returncode == 0 and json.loads(canceled.stdout)["status"] == "canceled"
    assert editfarm(shared_cluster, "jobs", "cancel", job_id, "--json").returncode == 2  # already finished
    watched = editfarm(shared_cluster, "jobs", "watch", job_id, "--json")
    events = [json.loads(line)["event"] for line in watched.stdout.splitlines()]
    assert events[0] == "status" and events[-1] == "done" and watched.returncode == 1
