"""A job failure's two texts: the raw one for the worker's log (with the job id), and the tenant's.

The tenant reads a stable code and a short message written for them (``broker.tenanttext``);
exception class names, worker paths and library texts stay in the log.
"""

from __future__ import annotations

import logging

from broker.schema import ErrorCode
from broker.tenanttext import GENERIC_MESSAGES, tenant_message

__all__ = ["for_tenant", "generic", "raw_text"]

log = logging.getLogger("editfarm.runner")


def raw_text(exc: BaseException) -> str:
    """``exc`` and what it was raised from, as the log shows them: ``Type: text <- Type: text``."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def for_tenant(job_id: str, code: ErrorCode, exc: BaseException, limit: int = 500) -> str:
    """The message a tenant reads for ``job_id`` failing with ``code`` because of ``exc``: the
    exception's own text where it was written for tenants (and carries no internals), else the
    code's generic message. The raw exception chain is logged with the job id."""
    log.warning("job %s fails with %s: %s", job_id, code.value, raw_text(exc))
    return tenant_message(str(exc)[:limit], code.value)


def generic(code: ErrorCode) -> str:
    """The code's generic message (for failures whose exception text is never for tenants)."""
    return GENERIC_MESSAGES[code.value]
