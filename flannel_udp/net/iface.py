"""Choosing the external interface, its address and the public IP, in upstream's order and with its error texts."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute

from . import netlink

IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80


class InterfaceError(RuntimeError):
    pass


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    iface_addr: ipaddress.IPv4Address | None  # None in an IPv6-only network
    ext_addr: ipaddress.IPv4Address | None  # the public IP peers send to
    mtu: int
    # Dual stack and IPv6-only: the interface's IPv6 address and the public IPv6 peers send IPv6 pod traffic to.
    iface_addr6: ipaddress.IPv6Address | None = None
    ext_addr6: ipaddress.IPv6Address | None = None

    def describe(self) -> str:
        """The addresses in use, for the start-up log."""
        parts = [f"address {self.iface_addr}, public IP {self.ext_addr}"] if self.iface_addr is not None else []
        if self.iface_addr6 is not None:
            parts.append(f"IPv6 address {self.iface_addr6}, public IPv6 {self.ext_addr6}")
        return "; ".join(parts)


def _usable_addresses(ipr: IPRoute, index: int, version: int = 4) -> list[netlink.AddrInfo]:
    family = 2 if version == 4 else 10
    usable = [
        a
        for a in netlink.addresses(ipr, index, family)
        if not a.flags & IFA_F_DEPRECATED
        and not a.address.is_loopback
        and not a.address.is_multicast
        and not a.address.is_unspecified
    ]
    # Global before link-local, permanent before dynamic, non-temporary first (upstream's sort).
    return sorted(
        usable, key=lambda a: (a.address.is_link_local, not a.flags & IFA_F_PERMANENT, bool(a.flags & IFA_F_TEMPORARY))
    )


def _by_name(
    ipr: IPRoute, name: str, addr: IPAddress | None = None, version: int = 4
) -> tuple[netlink.LinkInfo, IPAddress]:
    link = netlink.link_by_name(ipr, name)
    if link is None:
        raise InterfaceError(f"no interface named {name}")
    if addr is not None:
        return link, addr
    usable = _usable_addresses(ipr, link.index, version)
    if not usable:
        raise InterfaceError(f"failed to find IPv{version} address for interface {name}")
    return link, usable[0].address


def _by_iface(ipr: IPRoute, value: str) -> tuple[netlink.LinkInfo, IPAddress]:
    """-iface: an IPv4 address, or an interface name."""
    return _by_ip(ipr, ipaddress.IPv4Address(value)) if _is_ip(value) else _by_name(ipr, value)


def _by_ip(ipr: IPRoute, addr: IPAddress) -> tuple[netlink.LinkInfo, IPAddress]:
    family = 2 if addr.version == 4 else 10
    for link in netlink.links(ipr):
        if any(a.address == addr for a in netlink.addresses(ipr, link.index, family)):
            return link, addr
    raise InterfaceError(f"no interface with address {addr}")


def _by_regex(ipr: IPRoute, pattern: str, version: int = 4) -> tuple[netlink.LinkInfo, IPAddress]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise InterfaceError(f"invalid -iface-regex {pattern!r}: {e}") from None
    all_links = netlink.links(ipr)
    for link in all_links:  # addresses first, as upstream
        for a in _usable_addresses(ipr, link.index, version):
            if regex.search(str(a.address)):
                return link, a.address
    for link in all_links:
        if regex.search(link.name):
            return _by_name(ipr, link.name, version=version)
    family = 2 if version == 4 else 10
    available = ", ".join(
        f"{link.name}:[{' '.join(str(a.address) for a in netlink.addresses(ipr, link.index, family))}]"
        for link in all_links
    )
    raise InterfaceError(f"could not match pattern {pattern} to any of the available network interfaces ({available})")


def _by_reach(ipr: IPRoute, target: str, version: int = 4) -> tuple[netlink.LinkInfo, IPAddress]:
    route = netlink.route_get(ipr, target)
    if route is None or route["oif"] is None:
        raise InterfaceError(f"no route to {target}")
    link = netlink.link_by_index(ipr, route["oif"])
    if link is None:
        raise InterfaceError(f"no route to {target}")
    return _by_name(ipr, link.name, ipaddress.ip_address(route["src"]) if route["src"] else None, version)


def _default_route_link(ipr: IPRoute, family: int = 2) -> netlink.LinkInfo:
    default = next((r for r in netlink.routes(ipr, family) if r["dst"] in ("0.0.0.0/0", "::/0")), None)
    if default is None:
        raise InterfaceError("unable to find default route" + (" for IPv6" if family == 10 else ""))
    link = netlink.link_by_index(ipr, default["oif"]) if default["oif"] else None
    if link is None:
        raise InterfaceError("found default route but could not determine interface")
    return link


def _by_default_route(ipr: IPRoute) -> tuple[netlink.LinkInfo, IPAddress]:
    return _by_name(ipr, _default_route_link(ipr).name)


def _parse_public(value: str, version: int):
    if not value:
        return None
    try:
        return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
    except ValueError:
        raise InterfaceError(f"invalid public IP{'v6' if version == 6 else ''} address: {value}") from None


def _ipv6_side(
    ipr: IPRoute,
    link: netlink.LinkInfo,
    public_ipv6: str,
    ifaces: list[str],
    by_default_route: bool,
    by_public_ip: bool,
):
    """Dual stack: the IPv6 address of the interface the IPv4 side chose, and the public IPv6 (upstream requires both
    families on one interface)."""
    ext6 = _parse_public(public_ipv6, 6)
    if by_default_route:
        link6 = _default_route_link(ipr, 10)
        if link6.index != link.index:
            raise InterfaceError(
                f"the IPv6 default route uses {link6.name}, the IPv4 one {link.name}: "
                "dual stack needs both on one interface"
            )
    fixed = next((ipaddress.IPv6Address(v) for v in ifaces if _is_ip(v, 6)), None)
    if fixed is None and ext6 is not None and by_public_ip:
        fixed = ext6  # interface found by -public-ip: the public IPv6 must be on it too
    if fixed is not None:
        owner, _ = _by_ip(ipr, fixed)
        if owner.index != link.index:
            raise InterfaceError(f"v6 interface {owner.name} must be the same with v4 interface {link.name}")
        return fixed, ext6 or fixed
    usable = _usable_addresses(ipr, link.index, 6)
    if not usable:
        raise InterfaceError(f"failed to find IPv6 address for interface {link.name}")
    return usable[0].address, ext6 or usable[0].address


def choose(
    ipr: IPRoute,
    ifaces: list[str],
    regexes: list[str],
    can_reach: str,
    public_ip: str,
    public_ipv6: str = "",
    ipv6: bool = False,
    ipv4: bool = True,
) -> ExternalInterface:
    """Runs on the netlink thread. Raises InterfaceError with upstream's message. With ipv6 (dual stack) the interface
    must also carry an IPv6 address, which becomes the IPv6 side's address."""
    if not ipv4:
        return _choose_ipv6_only(ipr, ifaces, regexes, can_reach, public_ipv6)
    ext_addr = _parse_public(public_ip, 4)
    v4_ifaces = [v for v in ifaces if not _is_ip(v, 6)]
    default_mode = not ifaces and not regexes and not can_reach
    if default_mode:
        if ext_addr is not None:
            try:
                link, addr = _by_ip(ipr, ext_addr)
            except InterfaceError:
                raise InterfaceError("Failed to find any valid interface to use") from None
        else:
            link, addr = _by_default_route(ipr)
    else:
        attempts: list[Attempt] = [(functools.partial(_by_iface, ipr, v), f"-iface {v}") for v in v4_ifaces]
        attempts += [(functools.partial(_by_regex, ipr, r), f"-iface-regex {r}") for r in regexes]
        if can_reach:
            attempts.append((functools.partial(_by_reach, ipr, can_reach), f"-iface-can-reach {can_reach}"))
        link, addr = _first_found(attempts)
    if not link.mtu:
        raise InterfaceError(f"failed to determine MTU for {addr} interface")
    addr6 = ext6 = None
    if ipv6:
        addr6, ext6 = _ipv6_side(
            ipr,
            link,
            public_ipv6,
            ifaces,
            by_default_route=default_mode and ext_addr is None,
            by_public_ip=default_mode and ext_addr is not None,
        )
    iface_addr = ipaddress.IPv4Address(addr)  # the IPv4 side's address: every way above looks up an IPv4 one
    return ExternalInterface(link.name, link.index, iface_addr, ext_addr or iface_addr, link.mtu, addr6, ext6)


