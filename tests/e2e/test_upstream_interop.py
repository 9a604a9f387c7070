"""Mixed clusters with the real upstream flanneld (built from github.com/flannel-io/flannel by scripts/setup.sh): an
operator rolling nodes over one at a time has both programs in one cluster. Each test has at least one upstream node
and one of ours on a real etcd (or the real Kubernetes API), and compares what each actually produced, byte for byte,
not a transcription of upstream."""

import ipaddress
import json
import os
import sys
import time

import pytest

from testbed import kubeserver, upstreamflannel
from testbed.cluster import ETCD_FIRST_ADDRESS, UNDERLAY, in_ns, wait_for

NETWORK = "10.244.0.0/16"
IPV6_NETWORK = "fd00:10:244::/56"
ETCD_HOST = str(UNDERLAY.network_address + ETCD_FIRST_ADDRESS)

pytestmark = [
    pytest.mark.skipif(
        not upstreamflannel.available(),
        reason=f"upstream flanneld {upstreamflannel.FLANNEL_VERSION} not built (scripts/setup.sh)",
    ),
    # Upstream refuses to start without br_netfilter (it checks /proc/sys/net/bridge) unless EnableNFTables is set.
    pytest.mark.skipif(
        not os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        reason="br_netfilter is not loaded: upstream flanneld refuses to start without it",
    ),
]

RAW_LEASES = f"""
import asyncio, aetcd
async def main():
    async with aetcd.Client(host="{ETCD_HOST}", port=2379) as client:
        for kv in (await client.get_prefix(b"/coreos.com/network/subnets/")).kvs:
            print(kv.key.decode(), kv.value.decode())
asyncio.run(main())
"""


@pytest.fixture
def mixed(bed):
    bed.start_etcd()
    return bed


def raw_leases(bed) -> dict[str, str]:
    """Every lease key and value exactly as stored in etcd."""
    out = in_ns(bed.hosts[0].ns, sys.executable, "-c", RAW_LEASES).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def subnet_of(host) -> ipaddress.IPv4Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network


def reachable(bed, src, dst, within: float) -> bool:
    return wait_for(lambda: bed.ping(src.ns, dst.address, timeout=0.3), within, interval=0.01)


def has_route(host, subnet) -> bool:
    return str(subnet) in in_ns(host.ns, "ip", "route").stdout


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_mixed_cluster_pods_reach_each_other_both_ways(mixed, backend):
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": backend}})
    upstream, ours, late = bed.hosts
    bed.start_node(upstream, upstream=True)
    bed.start_node(ours)
    for host in (upstream, ours):
        bed.add_pod(host)
    up_pod, our_pod = upstream.pods[0], ours.pods[0]
    assert reachable(bed, up_pod, our_pod, 5) and reachable(bed, our_pod, up_pod, 5), bed.logs()
    for client, server in ((up_pod, our_pod), (our_pod, up_pod)):
        report = bed.iperf3(client, server, 1)
        assert report.get("end", {}).get("sum_received", {}).get("bytes", 0) > 1_000_000, (client.name, bed.logs())
    # A node of either kind joining later is reachable from both kinds within 2 s of its lease.
    late_ours = bed.add_host()
    for host, kind in ((late, True), (late_ours, False)):
        bed.start_node(host, upstream=kind)
        late_pod = bed.add_pod(host)
        assert reachable(bed, our_pod, late_pod, 2) and reachable(bed, up_pod, late_pod, 2), bed.logs()
    assert "Traceback" not in bed.logs()


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_a_leaving_node_of_either_kind_is_removed_on_the_other(mixed, backend):
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": backend}})
    upstream, ours, third = bed.hosts
    bed.start_node(upstream, upstream=True)
    bed.start_node(ours)
    bed.start_node(third)
    assert wait_for(lambda: has_route(upstream, subnet_of(ours)) and has_route(ours, subnet_of(upstream)), 5), (
        bed.logs()
    )
    # Our node leaves (its lease deleted, as an expiry would): upstream removes its routes.
    gone = subnet_of(third)
    bed.cli(ours.ns, "leases", "delete", str(gone), *bed.store_args())
    assert wait_for(lambda: not has_route(upstream, gone), 2, interval=0.02), bed.logs()
    # Upstream's node leaves: ours removes its routes.
    gone = subnet_of(upstream)
    bed.cli(ours.ns, "leases", "delete", str(gone), *bed.store_args())
    assert wait_for(lambda: not has_route(ours, gone), 2, interval=0.02), bed.logs()


