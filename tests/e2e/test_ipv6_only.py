"""IPv6-only networks (EnableIPv4 false) on underlays that carry no IPv4 at all: every backend on the embedded store and
with the Kubernetes subnet manager, pods with IPv6 addresses alone, subnet.env and rules of one family, and nothing of
IPv4 created anywhere (no address, socket, device, route or rule)."""

import ipaddress
import json
import sqlite3
import sys

import pytest

from testbed import kubeserver
from testbed.cluster import in_ns, wait_for

IPV6_NETWORK = "fd00:10:244::/56"
PREFIX = "flannel.alpha.coreos.com/"
needs_kube = pytest.mark.skipif(not kubeserver.available(), reason="Kubernetes binaries not built (scripts/setup.sh)")


def ipv6_only_config(backend: str) -> dict:
    return {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK, "Backend": {"Type": backend}}


def subnet6_of(host) -> ipaddress.IPv6Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_IPV6_SUBNET"]).network


def ipv4_addresses(ns: str) -> list[str]:
    """Every IPv4 address of a namespace outside loopback."""
    links = json.loads(in_ns(ns, "ip", "-j", "-4", "addr", "show").stdout)
    return [f"{a['local']} on {link['ifname']}" for link in links if link["ifname"] != "lo" for a in link["addr_info"]]


def stored_leases(bed) -> dict[str, str]:
    with sqlite3.connect(f"file:{bed.lease_file}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT key, value FROM leases").fetchall())


def ping_matrix(bed, within: float = 5) -> None:
    pods = [host.pods[0] for host in bed.hosts]
    for src in pods:
        for dst in pods:
            if src is not dst:
                reached = wait_for(lambda s=src, d=dst: bed.ping(s.ns, d.address6, timeout=0.5), within)
                assert reached, f"{src.name} -> {dst.name}\n{bed.logs()}"


def assert_ipv6_only_state(bed, backend: str) -> None:
    """subnet.env of one family, pods and hosts without IPv4, ip6tables rules and no IPv4 ones, the backend's
    devices of one family."""
    for host in bed.hosts:
        with open(host.subnet_file) as f:
            names = [line.split("=", 1)[0] for line in f]
        assert names == ["FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
        assert host.subnet_env()["FLANNEL_IPV6_NETWORK"] == IPV6_NETWORK
        pod = host.pods[0]
        assert pod.address is None and pod.address6 in subnet6_of(host)
        for ns in (host.ns, pod.ns):
            assert ipv4_addresses(ns) == [], ns
        assert "FLANNEL-POSTRTG" in in_ns(host.ns, "ip6tables", "-t", "nat", "-S").stdout
        v4_rules = "".join(in_ns(host.ns, "iptables", "-t", table, "-S").stdout for table in ("nat", "filter"))
        assert "FLANNEL" not in v4_rules
        assert in_ns(host.ns, "ip", "-4", "route", "show").stdout.strip() == ""
    host, peer = bed.hosts[0], bed.hosts[1]
    assert in_ns(host.ns, "ip", "link", "show", "flannel.1", check=False).returncode != 0
    if backend == "udp":
        flannel0 = json.loads(in_ns(host.ns, "ip", "-j", "addr", "show", "dev", "flannel0").stdout)[0]
        assert [(a["family"], a["local"], a["prefixlen"]) for a in flannel0["addr_info"] if a["scope"] == "global"] == [
            ("inet6", str(subnet6_of(host).network_address), 128)
        ]
        sockets = in_ns(host.ns, "ss", "-Hlun", "sport = :8285").stdout.split()
        assert f"[{host.address6}]:8285" in sockets and not any(s.startswith("0.0.0.0") for s in sockets), sockets
    elif backend == "vxlan":
        data = json.loads(in_ns(host.ns, "ip", "-j", "-d", "link", "show", "flannel-v6.1").stdout)[0]
        assert data["linkinfo"]["info_data"]["local6"] == str(host.address6)
    else:
        route = json.loads(in_ns(host.ns, "ip", "-j", "-6", "route", "show", str(subnet6_of(peer))).stdout)[0]
        assert (route["gateway"], route["dev"]) == (str(peer.address6), "eth0")


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_embedded_store_ipv6_only_cluster(bed6, backend):
    bed = bed6
    bed.write_config(ipv6_only_config(backend))
    bed.start_cluster("--ip-masq")
    ping_matrix(bed)
    assert_ipv6_only_state(bed, backend)
    # The embedded store's IPv6-only keys: the IPv6 subnet alone; PublicIP is the zero address, as upstream leaves it.
    leases = stored_leases(bed)
    for host in bed.hosts:
        value = json.loads(leases[f"{subnet6_of(host).network_address}-64"])
        assert value["PublicIP"] == "0.0.0.0" and value["PublicIPv6"] == str(host.address6)
        assert value["BackendType"] == backend
    listing = bed.cli(bed.hosts[0].ns, "leases", "list", *bed.store_args()).stdout
    assert all(str(subnet6_of(host)) in listing for host in bed.hosts), listing
    if backend == "udp":
        pods = [host.pods[0] for host in bed.hosts]
        assert bed.iperf3(pods[0], pods[1], 1, ipv6=True)["end"]["sum_received"]["bytes"] > 1_000_000


def test_embedded_store_ipv6_only_lease_is_kept_across_a_restart_and_freed_by_delete(bed6):
    bed = bed6
    bed.write_config(ipv6_only_config("udp"))
    bed.start_cluster()
    host, peer = bed.hosts[0], bed.hosts[1]
    before = subnet6_of(host)
    assert bed.stop_node(host) == 0
    bed.start_node(host)
    assert subnet6_of(host) == before  # found again by its PublicIPv6
    assert bed.stop_node(host) == 0
    bed.cli(host.ns, "leases", "delete", str(before), *bed.store_args())
    assert f"{before.network_address}-64" not in stored_leases(bed)
    assert wait_for(lambda: f"Route {before} removed" in bed.node_log(peer), 3), bed.node_log(peer)


@needs_kube
@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_kube_ipv6_only_cluster(bed6, backend):
    bed = bed6
    bed.write_config(ipv6_only_config(backend))
    bed.start_kube()  # on the IPv6 underlay; kube-controller-manager has the IPv6 cluster CIDR alone
    bed.start_cluster("--ip-masq")
    ping_matrix(bed)
    assert_ipv6_only_state(bed, backend)
    for host in bed.hosts:
        node = bed.kube.get_node(host.node_name)
        assert list(node.spec.podCIDRs) == [str(subnet6_of(host))]
        ann = node.metadata.annotations
        assert ann[PREFIX + "public-ipv6"] == str(host.address6)
        assert ann[PREFIX + "backend-type"] == backend and ann[PREFIX + "kube-subnet-manager"] == "true"
        if backend == "vxlan":
            mac = in_ns(host.ns, "cat", "/sys/class/net/flannel-v6.1/address").stdout.strip()
            assert json.loads(ann[PREFIX + "backend-v6-data"]) == {"VNI": 1, "VtepMAC": mac}
            assert PREFIX + "backend-data" not in ann and PREFIX + "public-ip" not in ann


def test_nftables_rules_of_an_ipv6_only_node_are_ip6_alone(bed6):
    bed = bed6
    bed.write_config(dict(ipv6_only_config("host-gw"), EnableNFTables=True))
    host = bed.hosts[0]
    bed.start_node(host, "--ip-masq")
    assert in_ns(host.ns, "nft", "list", "tables").stdout.split("\n")[:-1] == ["table ip6 flannel-ipv6"]
    table = in_ns(host.ns, "nft", "list", "table", "ip6", "flannel-ipv6").stdout
    assert f"ip6 saddr {IPV6_NETWORK} ip6 daddr != ff00::/8 masquerade" in table


@needs_kube
def test_kube_node_without_an_ipv6_pod_cidr_is_one_clear_line(bed6):
    bed = bed6
    bed.write_config(ipv6_only_config("vxlan"))
    bed.start_kube()
    host = bed.hosts[0]
    bed.register_node(host, wait_cidr=False, pod_cidrs=["10.244.7.0/24"])
    assert bed.run_node_expecting_failure(host) == (
        f'error: node "{host.node_name}" has no IPv6 podCIDR (10.244.7.0/24) but the network is IPv6-only '
        "(EnableIPv4 false): give kube-controller-manager an IPv6 cluster CIDR"
    )
    assert in_ns(host.ns, "ip", "link", "show", "flannel-v6.1", check=False).returncode != 0


def test_etcd_refuses_ipv6_only_in_one_line(bed):
    """Upstream's etcd key schema has no IPv6-only form: refused before anything is stored or configured."""
    bed.write_config(ipv6_only_config("vxlan"))
    result = bed.cli(
        bed.hosts[0].ns, "config", "put", bed.config_file, "--etcd-endpoints", "http://127.0.0.1:1", check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bed.config_file}: IPv6-only networks are not supported with etcd (EnableIPv4 false): upstream's "
        "subnet keys always carry an IPv4 subnet"
    )


