"""What a tenant may read about a failure: stable codes and short messages, never internals.

Everything a tenant reads (a job's ``error``, status events, webhook payloads, the delivery log,
API error bodies) is written for them. Internals (filesystem paths, Python exception class names,
tracebacks, errno and TLS library texts, object reprs) stay in the process's log, next to the
job id. :func:`find_leaks` says which internals a text carries; producers use
:func:`tenant_message` as the last guard before a text is stored or sent, and tests apply
:func:`find_leaks` to every message a tenant can read.
"""

from __future__ import annotations

import re

__all__ = ["GENERIC_MESSAGES", "find_leaks", "tenant_message"]

# What a job failure with each code says when no better message written for the tenant exists.
GENERIC_MESSAGES: dict[str, str] = {
    "input_unreadable": "an input of the job could not be read",
    "invalid_input": "the job's inputs cannot be rendered as asked",
    "render_failed": "the render failed on the worker; submit the job again, or contact the operator if it persists",
    "upload_failed": "the job's outputs could not be encoded or stored",
    "internal_error": "internal error",
    "timeout": "the job ran longer than its timeout",
    "queue_deadline": "the job was not started within its queue deadline",
    "canceled": "the job was canceled",
    "worker_lost": "the job's worker stopped while running it",
    "out_of_memory": "the device ran out of memory; try a smaller size or fewer images",
    "unavailable": "a service the job needs is unavailable; it will be retried",
}
_FALLBACK = "the request could not be completed"

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]*\", line \d+")
# absolute POSIX paths of two or more segments (not a URL's path: that follows a host name, and
# not the API's own routes), Windows drive paths, home-relative paths, source files
_POSIX_PATH = re.compile(r"(?<![\w:/.\-{}])/(?!v1/)(?:[\w.@+\-~{}]+/)+[\w.@+\-~{}]*")
_OTHER_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"]*|(?<!\w)~/[^\s'\"]+|[\w\-]+\.py\b|site-packages")
# a word that names an exception class: the usual suffixes, or any class Python knows by that name
_EXCEPTION_SUFFIX = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Warning|Timeout)\b")
_CAMEL_WORD = re.compile(r"\b[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+\b")
_LIBRARY_TEXT = re.compile(r"\[Errno \d+\]|\[SSL[:\]]|\bat 0x[0-9a-fA-F]+|<class '|<module '|<function ")


def _exception_names() -> set[str]:
    """Names of every exception class loaded in this process (builtins and imported libraries)."""
    names: set[str] = set()
    todo: list[type] = [BaseException]
    while todo:
        cls = todo.pop()
        if cls.__name__ not in names:
            names.add(cls.__name__)
        try:
            todo.extend(cls.__subclasses__())
        except TypeError:  # type.__subclasses__ needs an instance of type
            continue
    return names


def find_leaks(text: str) -> list[str]:
    """The internals ``text`` carries (empty if none): each found piece, e.g. a path or a class name.

    Looks for tracebacks, absolute/home/Windows paths and source file names, exception class names
    (``...Error``/``Exception``/``Timeout``/... and any CamelCase word that is the name of an
    exception class loaded in this process, such as ``HeaderTooLarge``), and library texts such as
    ``[Errno 2]``, ``[SSL: ...]``, ``<class '...'>`` or ``at 0x7f...``.
    """
    found: list[str] = []
    for pattern in (_TRACEBACK, _POSIX_PATH, _OTHER_PATH, _EXCEPTION_SUFFIX, _LIBRARY_TEXT):
        found.extend(match.group(0) for match in pattern.finditer(text))
    camel = [m.group(0) for m in _CAMEL_WORD.finditer(text)]
    if camel:
        known = _exception_names()
        found.extend(word for word in camel if word in known and word not in found)
    return found


def tenant_message(message: str, code: str | None = None) -> str:
    """``message`` if a tenant may read it, else the generic message of ``code`` (or a general one)."""
    if not find_leaks(message):
        return message
    return GENERIC_MESSAGES.get(code or "", _FALLBACK)