def test_udp_leaving_upstream_node_is_removed_from_our_fast_path(mixed):
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "udp"}})
    upstream, ours, _ = bed.hosts
    bed.start_node(upstream, upstream=True)
    bed.start_node(ours)
    assert wait_for(lambda: f"Route {subnet_of(upstream)} via" in bed.node_log(ours), 5), bed.logs()
    bed.cli(ours.ns, "leases", "delete", str(subnet_of(upstream)), *bed.store_args())
    assert wait_for(lambda: f"Route {subnet_of(upstream)} removed" in bed.node_log(ours), 2, interval=0.02), bed.logs()


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_same_lease_value_and_subnet_env_as_upstream_for_the_same_node(mixed, backend):
    """Upstream runs first; ours then takes over the same host (same public IP): it must reuse upstream's lease and
    write the very bytes upstream wrote, in etcd and in subnet.env."""
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": backend}})
    host = bed.hosts[0]
    bed.start_node(host, "--ip-masq", upstream=True)
    upstream_leases, upstream_env = raw_leases(bed), open(host.subnet_file).read()
    bed.stop_node(host)
    bed.start_node(host, "--ip-masq")
    assert "reusing" in bed.node_log(host), bed.node_log(host)
    assert raw_leases(bed) == upstream_leases
    assert open(host.subnet_file).read() == upstream_env


def rules(host, command: str = "iptables") -> str:
    out = []
    for table in ("filter", "nat"):
        out.append(in_ns(host.ns, command, "-t", table, "-S").stdout)
    return "".join(out)


def settled_rules(host, masq: bool, forward: bool, timeout: float = 10, command: str = "iptables") -> str:
    """The node's rules (of `command`: iptables or ip6tables) once the jumps its flags ask for exist and two reads
    0.3 s apart agree (upstream installs its chains from goroutines after subnet.env)."""
    deadline, previous = time.monotonic() + timeout, None
    while True:
        current = rules(host, command)
        complete = (not masq or "-j FLANNEL-POSTRTG" in current) and (not forward or "-j FLANNEL-FWD" in current)
        if complete and current == previous:
            return current
        assert time.monotonic() < deadline, f"rules not settled within {timeout} s:\n{current}"
        previous = current
        time.sleep(0.3)


def flush_rules(host, command: str = "iptables") -> None:
    for table in ("filter", "nat"):
        in_ns(host.ns, command, "-t", table, "-F")
        in_ns(host.ns, command, "-t", table, "-X")


@pytest.mark.parametrize(
    "flags", [["--ip-masq"], ["--ip-masq", "--ip-masq-fully-random-disable"], ["--iptables-forward-rules=false"]]
)
def test_same_iptables_rules_as_upstream(mixed, flags):
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "host-gw"}})
    host = bed.hosts[0]
    bed.start_node(host, *flags, upstream=True)
    upstream_rules = settled_rules(host, "--ip-masq" in flags, "--iptables-forward-rules=false" not in flags)
    bed.stop_node(host)
    flush_rules(host)
    bed.start_node(host, *flags)
    assert wait_for(lambda: rules(host) == upstream_rules, 5), (rules(host), upstream_rules)


def vxlan_attributes(host) -> dict:
    link = json.loads(in_ns(host.ns, "ip", "-d", "-j", "link", "show", "flannel.1").stdout)[0]
    info = link["linkinfo"]["info_data"]
    addresses = json.loads(in_ns(host.ns, "ip", "-j", "addr", "show", "dev", "flannel.1").stdout)[0]["addr_info"]
    return {
        "mtu": link["mtu"],
        "flags": sorted(link["flags"]),
        "id": info["id"],
        "local": info.get("local"),
        "link": info.get("link"),
        "port": info.get("port"),
        "learning": info.get("learning"),
        "ttl": info.get("ttl"),
        "addresses": sorted((a["local"], a["prefixlen"]) for a in addresses if a["family"] == "inet"),
    }


