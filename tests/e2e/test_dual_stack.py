"""Dual stack (EnableIPv6) on the kernel backends, as upstream: flannel-v6.<VNI> or IPv6 host-gw routes beside the
IPv4 ones, PublicIPv6 and BackendV6Data in the lease, IPv6 ranges from the CNI plugin, ip6tables rules; and the
refusals that come with it, each one line and exit status 1."""

import ipaddress
import json
import sqlite3

import pytest

from testbed.cluster import in_ns, wait_for

NETWORK = "10.244.0.0/16"
IPV6_NETWORK = "fd00:10:244::/56"  # a /56 gives /64 subnets (upstream's default for prefixes up to /62)


def dual_config(backend: dict) -> dict:
    return {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK, "Backend": backend}


@pytest.fixture(params=["vxlan", "host-gw"])
def dual_cluster(bed, request):
    bed.write_config(dual_config({"Type": request.param}))
    bed.start_cluster()
    bed.backend = request.param
    assert wait_for(lambda: all(v6_routes_to_peers(h) == len(bed.hosts) - 1 for h in bed.hosts), 5), bed.logs()
    yield bed


def subnet6_of(host) -> ipaddress.IPv6Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_IPV6_SUBNET"]).network


def v6_routes(host) -> list[dict]:
    return json.loads(in_ns(host.ns, "ip", "-j", "-6", "route", "show").stdout)


def v6_routes_to_peers(host) -> int:
    return sum(
        1
        for r in v6_routes(host)
        if r["dst"].startswith("fd00:10:244:") and r.get("dev") != "cni0" and r["dst"].endswith("/64")
    )


def link(host, name: str) -> dict:
    return json.loads(in_ns(host.ns, "ip", "-j", "-d", "addr", "show", name).stdout)[0]


def stored_leases(bed) -> dict[str, str]:
    """The embedded store's raw keys and values, as a node wrote them ({} before any node made the store)."""
    try:
        with sqlite3.connect(f"file:{bed.lease_file}?mode=ro", uri=True) as db:
            return dict(db.execute("SELECT key, value FROM leases").fetchall())
    except sqlite3.OperationalError:
        return {}


def test_pods_reach_each_other_over_both_families(dual_cluster):
    bed = dual_cluster
    pods = [h.pods[0] for h in bed.hosts]
    assert all(
        p.address6 in subnet6_of(h) for p, h in zip(pods, bed.hosts, strict=True)
    )  # the CNI plugin gave IPv6 addresses
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert bed.ping(src.ns, dst.address6, count=2, interval=0.1), (
                    f"{src.name} -> {dst.name} v6\n{bed.logs()}"
                )
                assert bed.ping(src.ns, dst.address, count=1), f"{src.name} -> {dst.name} v4\n{bed.logs()}"
    assert bed.iperf3(pods[0], pods[1], 1, ipv6=True)["end"]["sum_received"]["bytes"] > 1_000_000


