"""The Lua scripts of the job store and the webhook outbox, kept as ``.lua`` files in ``broker/lua/``.

A script is made of files: shared functions first (``reindex``, ``checks``, ``quota``), then the body
that calls them, joined in the order given. Each file is read once per process; the files ship as
package data (pyproject's ``[tool.setuptools.package-data]``), so an installed wheel has them.
"""

from __future__ import annotations

import functools
from importlib import resources

from broker import keys

# replaced by keys.PREFIX where a script builds a key it cannot receive in KEYS
_PREFIX_MARK = "@PREFIX@"


@functools.cache
def _file(name: str) -> str:
    """One ``broker/lua/<name>.lua`` file's text.

    Raises:
        FileNotFoundError: no such script file (a packaging mistake).
    """
    text = resources.files("broker").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return text.replace(_PREFIX_MARK, keys.PREFIX)


@functools.cache
def source(*names: str) -> str:
    """The script made of these files, in this order (functions before the body that calls them).

    Raises:
        FileNotFoundError: one of the files is missing.
    """
    return "\n".join(_file(name) for name in names)
