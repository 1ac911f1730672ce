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


# IPv6 ranges refused outright, whatever the running Python's address tables say: unique local
# (fc00::/7), the deprecated site-local (fec0::/10), the retired 6bone (3ffe::/16), documentation
# (2001:db8::/32, 3fff::/20) and SRv6 segment ids (5f00::/16): none is a public web host.
_REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "fc00::/7", "fec0::/10", "3ffe::/16", "2001:db8::/32", "3fff::/20", "5f00::/16",
))
# Forms that carry an IPv4 address; a connection to them ends at (or is relayed to) that IPv4.
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local use (RFC 8215): never public
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Where RFC 6052 puts the IPv4 in a NAT64 address, by prefix length: (bit offset, bits) pieces
# around the reserved octet at bits 64..71. A local-use prefix may have any of these lengths.
_NAT64_LAYOUTS = (((48, 16), (72, 16)), ((56, 8), (72, 24)), ((72, 32),), ((96, 32),))


def _bits(value: int, offset: int, count: int) -> int:
    """``count`` bits of the 128-bit ``value`` starting ``offset`` bits from its most significant end."""
    return (value >> (128 - offset - count)) & ((1 << count) - 1)


def _nat64_candidates(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    value, found = int(ip), []
    for layout in _NAT64_LAYOUTS:
        v4 = 0
        for offset, count in layout:
            v4 = (v4 << count) | _bits(value, offset, count)
        found.append(ipaddress.IPv4Address(v4))
    return found


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 transition address carries (empty for any other address).

    6to4 ``2002::/16`` (bits 16..47), Teredo ``2001::/32`` (the server, bits 32..63, and the
    client, the last 32 bits XOR ``0xffffffff``), NAT64 ``64:ff9b::/96`` (the last 32 bits) and
    ``64:ff9b:1::/48`` (every place RFC 6052 allows, since the prefix length is not known),
    IPv4-mapped ``::ffff:0:0/96`` and IPv4-compatible ``::/96`` (the last 32 bits; ``::`` and
    ``::1`` are themselves, not IPv4).
    """
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _V4_MAPPED:
        return [low32]
    if ip in _SIX_TO_FOUR:
        return [ipaddress.IPv4Address(_bits(int(ip), 16, 32))]
    if ip in _TEREDO:
        server = ipaddress.IPv4Address(_bits(int(ip), 32, 32))
        return [server, ipaddress.IPv4Address(int(low32) ^ 0xFFFFFFFF)]
    if ip in _NAT64_WELL_KNOWN:
        return [low32]
    if ip in _NAT64_LOCAL:
        return _nat64_candidates(ip)
    if ip in _V4_COMPATIBLE and int(ip) > 1:
        return [low32]
    return []


def _is_public_ipv4(ip: ipaddress.IPv4Address) -> bool:
    return ip not in METADATA_ADDRESSES and not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local, multicast,
    reserved, unique local, site-local, metadata). An address that carries an IPv4 (see
    :func:`embedded_ipv4`) is judged by what it carries: public only if every embedded IPv4 is."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _is_public_ipv4(ip)
    if ip in METADATA_ADDRESSES or any(ip in net for net in _REFUSED_V6) or ip in _NAT64_LOCAL:
        return False
    embedded = embedded_ipv4(ip)
    if embedded:
        return all(_is_public_ipv4(v4) for v4 in embedded)
    return not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or ip.is_site_local or not ip.is_global
    )


def is_allowed_address(address: str, allow_private: bool) -> bool:
    """The address policy. ``allow_private`` admits loopback/private hosts but never metadata
    endpoints, also not when carried inside an IPv6 transition address."""
    ip = ipaddress.ip_address(address)
    carried = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    if ip in METADATA_ADDRESSES or any(v4 in METADATA_ADDRESSES for v4 in carried):
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
