"""The test kit (``editfarm_testing/``) is for tests and benchmarks: no product module imports it.

Every module of the product packages is parsed (not imported), so an import inside a function or
under ``if TYPE_CHECKING`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("broker", "storage", "api", "workers", "cli")
KIT = "editfarm_testing"


def imported_modules(source: str) -> set[str]:
    """The absolute module names a module's source imports (``import a.b``, ``from a.b import c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_the_kit(source: str) -> list[str]:
    return sorted(name for name in imported_modules(source) if name == KIT or name.startswith(KIT + "."))


@pytest.mark.parametrize("package", PRODUCT)
def test_no_product_module_imports_the_test_kit(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules found under {package}/"
    offenders = {str(path.relative_to(ROOT)): names for path in modules
                 if (names := imports_the_kit(path.read_text(encoding="utf-8")))}
    assert offenders == {}


@pytest.mark.parametrize("source", [
    "import editfarm_testing",
    "import editfarm_testing.api as kit",
    "from editfarm_testing.webhooks import FlakyReceiver",
    "from editfarm_testing import tcpproxy",
    "def later():\n    from editfarm_testing.api import fake_services\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import editfarm_testing.outbox\n",
])
def test_the_check_sees_every_way_of_importing_the_kit(source: str) -> None:
    assert imports_the_kit(source)


@pytest.mark.parametrize("source", [
    "import editfarm_testing_extra",
    "from api.testing_notes import x",
    "from . import editfarm_testing",  # relative: a sibling module of that name, not the kit
    "x = 'editfarm_testing'",
])
def test_the_check_does_not_flag_other_names(source: str) -> None:
    assert imports_the_kit(source) == []
