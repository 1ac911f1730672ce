"""The URL policy's address rules (issue 16.4): a pure function over addresses, tested without sockets.

No test here connects anywhere: ``check_url`` gets a resolver that answers from a table.
"""

from __future__ import annotations

import ipaddress

import pytest

from broker.urlpolicy import UrlNotAllowed, check_url, embedded_ipv4, is_allowed_address, is_public_address

# (address, public?, allowed with allow_private?, why)
ADDRESSES = [
    # plain IPv4 and IPv6
    ("8.8.8.8", True, True, "public IPv4"),
    ("2606:4700:4700::1111", True, True, "public IPv6"),
    ("127.0.0.1", False, True, "loopback"),
    ("10.1.2.3", False, True, "private"),
    ("169.254.169.254", False, False, "metadata"),
    ("::1", False, True, "IPv6 loopback"),
    ("::", False, True, "unspecified"),
    ("fe80::1", False, True, "link-local"),
    ("fc00::1", False, True, "unique local fc00::/7"),
    ("fd12:3456::1", False, True, "unique local fd00::/8"),
    ("fec0::1", False, True, "site-local fec0::/10"),
    ("feff:ffff::1", False, True, "site-local, top of fec0::/10"),
    ("2001:db8::1", False, True, "documentation"),
    ("3fff::1", False, True, "documentation 3fff::/20"),
    ("3ffe::1", False, True, "retired 6bone"),
    ("5f00::1", False, True, "SRv6 SIDs"),
    ("ff02::1", False, True, "multicast"),
    ("100::1", False, True, "discard-only"),
    ("fd00:ec2::254", False, False, "AWS IPv6 metadata"),
    # 6to4 2002::/16: the IPv4 sits in bits 16..47
    ("2002:7f00:1::", False, True, "6to4 of 127.0.0.1 (the reported case)"),
    ("2002:a00:1::1", False, True, "6to4 of 10.0.0.1"),
    ("2002:a9fe:a9fe::", False, False, "6to4 of the metadata address"),
    ("2002:c0a8:101::5", False, True, "6to4 of 192.168.1.1"),
    ("2002:808:808::1", True, True, "6to4 of 8.8.8.8"),
    # Teredo 2001::/32: server in bits 32..63, client = last 32 bits XOR 0xffffffff
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False, True, "Teredo, client 192.0.2.45 (documentation)"),
    ("2001:0:808:808::80ff:fffe", False, True, "Teredo, client 127.0.0.1 (7f000001 ^ ffffffff)"),
    ("2001:0:808:808::5601:5601", False, False, "Teredo, client 169.254.169.254"),
    ("2001:0:7f00:1::f7f7:f7f7", False, True, "Teredo, server 127.0.0.1, client 8.8.8.8"),
    ("2001:0:808:808::f7f7:f7f7", True, True, "Teredo, server and client 8.8.8.8"),
    # NAT64 well-known prefix 64:ff9b::/96: the last 32 bits
    ("64:ff9b::7f00:1", False, True, "NAT64 of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", False, False, "NAT64 of the metadata address"),
    ("64:ff9b::a00:1", False, True, "NAT64 of 10.0.0.1"),
    ("64:ff9b::808:808", True, True, "NAT64 of 8.8.8.8"),
    # NAT64 local-use 64:ff9b:1::/48: never public; metadata refused wherever RFC 6052 puts it
    ("64:ff9b:1::808:808", False, True, "local-use NAT64 /96 of 8.8.8.8"),
    ("64:ff9b:1::a9fe:a9fe", False, False, "local-use NAT64 /96 of metadata"),
    ("64:ff9b:1:a9fe:a9:fe00::", False, False, "local-use NAT64 /48 of metadata"),
    ("64:ff9b:1:0:a9:fea9:fe00:0", False, False, "local-use NAT64 /64 of metadata"),
    # IPv4-mapped ::ffff:0:0/96 and IPv4-compatible ::/96
    ("::ffff:127.0.0.1", False, True, "IPv4-mapped loopback"),
    ("::ffff:169.254.169.254", False, False, "IPv4-mapped metadata"),
    ("::ffff:8.8.8.8", True, True, "IPv4-mapped public"),
    ("::127.0.0.1", False, True, "IPv4-compatible loopback"),
    ("::169.254.169.254", False, False, "IPv4-compatible metadata"),
    ("::10.0.0.1", False, True, "IPv4-compatible private"),
    ("::8.8.8.8", True, True, "IPv4-compatible public"),
]


@pytest.mark.parametrize(("address", "public", "allowed_private", "why"), ADDRESSES,
                         ids=[row[3] for row in ADDRESSES])
def test_each_address_is_judged_by_what_it_reaches(address, public, allowed_private, why):
    assert is_public_address(address) is public, why
    assert is_allowed_address(address, allow_private=False) is public, why
    assert is_allowed_address(address, allow_private=True) is allowed_private, why


@pytest.mark.parametrize(("address", "expected"), [
    ("2002:7f00:1::", ["127.0.0.1"]),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),
    ("64:ff9b::c000:221", ["192.0.2.33"]),
    ("::ffff:10.0.0.1", ["10.0.0.1"]),
    ("::10.0.0.1", ["10.0.0.1"]),
    ("::1", []),
    ("::", []),
    ("2606:4700:4700::1111", []),
])
def test_embedded_ipv4_extracts_the_carried_addresses(address, expected):
    assert [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(address))] == expected


@pytest.mark.parametrize("url", [
    "https://[2002:7f00:1::]/hook",
    "https://[2001:0:808:808::80ff:fffe]/hook",
    "https://[64:ff9b::7f00:1]/hook",
    "https://[::ffff:7f00:1]/hook",
    "https://[::7f00:1]/hook",
    "https://[fec0::1]/hook",
    "https://[fd00::1]/hook",
])
def test_check_url_refuses_ipv6_forms_of_internal_addresses(url):
    host = url.split("[", 1)[1].split("]", 1)[0]
    with pytest.raises(UrlNotAllowed, match="non-public"):
        check_url(url, resolver=lambda h, port: [host])


def test_check_url_refuses_a_name_that_resolves_to_a_transition_form_among_public_ones():
    def resolver(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "2002:a9fe:a9fe::1"]

    with pytest.raises(UrlNotAllowed):
        check_url("https://hooks.example.com/x", resolver=resolver)
    with pytest.raises(UrlNotAllowed):  # metadata stays refused even where private hosts are allowed
        check_url("https://hooks.example.com/x", allow_private=True, resolver=resolver)


def test_check_url_admits_a_transition_form_of_a_public_address():
    assert check_url("https://[2002:808:808::1]/x", resolver=lambda h, port: [h]) == ["2002:808:808::1"]
