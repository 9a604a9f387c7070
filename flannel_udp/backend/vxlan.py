"""The vxlan backend (upstream pkg/backend/vxlan): the kernel encapsulates; this module keeps its state in line.

Device flannel.<VNI> (local = public IP, on the external interface, no learning), then per remote vxlan lease a
permanent neighbour entry (remote subnet IP -> its VTEP MAC), an FDB entry (that MAC -> the remote public IP) and an
onlink route to the remote subnet via its subnet IP, in that order and undone in reverse if a step fails. With
DirectRouting a peer on the same link gets a plain route via its public IP instead. A watchdog recreates a deleted
device and replays every peer (upstream forgets them).

Dual stack adds flannel-v6.<VNI> with the same duties for the IPv6 side: local = public IPv6, the lease's IPv6
subnet, PublicIPv6 and BackendV6Data. Each family's device is a `Vtep`; the network drives one or two of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..net import netlink
from ..net.iface import ExternalInterface
from ..subnet.config import NetworkConfig, lookup_key
from ..subnet.lease import NO_PUBLIC_IP, Lease, LeaseAttrs, LeaseEvent, LeaseRemoved
from ..subnet.manager import SubnetManager
from . import Backend, BackendError, BackendTypeFilter, Network, UdpFlags, check_families, room_after
from .options import bool_option, int_option

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

ENCAP_OVERHEAD = 50  # outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14)
ENCAP_OVERHEAD_V6 = 70  # an IPv6 underlay's header is 20 bytes longer
WATCHDOG_PERIOD = 0.5
STEP_RETRIES = 5


@dataclass(frozen=True)
class VxlanOptions:
    vni: int
    port: int  # 0: the kernel's default (defaults.VXLAN_PORT)
    mtu: int  # of the underlay; the device gets mtu - 50
    gbp: bool
    learning: bool
    direct_routing: bool


def parse_options(backend: dict, ext_mtu: int, ipv6: bool = False, ipv4: bool = True) -> VxlanOptions:
    name = "VXLAN"
    mtu = int_option(backend, name, "MTU", ext_mtu, -(1 << 31), 1 << 31)
    mtu_text = f"error decoding VXLAN backend config: MTU {mtu}"
    if ipv4:
        room_after(mtu_text, mtu, ENCAP_OVERHEAD, "VXLAN overhead", 4, "pods")
    if ipv6:
        room_after(mtu_text, mtu, ENCAP_OVERHEAD_V6, "VXLAN-over-IPv6 overhead", 6, "pods")
    return VxlanOptions(
        vni=int_option(backend, name, "VNI", 1, 0, (1 << 24) - 1),
        port=int_option(backend, name, "Port", 0, 0, 65535),
        mtu=mtu,
        gbp=bool_option(backend, name, "GBP"),
        learning=bool_option(backend, name, "Learning"),
        direct_routing=bool_option(backend, name, "DirectRouting"),
    )


def random_mac() -> str:
    """A random unicast, locally administered MAC (upstream pkg/mac)."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


