"""The host-gw backend (upstream pkg/backend/hostgw + route_network.go): a route per remote host-gw lease via its
public IP on the external interface. No device, no encapsulation; the nodes must share a layer-2 segment. In dual stack,
also a route per remote IPv6 subnet via the peer's PublicIPv6; in an IPv6-only network only those."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client.core import GaugeMetricFamily

from ..net import netlink
from ..net.iface import ExternalInterface
from ..subnet.config import NetworkConfig
from ..subnet.lease import NO_PUBLIC_IP, Lease, LeaseAttrs, LeaseEvent, LeaseRemoved
from ..subnet.manager import SubnetManager
from . import Backend, BackendError, BackendTypeFilter, Network, UdpFlags, check_families

log = logging.getLogger(__name__)

ROUTE_CHECK_PERIOD = 10.0  # upstream's routeCheckRetries period: missing routes are put back this often


class HostGwBackend(Backend):
    backend_type = "host-gw"
    dual_stack = True

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, flags: UdpFlags) -> None:
        if ext.ext_addr != ext.iface_addr:
            raise BackendError(
                "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
                "which is not supported by host-gw backend"
            )
        check_families(config, ext)
        if config.enable_ipv6 and ext.ext_addr6 != ext.iface_addr6:
            raise BackendError(
                "your PublicIPv6 differs from interface IPv6, meaning that probably you're on a NAT, "
                "which is not supported by host-gw backend"
            )
        self.netlink = nl
        self.ext = ext
        self.config = config

    async def register_network(self, manager: SubnetManager) -> RoutedNetwork:
        public_ipv6 = self.ext.ext_addr6 if self.config.enable_ipv6 else None
        attrs = LeaseAttrs(self.ext.ext_addr or NO_PUBLIC_IP, public_ipv6, backend_type=self.backend_type)
        lease = await manager.acquire_lease(attrs)
        return RoutedNetwork(self.netlink, lease, self.ext.mtu, self.ext.index, self.backend_type)


class RoutedNetwork(Network):
    """Routes to peers' subnets via their public IPs, kept in line with lease events and re-checked periodically."""

    def __init__(self, nl: netlink.Netlink, lease: Lease, mtu: int, link_index: int, backend_type: str) -> None:
        self.netlink = nl
        self.lease = lease
        self.mtu = mtu
        self.link_index = link_index
        self.backend_type = backend_type
        self.routes: dict[str, str] = {}  # remote subnet -> gateway (its public IP)
        self._types = BackendTypeFilter(backend_type)

    async def apply(self, events: list[LeaseEvent]) -> None:
        for event in events:
            if not self._types.accepts(event):
                continue
            if isinstance(event, LeaseRemoved):
                for subnet in (event.subnet, event.ipv6_subnet):
                    if subnet is not None:
                        await self._remove_route(str(subnet))
                continue
            lease = event.lease
            for subnet, gateway in (
                (lease.subnet, lease.attrs.public_ip),
                (lease.ipv6_subnet, lease.attrs.public_ipv6),
            ):
                if subnet is None or self._family_off(subnet.version):
                    continue  # a peer without this family, or a node without it
                if gateway is not None:
                    await self._add_route(str(subnet), str(gateway))

    def _family_off(self, version: int) -> bool:
        return (self.lease.ipv6_subnet if version == 6 else self.lease.subnet) is None

    async def _add_route(self, subnet: str, gateway: str) -> None:
        self.routes[subnet] = gateway
        try:
            await self.netlink.call(netlink.replace_route, subnet, oif=self.link_index, gateway=gateway)
            log.info("Route %s via %s", subnet, gateway)
        except netlink.NetlinkError as e:  # e.g. a next hop that is not on-link: logged, as upstream
            log.error("Cannot add route %s via %s: %s", subnet, gateway, e)

    async def _remove_route(self, subnet: str) -> None:
        if self.routes.pop(subnet, None) is None:
            return
        try:
            await self.netlink.call(netlink.delete_route, subnet)
            log.info("Route %s removed", subnet)
        except netlink.NetlinkError as e:
            log.error("Cannot remove route %s: %s", subnet, e)

    async def supervise(self) -> None:
        """Upstream's route check: every ROUTE_CHECK_PERIOD, a missing route to a peer is put back."""
        while True:
            await asyncio.sleep(ROUTE_CHECK_PERIOD)
            try:
                present = {
                    (r["dst"], r["gateway"])
                    for family in (2, 10)  # AF_INET, AF_INET6
                    for r in await self.netlink.call(netlink.routes, family)
                }
                for subnet, gateway in list(self.routes.items()):
                    if (subnet, gateway) not in present:
                        await self.netlink.call(netlink.replace_route, subnet, oif=self.link_index, gateway=gateway)
                        log.info("Route recovered: %s via %s", subnet, gateway)
            except netlink.NetlinkError as e:
                log.error("Route check failed: %s", e)

    def collect_metrics(self):
        routes = GaugeMetricFamily("flannel_backend_routes", "Routes to peer subnets installed by the backend")
        routes.add_metric([], len(self.routes))
        return [routes]

    async def close(self) -> None:
        pass  # nothing is removed on exit, as upstream: traffic keeps flowing across a restart
