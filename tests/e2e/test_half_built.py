"""A backend whose set-up fails half way leaves nothing it made: the vxlan devices of a start whose kernel refused
their configuration after the lease was taken, and the udp backend's eventfd when its pump cannot be built. The
kernel's refusal is injected at the netlink seam; the devices are real, in a host's namespace."""

import json
import sys

from testbed.cluster import in_ns

VXLAN_REFUSED = r"""
import asyncio, json, sys
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from flannel_udp.backend import UdpFlags, vxlan
from flannel_udp.net import iface, netlink
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.local.registry import LocalRegistry
from flannel_udp.subnet.manager import Manager


class KernelRefusesConfiguration(netlink.Netlink):
    async def call(self, fn, *args, **kwargs):
        if fn is vxlan.configure_device:
            raise NetlinkError(22, "Invalid argument")
        return await super().call(fn, *args, **kwargs)


async def register(ext):
    config = load_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    registry = LocalRegistry.open_sync(sys.argv[1])
    nl = KernelRefusesConfiguration()
    try:
        await vxlan.VxlanBackend(nl, ext, config, UdpFlags()).register_network(Manager(registry, config))
        return "registered"
    except NetlinkError as e:
        return f"refused: {e}"
    finally:
        nl.close()
        await registry.close()


# pyroute2's IPRoute runs outside the event loop (the agent keeps it on a thread of its own).
with IPRoute() as ipr:
    ext = iface.choose(ipr, ["eth0"], [], "", "", "", False)
outcome = asyncio.run(register(ext))
with IPRoute() as ipr:
    print(json.dumps([outcome, [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]]))
"""

UDP_PUMP_REFUSED = r"""
import asyncio, ipaddress, os, socket
from flannel_udp.backend import UdpFlags
from flannel_udp.backend.udp import UdpNetwork
from flannel_udp.backend.udp_lanes import Lane
from flannel_udp.subnet.lease import Lease, LeaseAttrs


async def main():
    tun, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # An IPv6 subnet the pump cannot read: Pump() raises inside UdpNetwork().
    lease = Lease(ipaddress.ip_network("10.5.1.0/24"), LeaseAttrs(ipaddress.IPv4Address("198.18.0.1")), "bogus")
    before = sorted(os.listdir("/proc/self/fd"))
    try:
        UdpNetwork(lease, 1472, [Lane(tun.fileno(), sock, None)], "flannel0", 8285, UdpFlags(True, False, workers=1))
        print("built")
    except ValueError:
        print("same fds" if sorted(os.listdir("/proc/self/fd")) == before else "leaked fds")


asyncio.run(main())
"""


def test_vxlan_devices_of_a_start_refused_after_its_lease_are_removed(bed):
    host = bed.hosts[0]
    outcome, links = json.loads(in_ns(host.ns, sys.executable, "-c", VXLAN_REFUSED, bed.lease_file).stdout)
    assert outcome == "refused: (22, 'Invalid argument')"
    assert "flannel.1" not in links, links


def test_a_udp_pump_that_cannot_be_built_leaves_no_descriptor_behind(bed):
    assert in_ns(bed.hosts[0].ns, sys.executable, "-c", UDP_PUMP_REFUSED).stdout.strip() == "same fds"
