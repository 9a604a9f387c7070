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
    try:
        iptables = Iptables()
    except RulesError:
        return []
    any_net = ipaddress.ip_network("0.0.0.0/32")
    # Deleting the jumps, then flushing and deleting the chains, takes every rule whatever network it was built for.
    return iptables.remove_chains(masq_rules(any_net, any_net, False) + forward_rules(any_net))


def remove_blackhole(ipr, subnet_file: str) -> list[str]:
    entries = subnetenv.read(subnet_file).get("FLANNEL_SUBNET", [])
    if len(entries) != 1:
        return []
    subnet = str(ipaddress.ip_network(entries[0], strict=False))
    return [f"route blackhole {subnet}"] if netlink.delete_blackhole(ipr, subnet) else []


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