def peer_entries(host, peer_subnet) -> tuple:
    gateway = str(peer_subnet.network_address)
    neigh = json.loads(in_ns(host.ns, "ip", "-j", "neigh", "show", "dev", "flannel.1", gateway).stdout)
    fdb = [
        f for f in json.loads(in_ns(host.ns, "bridge", "-j", "fdb", "show", "dev", "flannel.1").stdout) if f.get("dst")
    ]
    route = json.loads(in_ns(host.ns, "ip", "-j", "route", "show", str(peer_subnet)).stdout)
    return (
        [(n["dst"], n["lladdr"], sorted(n["state"])) for n in neigh],
        sorted((f["mac"], f["dst"], sorted(f.get("flags", [])), f.get("state")) for f in fdb),
        [(r["dst"], r.get("gateway"), r["dev"], sorted(r.get("flags", []))) for r in route],
    )


def test_same_vxlan_device_and_peer_entries_as_upstream(mixed):
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    host, peer, _ = bed.hosts
    bed.start_node(peer)
    bed.start_node(host, upstream=True)
    assert wait_for(lambda: has_route(host, subnet_of(peer)), 5), bed.logs()
    upstream_device, upstream_peer = vxlan_attributes(host), peer_entries(host, subnet_of(peer))
    bed.stop_node(host)
    in_ns(host.ns, "ip", "link", "del", "flannel.1")
    bed.start_node(host)
    assert wait_for(lambda: has_route(host, subnet_of(peer)), 5), bed.logs()
    assert vxlan_attributes(host) == upstream_device
    ours = peer_entries(host, subnet_of(peer))
    assert ours == upstream_peer


@pytest.mark.skipif(not kubeserver.available(), reason="Kubernetes binaries not built (scripts/setup.sh)")
@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_kube_mode_mixed_cluster_and_identical_annotations(bed, backend):
    bed.write_config({"Network": NETWORK, "Backend": {"Type": backend}})
    bed.start_kube()
    upstream, ours, _ = bed.hosts
    bed.start_node(upstream, upstream=True)
    bed.start_node(ours)
    for host in (upstream, ours):
        bed.add_pod(host)
    assert reachable(bed, upstream.pods[0], ours.pods[0], 5), bed.logs()
    assert reachable(bed, ours.pods[0], upstream.pods[0], 5), bed.logs()
    prefix = "flannel.alpha.coreos.com/"

    def flannel_annotations(host) -> dict:
        ann = bed.kube.get_node(host.node_name).metadata.annotations
        return {k: v for k, v in ann.items() if k.startswith(prefix)}

    upstream_ann = flannel_annotations(upstream)
    bed.stop_node(upstream)
    bed.start_node(upstream)  # ours on the host upstream left: nothing to patch, the annotations stay as they were
    assert flannel_annotations(upstream) == upstream_ann
    assert "Annotated node" not in bed.node_log(upstream)


@pytest.mark.skipif(not kubeserver.available(), reason="Kubernetes binaries not built (scripts/setup.sh)")
@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_ipv6_only_kube_mixed_cluster_is_byte_identical(bed6, backend):
    """An IPv6-only cluster (no IPv4 on any link) with upstream and ours: pods reach each other both ways; ours on the
    host upstream left finds nothing to change: the same annotations, subnet.env and ip6tables rules."""
    bed = bed6
    bed.write_config(
        {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK, "Backend": {"Type": backend}}
    )
    bed.start_kube()
    upstream, ours, _ = bed.hosts
    bed.start_node(upstream, "--ip-masq", upstream=True)
    bed.start_node(ours, "--ip-masq")
    for host in (upstream, ours):
        bed.add_pod(host)
    up_pod, our_pod = upstream.pods[0], ours.pods[0]
    assert reachable6(bed, up_pod, our_pod, 5) and reachable6(bed, our_pod, up_pod, 5), bed.logs()
    upstream_state = node_state(bed, upstream)
    assert "FLANNEL" not in rules(upstream)  # no IPv4 rules from upstream either
    bed.stop_node(upstream)
    flush_rules(upstream, "ip6tables")
    bed.start_node(upstream, "--ip-masq")
    ours_state = node_state(bed, upstream)
    if backend == "vxlan":
        # The one deliberate difference (docs/backends.md): flannel-v6.1 leaves room for the 40-byte outer IPv6 header.
        assert b"FLANNEL_MTU=1450\n" in upstream_state[1] and b"FLANNEL_MTU=1430\n" in ours_state[1]
        ours_state = (ours_state[0], ours_state[1].replace(b"=1430\n", b"=1450\n"), ours_state[2])
    assert ours_state == upstream_state
    assert "Annotated node" not in bed.node_log(upstream) and "FLANNEL" not in rules(upstream)
    assert reachable6(bed, up_pod, our_pod, 5) and reachable6(bed, our_pod, up_pod, 5), bed.logs()


