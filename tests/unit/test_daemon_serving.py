"""What the node does with a fault no task of its serving phase handles: it stops as a signal stops it and says why
in one line (exit status 1 through the command line), instead of a traceback of asyncio's task group."""

import asyncio
import ipaddress

import pytest

from flannel_udp.daemon import Daemon, Options, ServingError
from flannel_udp.subnet.lease import Lease, LeaseAttrs, Snapshot

OWN = Lease(ipaddress.ip_network("10.5.1.0/24"), LeaseAttrs(ipaddress.IPv4Address("198.18.0.1")))
PEER = Lease(ipaddress.ip_network("10.5.2.0/24"), LeaseAttrs(ipaddress.IPv4Address("198.18.0.2")))


class StoreWithOnePeer:
    """The seam the daemon watches: one snapshot with a peer, then nothing."""

    watches_own_lease = False

    async def watch_leases(self):
        yield Snapshot([OWN, PEER], 1)
        await asyncio.Event().wait()


class NetworkThatFailsOnApply:
    """A backend whose kernel refuses the peer's route in a way it does not handle itself."""

    lease = OWN

    async def apply(self, batch):
        raise OSError(22, "Invalid argument (route via 198.18.0.2)")

    async def supervise(self):
        await asyncio.Event().wait()


async def test_a_fault_while_serving_ends_the_node_in_one_line():
    daemon = Daemon(Options(cni_bridge_repair=False, iptables_resync=3600))
    with pytest.raises(ServingError) as info:
        await asyncio.wait_for(daemon._serve(StoreWithOnePeer(), NetworkThatFailsOnApply(), None, None), 5)
    message = str(info.value)
    assert message == (
        "the node stopped on a fault while serving: OSError: [Errno 22] Invalid argument (route via 198.18.0.2)"
    )
    assert "\n" not in message
