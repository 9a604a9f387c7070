"""All netlink work of the daemon, on one dedicated thread.

pyroute2 cannot run on uvloop (its async socket wants a selector loop, and the sync API refuses a running loop), so one
thread owns one IPRoute built on its own SelectorEventLoop, and the event loop calls it through run_in_executor.
Every change is idempotent (replace, never add) so that a restart or a retry never fails on EEXIST.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
from dataclasses import dataclass
from typing import Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

MAIN_TABLE = 254


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    mtu: int
    up: bool


@dataclass(frozen=True)
class AddrInfo:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    flags: int


class Netlink:
    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: IPRoute | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # pyroute2's, on the netlink thread

    def _handle(self) -> IPRoute:
        if self._ipr is None:
            self._loop = asyncio.SelectorEventLoop()
            self._ipr = IPRoute(use_event_loop=self._loop)
        return self._ipr

    async def call(self, fn, *args, **kwargs):
        """Run fn(ipr, *args, **kwargs) on the netlink thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._handle(), *args, **kwargs))

    def close(self) -> None:
        def shut():
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self._loop is not None:
                # pyroute2 leaves a loop it was given open; one left to the garbage collector at exit fails there
                # (its self-pipe is gone by then) and prints a traceback after the node's last line.
                self._loop.close()
                self._loop = None

        self._executor.submit(shut).result()
        self._executor.shutdown(wait=True)


# -- operations, run on the netlink thread via Netlink.call(op, ...) ----------------------------------------------
def links(ipr: IPRoute) -> list[LinkInfo]:
    return [
        LinkInfo(link.get("ifname"), link["index"], link.get("mtu"), bool(link["flags"] & 1))
        for link in ipr.get_links()
    ]


def link_by_name(ipr: IPRoute, name: str) -> LinkInfo | None:
    return next((link for link in links(ipr) if link.name == name), None)


def link_by_index(ipr: IPRoute, index: int) -> LinkInfo | None:
    return next((link for link in links(ipr) if link.index == index), None)