def _choose_ipv6_only(
    ipr: IPRoute, ifaces: list[str], regexes: list[str], can_reach: str, public_ipv6: str
) -> ExternalInterface:
    """An IPv6-only network (upstream's ipv6Stack): the interface is found by IPv6 addresses only (-iface takes an
    IPv6 address or a name, -iface-regex matches IPv6 addresses then names, the default is the IPv6 default route's
    interface, or the one that has -public-ipv6); it has no IPv4 side."""
    ext6 = _parse_public(public_ipv6, 6)
    attempts: list[Attempt] = []
    for value in ifaces:
        if _is_ip(value, 4):
            continue  # an IPv4 address names no interface of an IPv6-only node
        find = functools.partial(_by_ip, ipr, ipaddress.IPv6Address(value)) if _is_ip(value, 6) else None
        attempts.append((find or functools.partial(_by_name, ipr, value, version=6), f"-iface {value}"))
    attempts += [(functools.partial(_by_regex, ipr, r, 6), f"-iface-regex {r}") for r in regexes]
    if can_reach:
        attempts.append((functools.partial(_by_reach, ipr, can_reach, 6), f"-iface-can-reach {can_reach}"))
    if attempts:
        link, addr = _first_found(attempts)
    elif ext6 is not None:
        try:
            link, addr = _by_ip(ipr, ext6)
        except InterfaceError:
            raise InterfaceError("Failed to find any valid interface to use") from None
    else:
        link, addr = _by_name(ipr, _default_route_link(ipr, 10).name, version=6)
    if not link.mtu:
        raise InterfaceError(f"failed to determine MTU for {addr} interface")
    if addr.version != 6:
        raise InterfaceError(f"failed to find IPv6 address for interface {link.name}")
    return ExternalInterface(link.name, link.index, None, None, link.mtu, addr, ext6 or addr)


Attempt = tuple[Callable[[], tuple[netlink.LinkInfo, IPAddress]], str]


def _first_found(attempts: list[Attempt]) -> tuple[netlink.LinkInfo, IPAddress]:
    """The first interface one of the attempts (-iface values, then regexes, then -iface-can-reach) finds; else
    upstream's error with what each attempt said."""
    failures = []
    for attempt, label in attempts:
        try:
            return attempt()
        except InterfaceError as e:
            failures.append(f"{label}: {e}")
    raise InterfaceError(
        "Failed to find interface to use that matches the interfaces and/or regexes provided ("
        + "; ".join(failures)
        + ")"
    )


def _is_ip(value: str, version: int = 4) -> bool:
    try:
        ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
        return True
    except ValueError:
        return False
