"""
Who may read the metrics without a token: clients from the networks of
C{--metrics-allow}, talking to the gateway directly.

A request that came through a proxy (it carries C{Forwarded}, C{X-Forwarded-For}
or Cloudflare's C{CF-Connecting-IP}) is never let in by address: its address is
the proxy's, often 127.0.0.1 (cloudflared on the same machine), not the client's.
Such a header only ever takes access away, so a client cannot gain any by
sending one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"cf-connecting-ip")


def parse_networks(text: str) -> tuple[Network, ...]:
    """
    Comma or space separated networks (C{192.168.1.0/24}, C{fd00::/8}) or
    addresses; C{loopback} stands for 127.0.0.0/8 and ::1, C{none} for no network.
    Raises C{ValueError} naming the entry that is neither.
    """
    networks: list[Network] = []
    for entry in text.replace(",", " ").split():
        if entry.lower() == "loopback":
            networks.extend(LOOPBACK)
        elif entry.lower() != "none":
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not a network (192.168.1.0/24), an address or 'loopback'") from None
    return tuple(networks)


def describe(networks: Sequence[Network]) -> str:
    """The networks as an admin would write them."""
    names, i = [], 0
    while i < len(networks):
        if tuple(networks[i:i + 2]) == LOOPBACK:
            names.append("loopback")
            i += 2
        else:
            names.append(str(networks[i]))
            i += 1
    return ", ".join(names) or "no network"


def address_allowed(host: str, networks: Iterable[Network]) -> bool:
    """Whether the peer address C{host} (an IPv4-mapped IPv6 one too) is in one of C{networks}."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a UNIX socket, or no address at all
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
