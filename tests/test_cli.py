"""`editfarm submit` and `editfarm jobs …` against a real cluster, as a script would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.cluster import ROOT, LocalCluster
from tests.e2e_support import TENANTS, png_bytes, rendered_by

pytestmark = pytest.mark.integration


def editfarm(cluster: LocalCluster, *args: str, tenant: str = "acme") -> subprocess.CompletedProcess[str]:
    # the checkout's SDK, whichever one the interpreter has installed
    env = {"EDITFARM_API_URL": cluster.api_url, "EDITFARM_API_KEY": TENANTS[tenant], "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT / "sdk")}
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


# -- models: tests/conftest.py's fleet_cluster (two pools and a model without workers) --------------


def test_submit_names_a_model_and_the_job_runs_on_it(fleet_cluster: LocalCluster, image: Path,
                                                      tmp_path: Path) -> None:
    done = editfarm(fleet_cluster, "submit", str(image), "--op", "inpaint", "--box", "0.1,0.1,0.6,0.6", "-p",
                    "a hat", "--model", "t2i", "--steps", "2", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert " on model t2i" in done.stderr  # `job job_… queued on model t2i`
    job_id = done.stderr.split("job ", 1)[1].split()[0]
    assert rendered_by(fleet_cluster.redis_url, job_id) == "render0-t2i@local"
    listing = editfarm(fleet_cluster, "jobs", "list", "--limit", "5")
    assert next(line for line in listing.stdout.splitlines() if line.startswith(job_id)).split()[2] == "t2i"
    unknown = editfarm(fleet_cluster, "submit", str(image), "-p", "a hat", "--model", "nope", "--json")
    assert unknown.returncode == 2
    error = json.loads(unknown.stdout)["error"]
    assert (error["code"], error["param"]) == ("unknown_model", "model") and "t2i" in error["message"]


def test_models_list_shows_the_catalog_with_live_state(fleet_cluster: LocalCluster) -> None:
    listed = editfarm(fleet_cluster, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["name"]: m for m in json.loads(listed.stdout)["data"]}
    assert list(models) == ["t2i", "edit", "lightning"]
    assert models["edit"]["operations"] == ["edit", "inpaint"] and models["edit"]["state"]["workers_ready"] == 1
    assert models["lightning"]["state"]["workers_ready"] == 0
    table = editfarm(fleet_cluster, "models", "list")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:] if line.strip()}
    assert rows["t2i"][:4] == ["t2i", "QwenImagePipeline", "generate*,inpaint", "1"]
    assert rows["edit"][2:4] == ["edit*,inpaint*", "1"] and rows["lightning"][3] == "0"
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "PIPELINE", "OPERATIONS"]
