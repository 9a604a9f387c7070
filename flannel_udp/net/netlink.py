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

    def _handle(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute(use_event_loop=asyncio.SelectorEventLoop())
        return self._ipr

    async def call(self, fn, *args, **kwargs):
        """Run fn(ipr, *args, **kwargs) on the netlink thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._handle(), *args, **kwargs))

    def call_sync(self, fn, *args, **kwargs):
        return self._executor.submit(lambda: fn(self._handle(), *args, **kwargs)).result()

    def close(self) -> None:
        def shut():
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
        self._executor.submit(shut).result()
        self._executor.shutdown(wait=True)


# -- operations, run on the netlink thread via Netlink.call(op, ...) ----------------------------------------------
def links(ipr: IPRoute) -> list[LinkInfo]:
    return [LinkInfo(link.get("ifname"), link["index"], link.get("mtu"), bool(link["flags"] & 1)) for link in ipr.get_links()]


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


def replace_route(ipr: IPRoute, dst: str, oif: int | None = None, gateway: str | None = None, onlink: bool = False,
                  scope: int | None = None) -> None:
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
        out.append({
            "dst": f"{dst}/{msg['dst_len']}" if dst else ("0.0.0.0/0" if family == 2 else "::/0"),
            "gateway": msg.get_attr("RTA_GATEWAY"),
            "oif": msg.get_attr("RTA_OIF"),
            "type": msg["type"],
        })
    return out


def route_get(ipr: IPRoute, dst: str) -> dict | None:
    try:
        msg = ipr.route("get", dst=dst)[0]
    except NetlinkError:
        return None
    return {"oif": msg.get_attr("RTA_OIF"), "src": msg.get_attr("RTA_PREFSRC"), "gateway": msg.get_attr("RTA_GATEWAY")}