PUT_CONFIG = """
import asyncio, sys, aetcd
async def main():
    async with aetcd.Client(host=sys.argv[1], port=2379) as client:
        await client.put(b"/coreos.com/network/config", sys.argv[2].encode())
asyncio.run(main())
"""


def test_etcd_node_refuses_an_ipv6_only_config_it_finds_there(bed):
    etcd = bed.start_etcd()
    host = bed.hosts[0]
    in_ns(host.ns, sys.executable, "-c", PUT_CONFIG, etcd.members[0].host, json.dumps(ipv6_only_config("host-gw")))
    assert bed.run_node_expecting_failure(host) == (
        "error: IPv6-only networks are not supported with etcd (its network config has EnableIPv4 false): upstream's "
        "subnet keys always carry an IPv4 subnet; use the Kubernetes subnet manager or the embedded store, or set "
        "EnableIPv4 (dual stack)"
    )


def test_capture_on_an_ipv6_only_udp_node(bed6):
    """The capture mode on the IPv6 underlay and on flannel0 of an IPv6-only node: the nodes' IPv6 subnets, the next
    hop, and the receiving pump's verdict."""
    from test_capture import finish, start_capture

    bed = bed6
    bed.write_config(ipv6_only_config("udp"))
    bed.start_cluster()
    h1, h2 = bed.hosts[0], bed.hosts[1]
    p1, p2 = h1.pods[0], h2.pods[0]
    underlay = start_capture(bed, h2, "--iface", "eth0", "--proto", "icmp", "--count", "2", "--duration", "15")
    tun = start_capture(bed, h1, "--iface", "flannel0", "--proto", "icmp", "--count", "2", "--duration", "15")
    assert bed.ping(p1.ns, p2.address6)
    out, tun_out = finish(underlay), finish(tun)
    request = next(line for line in out.splitlines() if "echo-request" in line)
    assert f"{h1.address6} [{subnet6_of(h1)}]" in request and f"> {h2.address6} [{subnet6_of(h2)}]" in request, out
    assert f"udp: ICMPv6 {p1.address6} > {p2.address6} echo-request" in request and request.endswith(" ok"), out
    leaving = next(line for line in tun_out.splitlines() if "echo-request" in line)
    assert f"flannel0 > {h2.address6} [{subnet6_of(h2)}] ICMPv6 {p1.address6} > {p2.address6}" in leaving, tun_out