class VxlanBackend(Backend):
    backend_type = "vxlan"
    dual_stack = True

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, flags: UdpFlags) -> None:
        check_families(config, ext)
        self.netlink = nl
        self.ext = ext
        self.config = config
        self.options = parse_options(config.backend, ext.mtu, config.enable_ipv6, config.enable_ipv4)
        vni = self.options.vni
        self.vteps = []  # flannel.<VNI> for IPv4, flannel-v6.<VNI> for IPv6: one device per family the network has
        if config.enable_ipv4:
            mtu = self.options.mtu - ENCAP_OVERHEAD
            self.vteps.append(Vtep(4, f"flannel.{vni}", str(ext.ext_addr), mtu, config.network))
        if config.enable_ipv6:
            self.vteps.append(Vtep(6, f"flannel-v6.{vni}", str(ext.ext_addr6), self.options.mtu - ENCAP_OVERHEAD_V6))

    async def register_network(self, manager: SubnetManager) -> VxlanNetwork:
        # The devices come first: their MACs go into the lease.
        # In kube mode the node's backend-data annotations remember the MACs of the last run: a device that has to
        # be created anew (after a reboot) gets the same MAC, so peers' FDB entries stay right (upstream too).
        stored = manager.stored_mac_addresses()
        created = []  # devices this start made: removed again if no lease comes of it
        for vtep in self.vteps:
            mac = stored[0] if vtep.version == 4 else stored[1]
            existed = await self.netlink.call(netlink.vxlan_info, vtep.name)
            vtep.index, vtep.mac = await self.netlink.call(
                ensure_device, vtep, self.options, self.ext.index, mac or None
            )
            if not existed:
                created.append(vtep)
        v4 = next((vtep for vtep in self.vteps if vtep.version == 4), None)
        v6 = next((vtep for vtep in self.vteps if vtep.version == 6), None)
        attrs = LeaseAttrs(
            self.ext.ext_addr or NO_PUBLIC_IP,
            self.ext.ext_addr6 if v6 else None,
            backend_type=self.backend_type,
            backend_data={"VNI": self.options.vni, "VtepMAC": v4.mac} if v4 else None,
            backend_v6_data={"VNI": self.options.vni, "VtepMAC": v6.mac} if v6 else None,
        )
        try:
            lease = await manager.acquire_lease(attrs)
        except BaseException:
            for vtep in created:
                await self.netlink.call(netlink.delete_link, vtep.index)
            raise
        try:
            for vtep in self.vteps:
                await self._configure(vtep, lease)
        except BaseException:  # the daemon releases a lease this start allocated; the devices it made go here
            for vtep in created:
                await self.netlink.call(netlink.delete_link, vtep.index)
            raise
        return VxlanNetwork(self.netlink, lease, self.vteps, self.options, self.ext, created)

    async def _configure(self, vtep: Vtep, lease: Lease) -> None:
        subnet = lease.subnet if vtep.version == 4 else lease.ipv6_subnet
        if subnet is None:
            raise BackendError(f"the lease has no IPv{vtep.version} subnet for {vtep.name}")
        vtep.subnet = subnet
        await self.netlink.call(configure_device, vtep)
        log.info(
            "%s is up: VNI %d, MAC %s, address %s/%d, MTU %d",
            vtep.name,
            self.options.vni,
            vtep.mac,
            subnet.network_address,
            subnet.max_prefixlen,
            vtep.mtu,
        )


@dataclass
class Vtep:
    """One family's vxlan device and what it needs to (re)build itself."""

    version: int  # 4 or 6: of the pod subnets it routes and of its underlay
    name: str  # flannel.<VNI> or flannel-v6.<VNI>
    local: str  # the public IP of that family
    mtu: int
    network: ipaddress.IPv4Network | None = None  # IPv4 only: other addresses inside it are removed from the device
    index: int = 0
    mac: str = ""
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # own lease's subnet of this family


def ensure_device(ipr: IPRoute, vtep: Vtep, opts: VxlanOptions, link: int, mac: str | None = None) -> tuple[int, str]:
    """Reuse a compatible device (keeping its MAC, so peers' FDB entries stay right); recreate one that is not."""
    existing = netlink.vxlan_info(ipr, vtep.name)
    if existing:
        compatible = (
            existing.vni == opts.vni
            and existing.local in (None, vtep.local)
            and existing.link in (None, 0, link)
            and (not opts.port or (existing.port or 0) in (0, opts.port))
            and existing.gbp == opts.gbp
            and existing.learning == opts.learning
        )
        if compatible:
            netlink.set_link(ipr, existing.index, mtu=vtep.mtu)
            return existing.index, existing.mac
        log.warning("%s exists but does not match the configuration; recreating it", vtep.name)
    if existing is not None:
        netlink.delete_link(ipr, ipr.link_lookup(ifname=vtep.name)[0])
    mac = mac or random_mac()
    index = netlink.create_vxlan(
        ipr, vtep.name, opts.vni, vtep.local, link, opts.port, opts.learning, opts.gbp, mac, vtep.mtu
    )
    netlink.write_sysctl(f"net/ipv6/conf/{vtep.name}/accept_ra", "0")
    return index, mac


