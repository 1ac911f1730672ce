"""An outgoing HTTP request's failure as a stable code and a short sentence a tenant can act on.

Used where a tenant's URL is called (webhook deliveries, image and LoRA downloads): the raw
exception (``ConnectError: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)``)
goes to the log; the tenant reads e.g. ``tls_failed`` and "the TLS handshake failed ...".
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import httpcore
import httpx

__all__ = ["MESSAGES", "describe_network_failure"]

MESSAGES = {
    "tls_failed": "the TLS handshake failed (does the host serve https on that port, with a valid certificate?)",
    "connection_refused": "the connection was refused (nothing listens on that host and port)",
    "connection_reset": "the connection was closed before an answer came",
    "timeout": "no answer came in time",
    "dns_failed": "the host name did not resolve",
    "protocol_error": "the answer was not valid HTTP",
    "connection_failed": "the connection could not be made",
    "request_failed": "the request failed",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _code(exc: BaseException) -> str:
    chain = list(_chain(exc))
    kinds: tuple[tuple[str, tuple[type[BaseException], ...]], ...] = (
        ("tls_failed", (ssl.SSLError, ssl.CertificateError)),
        ("connection_refused", (ConnectionRefusedError,)),
        ("dns_failed", (socket.gaierror,)),
        ("timeout", (TimeoutError, httpx.TimeoutException, httpcore.TimeoutException)),
        ("connection_reset", (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)),
        ("protocol_error", (httpx.ProtocolError, httpcore.ProtocolError, httpx.DecodingError)),
        ("connection_failed", (httpx.ConnectError, httpcore.ConnectError, httpx.NetworkError,
                               httpcore.NetworkError, OSError)),
    )
    for code, types in kinds:
        if any(isinstance(e, types) for e in chain):
            return code
    if any("SSL" in str(e) for e in chain):  # a TLS failure some library did not raise as SSLError
        return "tls_failed"
    return "request_failed"


def describe_network_failure(exc: BaseException) -> tuple[str, str]:
    """``(code, sentence)`` for a failed request: tls_failed, connection_refused, dns_failed,
    timeout, connection_reset, protocol_error, connection_failed or request_failed. The sentence
    names no exception class, path or library text."""
    code = _code(exc)
    return code, MESSAGES[code]
