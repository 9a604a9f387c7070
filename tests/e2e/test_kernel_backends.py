"""The vxlan and host-gw backends end to end: 3 hosts with pods in namespaces, the kernel state upstream sets up, peers
leaving and joining, a deleted vxlan device coming back, and bad options as one-line errors."""

import ipaddress
import json
import sys

import pytest

from testbed.cluster import in_ns, wait_for

NETWORK = "10.244.0.0/16"


@pytest.fixture(params=["vxlan", "host-gw"])
def kernel_cluster(bed, request):
    bed.write_config({"Network": NETWORK, "Backend": {"Type": request.param}})
    bed.start_cluster()
    bed.backend = request.param
    assert wait_for(lambda: all(routes_to_peers(bed, h) == len(bed.hosts) - 1 for h in bed.hosts), 5), bed.logs()
    yield bed


def subnet_of(host) -> ipaddress.IPv4Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network


def routes(host) -> list[dict]:
    return json.loads(in_ns(host.ns, "ip", "-j", "route", "show").stdout)


def routes_to_peers(bed, host) -> int:
    return sum(1 for r in routes(host) if r["dst"].startswith("10.244.") and r.get("dev") != "cni0")


def neighbours(host, dev="flannel.1") -> dict:
    return {n["dst"]: n for n in json.loads(in_ns(host.ns, "ip", "-j", "neigh", "show", "dev", dev).stdout)}


def fdb(host, dev="flannel.1") -> dict:
    return {
        f["mac"]: f
        for f in json.loads(in_ns(host.ns, "bridge", "-j", "fdb", "show", "dev", dev).stdout)
        if f.get("dst")
    }


def leases(bed, host) -> str:
    return bed.cli(host.ns, "leases", *bed.store_args()).stdout


def test_pods_ping_every_direction_and_tcp_flows(kernel_cluster):
    bed = kernel_cluster
    pods = [h.pods[0] for h in bed.hosts]
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert bed.ping(src.ns, dst.address, count=2, interval=0.1), f"{src.name} -> {dst.name}\n{bed.logs()}"
    assert bed.iperf3(pods[0], pods[1], 1)["end"]["sum_received"]["bytes"] > 1_000_000


