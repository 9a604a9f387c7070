"""IPv6 pods over the udp backend (beyond upstream, whose udp is IPv4-only): dual-stack leases, flannel0 with both
families, pings and TCP over IPv6 on an IPv6 and on an IPv4 underlay, ICMPv6 no-route, hostile IPv6 datagrams dropped
and counted, and the one-line refusals of bad IPv6 configurations."""

import ipaddress
import json
import sqlite3
import sys

import pytest

from testbed.cluster import in_ns, scrape_metrics, wait_for

NETWORK = "10.244.0.0/16"
IPV6_NETWORK = "fd00:10:244::/56"
CONFIG = {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK, "Backend": {"Type": "udp"}}
HEALTH_PORT = 8471


def metric(ns: str, name: str, **labels) -> float:
    return sum(
        value
        for sample, value in scrape_metrics(ns, HEALTH_PORT).items()
        if sample.partition("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items())
    )


def stored_leases(bed) -> dict[str, dict]:
    """The embedded store's leases as a node wrote them ({} before any node made the store)."""
    try:
        with sqlite3.connect(f"file:{bed.lease_file}?mode=ro", uri=True) as db:
            return {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM leases").fetchall()}
    except sqlite3.OperationalError:
        return {}


def subnet6_of(host) -> ipaddress.IPv6Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_IPV6_SUBNET"]).network


@pytest.fixture(params=["ipv6-underlay", "ipv4-underlay"])
def cluster6(bed, request):
    """3 dual-stack udp nodes with a pod each; on the IPv4 underlay the hosts' IPv6 addresses are removed first."""
    bed.underlay = request.param
    if request.param == "ipv4-underlay":
        for host in bed.hosts:
            in_ns(host.ns, "ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global")
    bed.write_config(CONFIG)
    bed.start_cluster(f"--healthz-port={HEALTH_PORT}", "--healthz-ip=127.0.0.1")
    for host in bed.hosts:  # every node has routes for both subnets of every other node
        assert wait_for(lambda host=host: metric(host.ns, "flannel_udp_routes") == 2 * (len(bed.hosts) - 1), 5), (
            bed.logs()
        )
    yield bed


def test_dual_stack_leases_devices_and_subnet_env(cluster6):
    bed = cluster6
    leases = stored_leases(bed)
    assert len(leases) == 3
    for key, value in leases.items():
        assert "&" in key  # upstream's dual-stack key: <IPv4 subnet>&<IPv6 subnet>
        assert value["PublicIP"].startswith("198.18.0.")
        assert value["PublicIPv6"] == (None if bed.underlay == "ipv4-underlay" else value["PublicIPv6"])
        if bed.underlay == "ipv6-underlay":
            assert value["PublicIPv6"].startswith("fd00:198:18::")
    host = bed.hosts[0]
    env = host.subnet_env()
    assert env["FLANNEL_IPV6_NETWORK"] == IPV6_NETWORK and subnet6_of(host).prefixlen == 64
    mtu = 1500 - (48 if bed.underlay == "ipv6-underlay" else 28)
    assert env["FLANNEL_MTU"] == str(mtu)
    link = json.loads(in_ns(host.ns, "ip", "-j", "addr", "show", "flannel0").stdout)[0]
    assert link["mtu"] == mtu
    assert {
        (a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"
    } == {(str(subnet6_of(host).network_address), 128)}
    assert f"{IPV6_NETWORK} dev flannel0" in in_ns(host.ns, "ip", "-6", "route").stdout


def test_pods_reach_each_other_over_both_families_and_tcp_crosses_ipv6(cluster6):
    bed = cluster6
    pods = [h.pods[0] for h in bed.hosts]
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert bed.ping(src.ns, dst.address6), (src.name, dst.name, bed.logs())
                assert bed.ping(src.ns, dst.address), (src.name, dst.name)
    result = bed.iperf3(pods[0], pods[1], 2, ipv6=True)
    received = result["end"]["sum_received"]["bytes"]
    assert received > 10_000_000, result["end"]
    # The IPv6 pod traffic crossed the underlay of the family chosen: the peer counters are keyed by its address.
    peer = bed.hosts[1].address6 if bed.underlay == "ipv6-underlay" else bed.hosts[1].address
    assert metric(bed.hosts[0].ns, "flannel_udp_peer_bytes_total", peer=str(peer), direction="tx") > received


def test_unroutable_ipv6_gets_icmpv6_no_route(cluster6):
    bed = cluster6
    pod = bed.hosts[0].pods[0]
    nowhere = str(ipaddress.IPv6Network(IPV6_NETWORK)[0] + (0xFE << 64) + 1)  # inside the network, in no lease
    out = in_ns(pod.ns, "ping", "-6", "-c", "1", "-W", "1", nowhere, check=False).stdout
    assert "Destination unreachable: No route" in out, out
    assert metric(bed.hosts[0].ns, "flannel_udp_dropped_packets_total", direction="tun_to_udp", reason="no_route") >= 1
    assert metric(bed.hosts[0].ns, "flannel_udp_packets_total", stage="icmp_unreachable_sent") >= 1


HOSTILE6 = """
import socket, sys
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
target, port, family, attacker_pod, victim_pod, target_pod = sys.argv[1:7]
good = IPv6(src=attacker_pod, dst=target_pod, hlim=64) / TCP(dport=80)
bad_length = bytearray(bytes(good)); bad_length[5] += 9
chain = bytes(IPv6(src=attacker_pod, dst=target_pod) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / TCP())
endless = bytearray(bytes(IPv6(src=attacker_pod, dst=target_pod) / IPv6ExtHdrDestOpt() / TCP())); endless[41] = 200
hops = [bytes(IPv6(src=attacker_pod, dst=target_pod, hlim=h) / TCP()) for h in (0, 1)]
spoofed = bytes(IPv6(src=victim_pod, dst=target_pod) / TCP())
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_DGRAM)
for payload in [bytes(bad_length), chain, bytes(endless), *hops, spoofed]:
    for _ in range(5):
        s.sendto(payload, (target, int(port)))
"""


def test_hostile_ipv6_datagrams_are_dropped_and_counted(cluster6):
    bed = cluster6
    attacker, target, victim = bed.hosts[2], bed.hosts[0], bed.hosts[1]
    family = "6" if bed.underlay == "ipv6-underlay" else "4"
    target_address = target.address6 if family == "6" else target.address
    assert bed.ping(attacker.ns, target_address)  # the underlay neighbour is resolved before the burst
    in_ns(
        attacker.ns,
        sys.executable,
        "-c",
        HOSTILE6,
        str(target_address),
        "8285",
        family,
        str(attacker.pods[0].address6),
        str(victim.pods[0].address6),
        str(target.pods[0].address6),
    )

    def drops(reason):
        return metric(target.ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun", reason=reason)

    assert wait_for(lambda: metric(target.ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun") >= 30, 5)
    assert drops("bad_length") == 5
    assert drops("bad_header") == 10  # hop-by-hop after another header; a chain that runs past the end
    assert drops("ttl_expired") == 10  # hop limit 0 and 1
    assert drops("spoofed_source") == 5
    assert metric(target.ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun") == 30
    assert all(host.process.poll() is None for host in bed.hosts)
    assert bed.ping(attacker.pods[0].ns, target.pods[0].address6)


def test_bad_ipv6_configurations_are_one_line(bed):
    host = bed.hosts[0]
    bed.write_config({"Network": NETWORK, "IPv6Network": IPV6_NETWORK, "Backend": {"Type": "udp"}})
    assert bed.run_node_expecting_failure(host) == (
        "error: IPv6Network is set but EnableIPv6 is not: the udp backend would give pods no IPv6 subnet "
        "(set EnableIPv6, or remove IPv6Network)"
    )
    bed.write_config(dict(CONFIG, IPv6SubnetLen=127))
    assert bed.run_node_expecting_failure(host).endswith("SubnetLen must be less than /127")
    bed.write_config(dict(CONFIG, EnableIPv4=False, EnableIPv6=False))
    assert bed.run_node_expecting_failure(host) == (
        "error: none defined stack: the network config turns off both EnableIPv4 and EnableIPv6"
    )
    bed.write_config(CONFIG)
    line = bed.run_node_expecting_failure(host, "--public-ipv6=fd00:198:18::99")
    assert line == (
        "error: -public-ipv6 fd00:198:18::99 is not an address of eth0 (fd00:198:18::1): the udp backend "
        "receives IPv6 underlay traffic on the interface's own address"
    )
    in_ns(host.ns, "ip", "link", "set", "eth0", "mtu", "1300")
    assert bed.run_node_expecting_failure(host) == (
        "error: the MTU of eth0 (1300) leaves 1252 bytes for flannel0 after the 48-byte UDP encapsulation, below "
        "IPv6's minimum of 1280"
    )
    assert not stored_leases(bed)


def test_capture_decodes_ipv6_pods_over_udp_with_verdicts(cluster6):
    from test_capture import finish, start_capture

    bed = cluster6
    h1, h2 = bed.hosts[0], bed.hosts[1]
    p1, p2 = h1.pods[0], h2.pods[0]
    capture = start_capture(
        bed, h2, "--iface", "eth0", "--pod", str(p2.address6), "--proto", "icmp", "--count", "2", "--duration", "15"
    )
    assert bed.ping(p1.ns, p2.address6)
    out = finish(capture)
    outer1, outer2 = (h1.address6, h2.address6) if bed.underlay == "ipv6-underlay" else (h1.address, h2.address)
    assert f"{outer1} [" in out and f"> {outer2} [" in out, out
    request = next(line for line in out.splitlines() if "echo-request" in line)
    assert f"udp: ICMPv6 {p1.address6} > {p2.address6} echo-request (type 128 code 0)" in request, out
    assert request.endswith(" ok") and "DROP" not in out, out
