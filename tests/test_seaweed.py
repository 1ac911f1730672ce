"""The local S3 server (cli/seaweed.py): its command line, and a real `weed mini` restarted on its data."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cli.localservices import ServiceDied
from cli.seaweed import identities_json, launch_args, start_seaweedfs
from storage import S3Config, S3ObjectStore


def test_every_listener_is_on_loopback_on_its_own_port_and_nothing_phones_home(tmp_path: Path) -> None:
    launch = launch_args(data_dir=tmp_path / "data", config_path=tmp_path / "c.json", bucket="b", s3_port=None)
    flags = dict(arg.lstrip("-").split("=", 1) for arg in launch.args[2:])
    assert flags["ip"] == flags["ip.bind"] == "127.0.0.1"
    assert flags["master.telemetry"] == "false"
    ports = [int(value) for name, value in flags.items() if name.endswith((".port", ".port.grpc"))]
    assert len(ports) == len(set(ports)) == 10  # weed's defaults are fixed ports (+10000 for gRPC)
    assert flags["s3.port"] == str(launch.s3_port)
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == "0" and flags["webdav"] == "false"
    assert flags["bucket"] == "b" and flags["s3.autoCreateBucket"] == "false"
    assert flags["dir"] == str(tmp_path / "data")
    # the sockets weed leaves behind are removed on stop: its own in the temporary folder, ours in the workdir
    assert all(path.name.startswith("seaweedfs-") or path == tmp_path / "s3.sock" for path in launch.stray_sockets)
    assert f"-s3.localSocket={tmp_path / 's3.sock'}" in launch.args


def test_the_identities_file_holds_the_credentials() -> None:
    [identity] = json.loads(identities_json("AK", "SK"))["identities"]
    assert identity["credentials"] == [{"accessKey": "AK", "secretKey": "SK"}]
    assert {"Read", "Write", "List"} <= set(identity["actions"])


@pytest.mark.integration
def test_objects_survive_a_restart_on_the_same_workdir(tmp_path: Path) -> None:
    first = start_seaweedfs(workdir=tmp_path / "s3", log=tmp_path / "s3.log")
    try:
        store = S3ObjectStore(S3Config(bucket="editfarm", endpoint_url=first.url, access_key_id="test",
                                       secret_access_key="test"))
        store.put("tenants/t/jobs/j/outputs/0.png", b"kept", "image/png")
    finally:
        first.stop()
    assert not first.alive()
    again = start_seaweedfs(workdir=tmp_path / "s3", log=tmp_path / "s3.log")
    try:
        store = S3ObjectStore(S3Config(bucket="editfarm", endpoint_url=again.url, access_key_id="test",
                                       secret_access_key="test"))
        assert store.get("tenants/t/jobs/j/outputs/0.png") == b"kept"
    finally:
        again.stop()
    assert (tmp_path / "s3" / "data").is_dir()  # a given workdir is kept


def test_a_port_that_is_taken_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ServiceDied):
            start_seaweedfs(workdir=tmp_path / "s3", port=port, attempts=2, timeout_s=30)