def test_kernel_state_matches_upstream(kernel_cluster):
    bed = kernel_cluster
    h1, h2 = bed.hosts[0], bed.hosts[1]
    env = h1.subnet_env()
    by_dst = {r["dst"]: r for r in routes(h1)}
    peer = by_dst[str(subnet_of(h2))]
    if bed.backend == "host-gw":
        assert env["FLANNEL_MTU"] == "1500"
        assert (peer["gateway"], peer["dev"]) == (str(h2.address), "eth0")
        assert "host-gw" in leases(bed, h1)
        return
    assert env["FLANNEL_MTU"] == "1450"
    link = json.loads(in_ns(h1.ns, "ip", "-j", "-d", "addr", "show", "flannel.1").stdout)[0]
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["local"], data.get("port", 8472), data["learning"]) == (1, str(h1.address), 8472, False)
    assert link["mtu"] == 1450 and link["address"][1] in "26ae"  # locally administered unicast MAC
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
        (str(subnet_of(h1).network_address), 32)
    ]
    # Peer h2: neighbour, FDB entry, onlink route via its subnet IP; its MAC is the one h2 advertises in its lease.
    h2_mac = json.loads(in_ns(h2.ns, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]
    gw = str(subnet_of(h2).network_address)
    assert neighbours(h1)[gw]["lladdr"] == h2_mac and "PERMANENT" in neighbours(h1)[gw]["state"]
    assert fdb(h1)[h2_mac]["dst"] == str(h2.address)
    assert (peer["gateway"], peer["dev"], "onlink" in peer["flags"]) == (gw, "flannel.1", True)


def test_peer_leaving_is_cleaned_up_and_a_late_joiner_is_reachable(kernel_cluster):
    bed = kernel_cluster
    h1, gone = bed.hosts[0], bed.hosts[2]
    gone_subnet = subnet_of(gone)
    gone_mac = (
        json.loads(in_ns(gone.ns, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]
        if bed.backend == "vxlan"
        else None
    )
    assert bed.stop_node(gone) == 0
    bed.cli(gone.ns, "leases", "delete", str(gone_subnet), *bed.store_args())

    def cleaned():
        if str(gone_subnet) in {r["dst"] for r in routes(h1)}:
            return False
        return bed.backend == "host-gw" or (
            str(gone_subnet.network_address) not in neighbours(h1) and gone_mac not in fdb(h1)
        )

    assert wait_for(cleaned, 2.0), bed.logs()

    late = bed.add_host()
    bed.start_node(late)
    late_pod = bed.add_pod(late)
    assert wait_for(lambda: bed.ping(h1.pods[0].ns, late_pod.address, timeout=0.3), 2.0), bed.logs()


def test_deleted_vxlan_device_comes_back_with_every_peer(bed):
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    for host in bed.hosts:
        bed.start_node(host)
        bed.add_pod(host)
    h1 = bed.hosts[0]
    assert wait_for(lambda: routes_to_peers(bed, h1) == 2, 5)
    mac = json.loads(in_ns(h1.ns, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]
    in_ns(h1.ns, "ip", "link", "del", "flannel.1")
    assert wait_for(lambda: routes_to_peers(bed, h1) == 2 and len(fdb(h1)) == 2, 5), bed.logs()
    assert json.loads(in_ns(h1.ns, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"] == mac
    for other in bed.hosts[1:]:
        assert wait_for(lambda other=other: bed.ping(h1.pods[0].ns, other.pods[0].address, timeout=0.5), 3), bed.logs()
    assert "disappeared; recreating it and replaying 2 peers" in bed.node_log(h1)


def test_restart_keeps_the_vxlan_mac_and_subnet(bed):
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    host = bed.hosts[0]
    bed.start_node(host)
    before = (
        host.subnet_env()["FLANNEL_SUBNET"],
        json.loads(in_ns(host.ns, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"],
    )
    assert bed.stop_node(host) == 0
    assert in_ns(host.ns, "ip", "link", "show", "flannel.1", check=False).returncode == 0  # left in place, as upstream
    bed.start_node(host)
    after = (
        host.subnet_env()["FLANNEL_SUBNET"],
        json.loads(in_ns(host.ns, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"],
    )
    assert before == after


def test_host_gw_route_follows_a_changed_public_ip(bed):
    """Upstream's route_network test: a lease re-added with another gateway replaces the route; one route remains."""
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "host-gw"}})
    h1 = bed.hosts[0]
    bed.start_node(h1)
    code = (
        "import asyncio, ipaddress, sys\nfrom flannel_udp.subnet.local.registry import LocalRegistry\n"
        "from flannel_udp.subnet.lease import LeaseAttrs\n"
        "async def main():\n r = LocalRegistry.open_sync(sys.argv[1])\n"
        " attrs = LeaseAttrs(ipaddress.IPv4Address('%s'), backend_type='host-gw')\n"
        " await r.update_subnet(ipaddress.ip_network('10.244.200.0/24'), None, attrs, 60)\n"
        " await r.close()\nasyncio.run(main())\n"
    )
    for gateway in ("198.18.0.2", "198.18.0.3"):
        in_ns(h1.ns, sys.executable, "-c", code % gateway, bed.lease_file)
        assert wait_for(
            lambda gateway=gateway: (
                [r.get("gateway") for r in routes(h1) if r["dst"] == "10.244.200.0/24"] == [gateway]
            ),
            2,
        ), bed.logs()


@pytest.mark.parametrize(
    "backend, message",
    [
        (
            {"Type": "vxlan", "VNI": 16777216},
            "error: error decoding VXLAN backend config: VNI must be from 0 to 16777215, got 16777216",
        ),
        (
            {"Type": "vxlan", "VNI": "one"},
            "error: error decoding VXLAN backend config: VNI must be an integer, got 'one'",
        ),
        ({"Type": "vxlan", "MTU": -1}, "error: error decoding VXLAN backend config: MTU -1 leaves -51 bytes"),
        ({"Type": "vxlan", "MTU": 100}, "error: error decoding VXLAN backend config: MTU 100 leaves 50 bytes"),
        (
            {"Type": "vxlan", "DirectRouting": "yes"},
            "error: error decoding VXLAN backend config: DirectRouting must be true or false",
        ),
        ({"Type": "hostgw"}, "error: unknown backend type: hostgw"),
    ],
)
def test_bad_backend_options_are_one_clear_line(bed, backend, message):
    bed.write_config({"Network": NETWORK, "Backend": backend})
    host = bed.hosts[0]
    assert bed.run_node_expecting_failure(host).startswith(message)
    assert in_ns(host.ns, "ip", "link", "show", "flannel.1", check=False).returncode != 0
    assert str(host.address) not in leases(bed, host)


def test_host_gw_refuses_nat(bed):
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "host-gw"}})
    host = bed.hosts[0]
    assert bed.run_node_expecting_failure(host, "--public-ip", "203.0.113.7") == (
        "error: your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported "
        "by host-gw backend"
    )


def test_a_failed_vxlan_start_removes_the_device_and_releases_the_lease(bed, tmp_path):
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    host = bed.hosts[0]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    line = bed.run_node_expecting_failure(host, f"--subnet-file={not_a_dir}/subnet.env")
    assert line == f"error: cannot write the subnet file {not_a_dir}/subnet.env: Not a directory"
    assert in_ns(host.ns, "ip", "link", "show", "flannel.1", check=False).returncode != 0
    leases = in_ns(
        host.ns, sys.executable, "-m", "flannel_udp", "leases", "--lease-file", bed.lease_file, check=False
    ).stdout
    assert str(host.address) not in leases
