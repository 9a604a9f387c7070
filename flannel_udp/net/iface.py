"""Choosing the external interface, its address and the public IP, in upstream's order and with its error texts."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyroute2 import IPRoute

from . import netlink

IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80


class InterfaceError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    iface_addr: ipaddress.IPv4Address
    ext_addr: ipaddress.IPv4Address  # the public IP peers send to
    mtu: int


def _usable_addresses(ipr: IPRoute, index: int) -> list[netlink.AddrInfo]:
    usable = [a for a in netlink.addresses(ipr, index) if a.address.version == 4 and not a.flags & IFA_F_DEPRECATED
              and not a.address.is_loopback and not a.address.is_multicast and not a.address.is_unspecified]
    # Global before link-local, permanent before dynamic, non-temporary first (upstream's sort).
    return sorted(usable, key=lambda a: (a.address.is_link_local, not a.flags & IFA_F_PERMANENT, bool(a.flags & IFA_F_TEMPORARY)))


def _by_name(ipr: IPRoute, name: str, addr: ipaddress.IPv4Address | None = None) -> tuple[netlink.LinkInfo, ipaddress.IPv4Address]:
    link = netlink.link_by_name(ipr, name)
    if link is None:
        raise InterfaceError(f"no interface named {name}")
    if addr is None:
        usable = _usable_addresses(ipr, link.index)
        if not usable:
            raise InterfaceError(f"failed to find IPv4 address for interface {name}")
        addr = usable[0].address
    return link, addr


def _by_ip(ipr: IPRoute, addr: ipaddress.IPv4Address) -> tuple[netlink.LinkInfo, ipaddress.IPv4Address]:
    for link in netlink.links(ipr):
        if any(a.address == addr for a in netlink.addresses(ipr, link.index)):
            return link, addr
    raise InterfaceError(f"no interface with address {addr}")


def _by_regex(ipr: IPRoute, pattern: str) -> tuple[netlink.LinkInfo, ipaddress.IPv4Address]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise InterfaceError(f"invalid -iface-regex {pattern!r}: {e}") from None
    all_links = netlink.links(ipr)
    for link in all_links:  # addresses first, as upstream
        for a in _usable_addresses(ipr, link.index):
            if regex.search(str(a.address)):
                return link, a.address
    for link in all_links:
        if regex.search(link.name):
            return _by_name(ipr, link.name)
    available = ", ".join(f"{link.name}:[{' '.join(str(a.address) for a in netlink.addresses(ipr, link.index))}]"
                          for link in all_links)
    raise InterfaceError(f"could not match pattern {pattern} to any of the available network interfaces ({available})")


def _by_reach(ipr: IPRoute, target: str) -> tuple[netlink.LinkInfo, ipaddress.IPv4Address]:
    route = netlink.route_get(ipr, target)
    if route is None or route["oif"] is None:
        raise InterfaceError(f"no route to {target}")
    link = netlink.link_by_index(ipr, route["oif"])
    return _by_name(ipr, link.name, ipaddress.IPv4Address(route["src"]) if route["src"] else None)


def _by_default_route(ipr: IPRoute) -> tuple[netlink.LinkInfo, ipaddress.IPv4Address]:
    default = next((r for r in netlink.routes(ipr) if r["dst"] == "0.0.0.0/0"), None)
    if default is None:
        raise InterfaceError("unable to find default route")
    link = netlink.link_by_index(ipr, default["oif"]) if default["oif"] else None
    if link is None:
        raise InterfaceError("found default route but could not determine interface")
    return _by_name(ipr, link.name)


def choose(ipr: IPRoute, ifaces: list[str], regexes: list[str], can_reach: str, public_ip: str) -> ExternalInterface:
    """Runs on the netlink thread. Raises InterfaceError with upstream's message."""
    ext_addr = None
    if public_ip:
        try:
            ext_addr = ipaddress.IPv4Address(public_ip)
        except ValueError:
            raise InterfaceError(f"invalid public IP address: {public_ip}") from None

    if not ifaces and not regexes and not can_reach:
        if ext_addr is not None:
            try:
                link, addr = _by_ip(ipr, ext_addr)
            except InterfaceError:
                raise InterfaceError("Failed to find any valid interface to use") from None
        else:
            link, addr = _by_default_route(ipr)
    else:
        attempts = [(lambda v=v: _by_ip(ipr, ipaddress.IPv4Address(v)) if _is_ip(v) else _by_name(ipr, v), f"-iface {v}")
                    for v in ifaces]
        attempts += [(lambda r=r: _by_regex(ipr, r), f"-iface-regex {r}") for r in regexes]
        if can_reach:
            attempts.append((lambda: _by_reach(ipr, can_reach), f"-iface-can-reach {can_reach}"))
        failures = []
        for attempt, label in attempts:
            try:
                link, addr = attempt()
                break
            except InterfaceError as e:
                failures.append(f"{label}: {e}")
        else:
            raise InterfaceError("Failed to find interface to use that matches the interfaces and/or regexes provided ("
                                 + "; ".join(failures) + ")")
    if not link.mtu:
        raise InterfaceError(f"failed to determine MTU for {addr} interface")
    return ExternalInterface(link.name, link.index, addr, ext_addr or addr, link.mtu)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
        return True
    except ValueError:
        return False