def test_kernel_state_and_lease_match_upstream(dual_cluster):
    bed = dual_cluster
    h1, h2 = bed.hosts[0], bed.hosts[1]
    env = h1.subnet_env()
    assert env["FLANNEL_IPV6_NETWORK"] == IPV6_NETWORK
    sub1, sub2 = subnet6_of(h1), subnet6_of(h2)
    assert sub1.prefixlen == 64 and env["FLANNEL_IPV6_SUBNET"] == f"{sub1.network_address + 1}/64"
    key = next(k for k in stored_leases(bed) if k.endswith(f"&{sub2.network_address}-64"))
    value = stored_leases(bed)[key]
    peer = {r["dst"]: r for r in v6_routes(h1)}[str(sub2)]
    if bed.backend == "host-gw":
        assert value == f'{{"PublicIP":"{h2.address}","PublicIPv6":"{h2.address6}","BackendType":"host-gw"}}'
        assert (peer["gateway"], peer["dev"]) == (str(h2.address6), "eth0")
        assert env["FLANNEL_MTU"] == "1500"
        return
    # vxlan: a second device whose underlay is IPv6; its MTU leaves room for the 40-byte outer IPv6 header.
    v4_mac, v6_mac = link(h2, "flannel.1")["address"], link(h2, "flannel-v6.1")["address"]
    assert value == (
        f'{{"PublicIP":"{h2.address}","PublicIPv6":"{h2.address6}","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{v4_mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{v6_mac}"}}}}'
    )
    dev = link(h1, "flannel-v6.1")
    data = dev["linkinfo"]["info_data"]
    assert (data["id"], data["local6"], data["learning"]) == (1, str(h1.address6), False)
    assert dev["mtu"] == 1430 and env["FLANNEL_MTU"] == "1430"
    assert [
        (a["local"], a["prefixlen"]) for a in dev["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"
    ] == [(str(sub1.network_address), 128)]
    gw = str(sub2.network_address)
    neigh = {
        n["dst"]: n for n in json.loads(in_ns(h1.ns, "ip", "-j", "-6", "neigh", "show", "dev", "flannel-v6.1").stdout)
    }
    assert neigh[gw]["lladdr"] == v6_mac and "PERMANENT" in neigh[gw]["state"]
    fdb = {f["mac"]: f for f in json.loads(in_ns(h1.ns, "bridge", "-j", "fdb", "show", "dev", "flannel-v6.1").stdout)}
    assert fdb[v6_mac]["dst"] == str(h2.address6)
    assert (peer["gateway"], peer["dev"], "onlink" in peer["flags"]) == (gw, "flannel-v6.1", True)


def test_peer_leaving_takes_its_ipv6_state_and_a_deleted_v6_device_comes_back(dual_cluster):
    bed = dual_cluster
    h1, gone = bed.hosts[0], bed.hosts[2]
    gone6 = subnet6_of(gone)
    assert bed.stop_node(gone) == 0
    bed.cli(gone.ns, "leases", "delete", gone.subnet_env()["FLANNEL_SUBNET"], *bed.store_args())
    assert wait_for(lambda: str(gone6) not in {r["dst"] for r in v6_routes(h1)}, 2.0), bed.logs()
    if bed.backend == "vxlan":
        assert str(gone6.network_address) not in in_ns(h1.ns, "ip", "-6", "neigh", "show", "dev", "flannel-v6.1").stdout
        in_ns(h1.ns, "ip", "link", "del", "flannel-v6.1")
        assert wait_for(lambda: v6_routes_to_peers(h1) == 1, 5), bed.logs()
        assert "flannel-v6.1 disappeared; recreating it and replaying 1 peers" in bed.node_log(h1)
    assert wait_for(lambda: bed.ping(h1.pods[0].ns, bed.hosts[1].pods[0].address6, timeout=0.5), 3), bed.logs()


def test_ip6tables_and_nftables_rules_cover_the_ipv6_network(bed):
    bed.write_config(dual_config({"Type": "host-gw"}))
    host = bed.hosts[0]
    bed.start_node(host, "--ip-masq")
    sub6 = str(subnet6_of(host))
    nat = in_ns(host.ns, "ip6tables", "-t", "nat", "-S").stdout
    assert (
        f'-A FLANNEL-POSTRTG -s {IPV6_NETWORK} ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE' in nat
    )
    assert f'-A FLANNEL-POSTRTG ! -s {IPV6_NETWORK} -d {sub6} -m comment --comment "flanneld masq" -j RETURN' in nat
    assert (
        f'-A FLANNEL-FWD -d {IPV6_NETWORK} -m comment --comment "flanneld forward" -j ACCEPT'
        in in_ns(host.ns, "ip6tables", "-S").stdout
    )
    assert (
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4" in in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout
    )
    in_ns(host.ns, "ip6tables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert wait_for(lambda: "MASQUERADE" in in_ns(host.ns, "ip6tables", "-t", "nat", "-S").stdout, 8), bed.logs()

    assert bed.stop_node(host) == 0
    bed.write_config(dict(dual_config({"Type": "host-gw"}), EnableNFTables=True))
    bed.start_node(host, "--ip-masq")
    table = in_ns(host.ns, "nft", "list", "table", "ip6", "flannel-ipv6").stdout
    assert f"ip6 saddr {IPV6_NETWORK} ip6 daddr != ff00::/8 masquerade" in table
    assert f"ip6 daddr {IPV6_NETWORK} accept" in table
    cleaned = bed.cli(host.ns, "cleanup", "--subnet-file", host.subnet_file).stdout
    assert "nftables table ip6 flannel-ipv6" in cleaned


@pytest.mark.parametrize(
    "config, flags, message",
    [
        (
            dict(dual_config({"Type": "vxlan"}), EnableIPv4=False, EnableIPv6=False),
            [],
            "error: none defined stack: the network config turns off both EnableIPv4 and EnableIPv6",
        ),
        (
            dual_config({"Type": "vxlan", "MTU": 1340}),
            [],
            "error: error decoding VXLAN backend config: MTU 1340 leaves 1270 bytes for pods after the 70-byte "
            "VXLAN-over-IPv6 overhead, below IPv6's minimum of 1280",
        ),
        (dual_config({"Type": "vxlan"}), ["--public-ipv6", "fd00::zz"], "error: invalid public IPv6 address: fd00::zz"),
        (
            dual_config({"Type": "host-gw"}),
            ["--public-ipv6", "2001:db8::7"],
            "error: your PublicIPv6 differs from interface IPv6, meaning that probably you're on a NAT, which is not "
            "supported by host-gw backend",
        ),
    ],
)
def test_dual_stack_refusals_are_one_clear_line(bed, config, flags, message):
    bed.write_config(config)
    host = bed.hosts[0]
    assert bed.run_node_expecting_failure(host, *flags) == message
    assert in_ns(host.ns, "ip", "link", "show", "flannel.1", check=False).returncode != 0
    assert stored_leases(bed) == {}  # refused before any lease was taken


def test_interface_without_ipv6_address_is_named(bed):
    bed.write_config(dual_config({"Type": "vxlan"}))
    host = bed.hosts[0]
    in_ns(host.ns, "ip", "-6", "addr", "del", f"{host.address6}/64", "dev", "eth0")
    in_ns(host.ns, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=1")  # no link-local address either
    assert bed.run_node_expecting_failure(host) == "error: failed to find IPv6 address for interface eth0"


def test_direct_routing_gives_plain_routes_in_both_families(bed):
    """Peers on the same link: `<subnet> via <public IP>` for each family, no neighbour or FDB entries."""
    bed.write_config(dual_config({"Type": "vxlan", "DirectRouting": True}))
    bed.start_cluster()
    h1, h2 = bed.hosts[0], bed.hosts[1]
    assert wait_for(lambda: v6_routes_to_peers(h1) == 2, 5), bed.logs()
    v4 = {r["dst"]: r for r in json.loads(in_ns(h1.ns, "ip", "-j", "route", "show").stdout)}
    peer4 = v4[h2.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")]
    peer6 = {r["dst"]: r for r in v6_routes(h1)}[str(subnet6_of(h2))]
    assert (peer4["gateway"], peer4["dev"]) == (str(h2.address), "eth0")
    assert (peer6["gateway"], peer6["dev"]) == (str(h2.address6), "eth0")
    assert "PERMANENT" not in in_ns(h1.ns, "ip", "-6", "neigh", "show", "dev", "flannel-v6.1").stdout
    assert bed.ping(h1.pods[0].ns, h2.pods[0].address6, count=2, interval=0.1), bed.logs()
    assert bed.ping(h1.pods[0].ns, h2.pods[0].address, count=1), bed.logs()


def test_blackhole_routes_for_both_subnets_and_cleanup_removes_them(bed):
    bed.write_config(dual_config({"Type": "host-gw"}))
    host = bed.hosts[0]
    bed.start_node(host, "-ip-blackhole-route", "-iptables-resync=1")
    sub4 = host.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
    sub6 = str(subnet6_of(host))
    assert wait_for(lambda: sub6 in in_ns(host.ns, "ip", "-6", "route", "show", "type", "blackhole").stdout, 3.0)
    assert sub4 in in_ns(host.ns, "ip", "route", "show", "type", "blackhole").stdout
    assert bed.stop_node(host) == 0
    removed = bed.cli(host.ns, "cleanup", "--subnet-file", host.subnet_file).stdout
    assert f"removed route blackhole {sub4}" in removed and f"removed route blackhole {sub6}" in removed
    assert "ip6tables chain filter/FLANNEL-FWD" in removed
    assert "blackhole" not in in_ns(host.ns, "ip", "-6", "route", "show", "type", "blackhole").stdout


def test_dual_stack_on_etcd_keys_carry_both_subnets(bed):
    """Upstream's dual-stack key (`10.244.1.0-24&fd00:10:244:1::-64`) on a real etcd: listed with both subnets, and
    deleting a lease by its IPv4 subnet takes the whole key, so peers drop its IPv6 route as well."""
    bed.start_etcd()
    bed.write_config(dual_config({"Type": "vxlan"}))
    bed.start_cluster()
    h1, h2 = bed.hosts[0], bed.hosts[1]
    assert wait_for(lambda: v6_routes_to_peers(h1) == 2, 5), bed.logs()
    assert bed.ping(h1.pods[0].ns, h2.pods[0].address6, count=2, interval=0.1), bed.logs()
    listing = {line.split()[0]: line.split() for line in leases_listing(bed, h1)}
    sub4 = h2.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
    assert listing[sub4][1:4] == [str(h2.address), str(subnet6_of(h2)), str(h2.address6)]
    assert bed.stop_node(h2) == 0
    bed.cli(h1.ns, "leases", "delete", sub4, *bed.store_args())
    assert wait_for(lambda: str(subnet6_of(h2)) not in {r["dst"] for r in v6_routes(h1)}, 2.0), bed.logs()
    assert sub4 not in {line.split()[0] for line in leases_listing(bed, h1)}


def leases_listing(bed, host) -> list[str]:
    return bed.cli(host.ns, "leases", *bed.store_args()).stdout.splitlines()[1:]


def test_restart_keeps_both_subnets_and_the_v6_device_mac(bed):
    bed.write_config(dual_config({"Type": "vxlan"}))
    host = bed.hosts[0]
    bed.start_node(host)

    def state():
        env = host.subnet_env()
        return env["FLANNEL_SUBNET"], env["FLANNEL_IPV6_SUBNET"], link(host, "flannel-v6.1")["address"]

    before = state()
    assert bed.stop_node(host) == 0
    bed.start_node(host)
    assert state() == before


def test_host_gw_puts_back_deleted_routes_of_both_families(bed):
    """Upstream's route check: every 10 s, a remembered route missing from the table is added again."""
    bed.write_config(dual_config({"Type": "host-gw"}))
    bed.start_cluster(pods_per_host=0)
    h1, h2 = bed.hosts[0], bed.hosts[1]
    sub4 = h2.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
    sub6 = str(subnet6_of(h2))
    assert wait_for(lambda: sub6 in {r["dst"] for r in v6_routes(h1)}, 5), bed.logs()
    in_ns(h1.ns, "ip", "route", "del", sub4)
    in_ns(h1.ns, "ip", "-6", "route", "del", sub6)

    def restored():
        v4 = {r["dst"]: r.get("gateway") for r in json.loads(in_ns(h1.ns, "ip", "-j", "route", "show").stdout)}
        v6 = {r["dst"]: r.get("gateway") for r in v6_routes(h1)}
        return v4.get(sub4) == str(h2.address) and v6.get(sub6) == str(h2.address6)

    assert wait_for(restored, 12, interval=0.5), bed.logs()
    assert f"Route recovered: {sub6} via {h2.address6}" in bed.node_log(h1)