def addresses(ipr: IPRoute, index: int, family: int = 2) -> list[AddrInfo]:
    out = []
    for msg in ipr.get_addr(index=index, family=family):
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        out.append(AddrInfo(ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")), msg["prefixlen"], flags))
    return out


def set_link(ipr: IPRoute, index: int, mtu: int | None = None, up: bool = True, txqlen: int | None = None) -> None:
    kwargs = {"mtu": mtu} if mtu else {}
    if txqlen:
        kwargs["txqlen"] = txqlen
    ipr.link("set", index=index, state="up" if up else "down", **kwargs)


def replace_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    ipr.addr("replace", index=index, address=address, prefixlen=prefixlen)


def replace_route(
    ipr: IPRoute,
    dst: str,
    oif: int | None = None,
    gateway: str | None = None,
    onlink: bool = False,
    scope: int | None = None,
) -> None:
    kwargs: dict = {"dst": dst, "table": MAIN_TABLE}
    if oif is not None:
        kwargs["oif"] = oif
    if gateway is not None:
        kwargs["gateway"] = gateway
    if onlink:
        kwargs["flags"] = ["onlink"]
    if scope is not None:
        kwargs["scope"] = scope
    ipr.route("replace", **kwargs)


def delete_route(ipr: IPRoute, dst: str) -> bool:
    try:
        ipr.route("del", dst=dst, table=MAIN_TABLE)
        return True
    except NetlinkError as e:
        if e.code in (3, 2):  # ESRCH / ENOENT: already gone
            return False
        raise


def routes(ipr: IPRoute, family: int = 2) -> list[dict]:
    out = []
    for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
        dst = msg.get_attr("RTA_DST")
        out.append(
            {
                "dst": f"{dst}/{msg['dst_len']}" if dst else ("0.0.0.0/0" if family == 2 else "::/0"),
                "gateway": msg.get_attr("RTA_GATEWAY"),
                "oif": msg.get_attr("RTA_OIF"),
                "type": msg["type"],
            }
        )
    return out


def route_get(ipr: IPRoute, dst: str) -> dict | None:
    try:
        msg = ipr.route("get", dst=dst)[0]
    except NetlinkError:
        return None
    return {"oif": msg.get_attr("RTA_OIF"), "src": msg.get_attr("RTA_PREFSRC"), "gateway": msg.get_attr("RTA_GATEWAY")}


# -- kernel backends: vxlan devices, neighbours, FDB ----------------------------------------------------------------
NUD_PERMANENT = 0x80
NTF_SELF = 0x02


@dataclass(frozen=True)
class VxlanInfo:
    index: int
    vni: int
    local: str | None
    link: int | None
    port: int | None
    gbp: bool
    learning: bool
    mac: str
    mtu: int


def vxlan_info(ipr: IPRoute, name: str) -> VxlanInfo | Literal[False] | None:
    """The vxlan device `name`; None if there is no such link, False if it exists but is no vxlan."""
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    link = ipr.get_links(found[0])[0]
    if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan":
        return False
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    local = data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6")
    return VxlanInfo(
        link["index"],
        data.get_attr("IFLA_VXLAN_ID"),
        local,
        data.get_attr("IFLA_VXLAN_LINK"),
        data.get_attr("IFLA_VXLAN_PORT"),
        data.get_attr("IFLA_VXLAN_GBP") is not None,
        bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        link.get_attr("IFLA_ADDRESS"),
        link.get_attr("IFLA_MTU"),
    )


def create_vxlan(
    ipr: IPRoute, name: str, vni: int, local: str, link: int, port: int, learning: bool, gbp: bool, mac: str, mtu: int
) -> int:
    local_key = "vxlan_local6" if ":" in local else "vxlan_local"  # the underlay's family follows the local address
    kwargs = {"vxlan_id": vni, local_key: local, "vxlan_link": link, "vxlan_learning": int(learning)}
    if port:
        kwargs["vxlan_port"] = port
    if gbp:
        kwargs["vxlan_gbp"] = True
    ipr.link("add", ifname=name, kind="vxlan", address=mac, mtu=mtu, **kwargs)
    return ipr.link_lookup(ifname=name)[0]


def delete_link(ipr: IPRoute, index: int) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != 19:  # ENODEV: already gone
            raise


def keep_only_address(
    ipr: IPRoute, index: int, address: str, prefixlen: int, inside: ipaddress.IPv4Network | None
) -> None:
    """Upstream's EnsureV4AddressOnLink / EnsureV6AddressOnLink: our address on the link; any other IPv4 address of it
    inside `inside` gone, or for IPv6 every other address that is not link-local."""
    wanted = ipaddress.ip_interface(f"{address}/{prefixlen}")
    for a in addresses(ipr, index, 2 if wanted.version == 4 else 10):
        stale = (inside is not None and a.address in inside) if wanted.version == 4 else not a.address.is_link_local
        if stale and (a.address, a.prefixlen) != (wanted.ip, prefixlen):
            ipr.addr("del", index=index, address=str(a.address), prefixlen=a.prefixlen)
    replace_address(ipr, index, address, prefixlen)


def replace_neighbour(ipr: IPRoute, index: int, ip: str, mac: str) -> None:
    ipr.neigh("replace", ifindex=index, dst=ip, lladdr=mac, state=NUD_PERMANENT)


def delete_neighbour(ipr: IPRoute, index: int, ip: str, mac: str) -> None:
    ipr.neigh("del", ifindex=index, dst=ip, lladdr=mac)


def replace_fdb(ipr: IPRoute, index: int, mac: str, dst: str) -> None:
    ipr.fdb("replace", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF, state=NUD_PERMANENT)


def delete_fdb(ipr: IPRoute, index: int, mac: str, dst: str) -> None:
    ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF, state=NUD_PERMANENT)


def write_sysctl(path: str, value: str) -> bool:
    try:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


RTN_BLACKHOLE = 6


def ensure_blackhole(ipr: IPRoute, dst: str) -> bool:
    """`blackhole <dst>` unless a blackhole route for dst exists; True if it was added."""
    net = ipaddress.ip_network(dst)
    for msg in ipr.get_routes(family=2 if net.version == 4 else 10, table=MAIN_TABLE):
        if (
            msg["type"] == RTN_BLACKHOLE
            and msg["dst_len"] == net.prefixlen
            and msg.get_attr("RTA_DST") == str(net.network_address)
        ):
            return False
    ipr.route("add", dst=dst, table=MAIN_TABLE, type=RTN_BLACKHOLE)
    return True


def delete_blackhole(ipr: IPRoute, dst: str) -> bool:
    try:
        ipr.route("del", dst=dst, table=MAIN_TABLE, type=RTN_BLACKHOLE)
        return True
    except NetlinkError:
        return False