def configure_device(ipr: IPRoute, vtep: Vtep) -> None:
    """<subnet IP>/32 (/128), stale addresses removed, up, and the MAC the lease advertises."""
    assert vtep.subnet is not None  # set from the lease before the device is configured
    netlink.keep_only_address(
        ipr, vtep.index, str(vtep.subnet.network_address), vtep.subnet.max_prefixlen, vtep.network
    )
    netlink.set_link(ipr, vtep.index, up=True)
    actual = ipr.get_links(vtep.index)[0].get_attr("IFLA_ADDRESS")
    if actual != vtep.mac:
        raise BackendError(f"flannel device MAC {actual} differs from the advertised {vtep.mac}")


@dataclass(frozen=True)
class PeerState:
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    public_ip: str
    mac: str | None  # None: reached by a direct route


class VxlanNetwork(Network):
    def __init__(
        self,
        nl: netlink.Netlink,
        lease: Lease,
        vteps: list[Vtep],
        options: VxlanOptions,
        ext: ExternalInterface,
        created: list[Vtep] | None = None,
    ) -> None:
        self.netlink = nl
        self.created = created or []  # devices this start made (undo() removes them)
        self.lease = lease
        # One MTU for the pods of both families: the smaller device's, so a full-size packet fits either tunnel.
        self.mtu = min(vtep.mtu for vtep in vteps)
        self.vteps = vteps
        self.options = options
        self.ext = ext
        self.peers: dict[str, dict] = {vtep.name: {} for vtep in vteps}  # device -> remote subnet -> PeerState
        self.device_recreations = 0
        self._types = BackendTypeFilter("vxlan")
        self._lock = asyncio.Lock()  # lease events and the watchdog's replay never interleave

    async def apply(self, events: list[LeaseEvent]) -> None:
        async with self._lock:
            for event in events:
                if not self._types.accepts(event):
                    continue
                for vtep in self.vteps:
                    await self._apply_one(vtep, event)

    async def _apply_one(self, vtep: Vtep, event: LeaseEvent) -> None:
        subnet = event.subnet if vtep.version == 4 else event.ipv6_subnet
        if subnet is None:
            return  # an IPv4-only peer has nothing for the IPv6 device
        peers = self.peers[vtep.name]
        if isinstance(event, LeaseRemoved):
            if subnet in peers:
                await self._remove(vtep, peers.pop(subnet))
            return
        peer = peer_from(event.lease, vtep.version)
        if peer is None:
            return
        old = peers.get(subnet)
        if old is not None and old != peer:
            await self._remove(vtep, old)
        if await self._add(vtep, peer):
            peers[subnet] = peer

    async def _directly_connected(self, public_ip: str) -> bool:
        route = await self.netlink.call(netlink.route_get, public_ip)
        return route is not None and route["gateway"] is None and route["oif"] == self.ext.index

    async def _add(self, vtep: Vtep, peer: PeerState) -> bool:
        """neighbour, FDB, route, each retried; a failure undoes the steps before it."""
        subnet, gateway, index = str(peer.subnet), str(peer.subnet.network_address), vtep.index
        if self.options.direct_routing and await self._directly_connected(peer.public_ip):
            if not await self._retry(direct_route, subnet, peer.public_ip):
                log.error("Cannot add the direct route %s via %s", subnet, peer.public_ip)
                return False
            log.info("Direct route %s via %s", subnet, peer.public_ip)
            return True
        steps: list[tuple[Callable, tuple, Callable, tuple]] = [
            (
                netlink.replace_neighbour,
                (index, gateway, peer.mac),
                netlink.delete_neighbour,
                (index, gateway, peer.mac),
            ),
            (
                netlink.replace_fdb,
                (index, peer.mac, peer.public_ip),
                netlink.delete_fdb,
                (index, peer.mac, peer.public_ip),
            ),
            (route_via_device, (subnet, index, gateway), netlink.delete_route, (subnet,)),
        ]
        done: list[tuple[Callable, tuple]] = []
        for do, do_args, undo, undo_args in steps:
            if not await self._retry(do, *do_args):
                for undo_fn, args in reversed(done):
                    await self._quietly(undo_fn, *args)
                log.error("Cannot add vxlan peer %s (%s, %s); undone", subnet, peer.public_ip, peer.mac)
                return False
            done.append((undo, undo_args))
        log.info("Peer %s via %s (VTEP %s on %s)", subnet, peer.public_ip, peer.mac, vtep.name)
        return True

    async def _remove(self, vtep: Vtep, peer: PeerState) -> None:
        subnet, gateway = str(peer.subnet), str(peer.subnet.network_address)
        await self._quietly(netlink.delete_route, subnet)
        await self._quietly(netlink.delete_neighbour, vtep.index, gateway, peer.mac)
        await self._quietly(netlink.delete_fdb, vtep.index, peer.mac, peer.public_ip)
        log.info("Peer %s removed", subnet)

    async def _retry(self, fn: Callable[..., Any], *args: Any) -> bool:
        delay = 0.05
        for attempt in range(STEP_RETRIES):
            try:
                await self.netlink.call(fn, *args)
                return True
            except (netlink.NetlinkError, OSError) as e:
                if attempt == STEP_RETRIES - 1:
                    log.error("%s%r failed: %s", fn.__name__, args, e)
                    return False
                await asyncio.sleep(delay)
                delay *= 2
        return False

    async def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await self.netlink.call(fn, *args)
        except (netlink.NetlinkError, OSError) as e:
            log.debug("%s%r: %s", fn.__name__, args, e)

    async def supervise(self) -> None:
        """The device watchdog: recreate a deleted (or replaced) device with the same MAC and replay its peers."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            for vtep in self.vteps:
                try:
                    info = await self.netlink.call(netlink.vxlan_info, vtep.name)
                    if info and info.index == vtep.index:
                        continue
                    async with self._lock:
                        peers = self.peers[vtep.name]
                        log.warning("%s disappeared; recreating it and replaying %d peers", vtep.name, len(peers))
                        vtep.index, _ = await self.netlink.call(
                            ensure_device, vtep, self.options, self.ext.index, vtep.mac
                        )
                        await self.netlink.call(configure_device, vtep)
                        for peer in list(peers.values()):
                            await self._add(vtep, peer)
                        self.device_recreations += 1
                except (netlink.NetlinkError, OSError, BackendError) as e:
                    log.error("Cannot recreate %s (trying again): %s", vtep.name, e)

    def collect_metrics(self):
        peers = GaugeMetricFamily("flannel_backend_routes", "Routes to peer subnets installed by the backend")
        peers.add_metric([], sum(len(p) for p in self.peers.values()))
        recreated = CounterMetricFamily("flannel_vxlan_device_recreations", "Times the watchdog recreated a device")
        recreated.add_metric([], self.device_recreations)
        return [peers, recreated]

    async def close(self) -> None:
        pass  # nothing is removed on exit, as upstream: the kernel keeps forwarding across a restart

    async def undo(self) -> None:
        await self.close()
        for vtep in self.created:
            await self.netlink.call(netlink.delete_link, vtep.index)


def peer_from(lease: Lease, version: int) -> PeerState | None:
    """The peer's subnet, public IP and VTEP MAC of one family; None (logged) when the lease lacks them."""
    attrs = lease.attrs
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if version == 4:
        subnet, public_ip, data, field_name = lease.subnet, attrs.public_ip, attrs.backend_data, "BackendData"
    else:
        subnet, public_ip, data, field_name = (
            lease.ipv6_subnet,
            attrs.public_ipv6,
            attrs.backend_v6_data,
            "BackendV6Data",
        )
    if public_ip is None or subnet is None:
        log.error("Ignoring vxlan lease %s: no PublicIPv6 for its IPv6 subnet %s", lease.primary, subnet)
        return None
    mac = lookup_key(data if isinstance(data, dict) else {}, "VtepMAC")  # case-insensitive, as Go decodes it upstream
    if not isinstance(mac, str) or len(mac.split(":")) != 6:
        log.error("Ignoring vxlan lease %s: %s has no valid VtepMAC (%r)", lease.primary, field_name, data)
        return None
    return PeerState(subnet, str(public_ip), mac.lower())


def direct_route(ipr: IPRoute, subnet: str, public_ip: str) -> None:
    netlink.replace_route(ipr, subnet, gateway=public_ip)


def route_via_device(ipr: IPRoute, subnet: str, index: int, gateway: str) -> None:
    netlink.replace_route(ipr, subnet, oif=index, gateway=gateway, onlink=True)
