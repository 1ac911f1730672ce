"""Which URLs editfarm may fetch (input images) or call (webhooks).

Only http(s) URLs whose host resolves to public addresses are allowed, unless
the deployment explicitly allows private ones (local development and tests).
The policy is a pure function over addresses so it can be tested without
opening a socket to anything.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Iterable

# Cloud metadata endpoints that are not caught by the generic ranges below.
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
})

Resolver = Callable[[str, int], Iterable[str]]


class UrlNotAllowed(ValueError):
    """The URL's scheme or resolved address is not allowed by the policy."""


class HostDoesNotResolve(UrlNotAllowed):
    """The host name did not resolve (possibly a transient DNS failure)."""


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local, multicast, metadata)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return False
    return not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


def is_allowed_address(address: str, allow_private: bool) -> bool:
    """The address policy. ``allow_private`` admits loopback/private hosts but never metadata endpoints."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return False
    return allow_private or is_public_address(address)


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to. Raises UrlNotAllowed if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HostDoesNotResolve(f"host {host!r} does not resolve") from exc
    return sorted({str(info[4][0]) for info in infos})


def check_url(
    url: str,
    *,
    allow_http: bool = False,
    allow_private: bool = False,
    resolver: Resolver = system_resolver,
) -> list[str]:
    """Check a URL against the policy; returns the addresses it resolved to.

    Raises UrlNotAllowed with a reason a user can act on.
    """
    parts = urllib.parse.urlsplit(url)
    schemes = {"https", "http"} if allow_http else {"https"}
    if parts.scheme not in schemes:
        raise UrlNotAllowed(f"scheme {parts.scheme or '(none)'!r} not allowed; use {' or '.join(sorted(schemes))}")
    if not parts.hostname:
        raise UrlNotAllowed("URL has no host")
    if parts.username or parts.password:
        raise UrlNotAllowed("credentials in URLs are not allowed")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = list(resolver(parts.hostname, port))
    if not addresses:
        raise UrlNotAllowed(f"host {parts.hostname!r} does not resolve")
    for address in addresses:
        if not is_allowed_address(address, allow_private):
            raise UrlNotAllowed(f"host {parts.hostname!r} resolves to a non-public address")
    return addresses
