"""The contract's shape: Lua scripts ship as package data and load, the API never special-cases a
store backend, and only broker/ knows the outbox's and the render queues' Redis layout."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from broker import scripts

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "broker" / "lua"


def test_every_lua_file_is_package_data_and_every_script_loads() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "lua/*.lua" in data["broker"]
    names = sorted(p.stem for p in LUA.glob("*.lua"))
    assert {"reindex", "quota", "create_and_enqueue", "outbox_claim"} <= set(names)
    for name in names:
        text = scripts.source(name)
        assert text.strip() and "@PREFIX@" not in text
    assert "editfarm:" in scripts.source("reindex")  # the key prefix filled in


def test_lua_lives_in_files_not_in_python_strings() -> None:
    for path in [*ROOT.glob("broker/**/*.py"), *ROOT.glob("api/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        assert "redis.call(" not in path.read_text(), f"{path.relative_to(ROOT)} holds a Lua script"


def test_the_api_never_special_cases_a_store_backend() -> None:
    for path in ROOT.glob("api/**/*.py"):
        for line in path.read_text().splitlines():
            assert not (re.search(r"\bisinstance\(", line) and "store" in line.lower()), f"{path}: {line}"


def test_only_broker_knows_the_outbox_and_render_queue_lists() -> None:
    for path in [*ROOT.glob("api/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        text = path.read_text()
        assert not re.search(r"keys\.(webhook_message|webhook_attempts|webhook_lock)\(", text), path
        assert ".llen(" not in text and ".rpush(" not in text, path