def reachable6(bed, src, dst, within: float) -> bool:
    return wait_for(lambda: bed.ping(src.ns, dst.address6, timeout=0.3), within, interval=0.01)


def node_state(bed, host) -> tuple:
    """The node's flannel annotations, its subnet.env as bytes, and its settled ip6tables rules."""
    ann = bed.kube.get_node(host.node_name).metadata.annotations
    with open(host.subnet_file, "rb") as f:
        env = f.read()
    return (
        {k: v for k, v in ann.items() if k.startswith("flannel.alpha.coreos.com/")},
        env,
        settled_rules(host, True, True, command="ip6tables"),
    )


ETCD_URL = f"http://{ETCD_HOST}:2379"

# Real argument lists (their path flags, -subnet-file and -net-config-path, are the testbed's, since the defaults
# /run/flannel and /etc/kube-flannel belong to the machine): upstream's kube-flannel.yml DaemonSet, the etcd-mode
# systemd unit form, and the same settings as FLANNELD_* environment.
START_UPS = {
    "kube-flannel.yml": (
        True,
        ["--ip-masq", "--kube-subnet-mgr"],
        {
            "POD_NAME": "kube-flannel-ds-abcde",
            "POD_NAMESPACE": "kube-flannel",
            "EVENT_QUEUE_DEPTH": "5000",
            "CONT_WHEN_CACHE_NOT_READY": "false",
        },
    ),
    "systemd unit": (
        False,
        [f"-etcd-endpoints={ETCD_URL}", "-etcd-prefix=/coreos.com/network", "-iface=eth0", "-ip-masq"],
        {},
    ),
    "FLANNELD_* environment": (
        False,
        [],
        {
            "FLANNELD_ETCD_ENDPOINTS": ETCD_URL,
            "FLANNELD_IFACE": "eth0",
            "FLANNELD_IP_MASQ": "true",
            "FLANNELD_IPTABLES_RESYNC": "3",
        },
    ),
}


@pytest.mark.parametrize("name", list(START_UPS))
def test_both_programs_accept_real_start_up_command_lines_and_end_in_the_same_state(bed, name):
    kube, args, env = START_UPS[name]
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    host = bed.hosts[0]
    if kube:
        if not kubeserver.available():
            pytest.skip("Kubernetes binaries not built (scripts/setup.sh)")
        bed.start_kube()
        bed.register_node(host)
        bed.kube.create_pod(env["POD_NAME"], env["POD_NAMESPACE"], host.node_name)
        args = [*args, "--kubeconfig-file", bed.kubeconfig]
        # Without -iface both take the default route's interface, as on a real node.
        in_ns(host.ns, "ip", "route", "add", "default", "dev", "eth0")
    else:
        bed.start_etcd()
    states = []
    for upstream in (True, False):
        bed.start_node(host, *args, env=env, iface=None, store=False, node_name=False, upstream=upstream)
        installed = settled_rules(host, masq=True, forward=True)  # every start-up here has -ip-masq
        states.append((open(host.subnet_file).read(), installed, vxlan_attributes(host)))
        bed.stop_node(host)
        flush_rules(host)
    assert states[0] == states[1], bed.logs()


def test_an_unknown_flag_is_an_error_here_where_upstream_exits_0(mixed):
    """The documented difference: upstream prints its usage and exits 0 on a flag it does not know (a typo silently
    stops the node); ours names the flag and exits 1."""
    bed = mixed
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "udp"}})
    host = bed.hosts[0]
    bed.start_node(host, "--ip-masqq", wait=False, upstream=True)
    assert host.process.wait(10) == 0
    line = bed.run_node_expecting_failure(host, "--ip-masqq")
    assert line.startswith("error: ") and "--ip-masqq" in line
