"""`flannel-udp cleanup`: remove what a node set up in the current network namespace and say what went.

Upstream leaves devices, rules and routes behind on exit so that a restart does not interrupt traffic; this is for
taking a node out of the overlay for good (or after an experiment): flannel0, flannel.<VNI> / flannel-v6.<VNI>, cni0,
the FLANNEL-POSTRTG / FLANNEL-FWD chains and their jumps, the nftables tables, and the blackhole route of the subnet in
subnet.env. Run it with the node stopped.
"""

from __future__ import annotations

import ipaddress
import re

from .net import netlink
from .net.rules import Iptables, RulesError, delete_nft_tables, forward_rules, masq_rules
from .subnet import subnetenv

DEVICE_NAMES = re.compile(r"flannel0|flannel(-v6)?\.\d+|cni0")


def remove_devices(ipr) -> list[str]:
    removed = []
    for link in netlink.links(ipr):
        if link.name and DEVICE_NAMES.fullmatch(link.name):
            netlink.delete_link(ipr, link.index)
            removed.append(f"link {link.name}")
    return removed


def remove_rules() -> list[str]:
    removed = []
    for binary, any_net in (("iptables", "0.0.0.0/32"), ("ip6tables", "::/128")):
        try:
            tool = Iptables(binary)
        except RulesError:
            continue
        net = ipaddress.ip_network(any_net)
        # Deleting the jumps, then flushing and deleting the chains, takes every rule whatever network it was built for.
        removed += tool.remove_chains(masq_rules(net, net, False) + forward_rules(net))
    return removed


def remove_blackhole(ipr, subnet_file: str) -> list[str]:
    removed = []
    for name in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"):
        network = subnetenv.single(subnetenv.read(subnet_file), name)
        if network is not None:
            subnet = str(network)
            if netlink.delete_blackhole(ipr, subnet):
                removed.append(f"route blackhole {subnet}")
    return removed


def cleanup(subnet_file: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        removed = remove_devices(ipr) + remove_blackhole(ipr, subnet_file)
    return removed + remove_rules() + delete_nft_tables()


def run_cleanup(subnet_file: str) -> int:
    removed = cleanup(subnet_file)
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to clean up in this network namespace")
    return 0
