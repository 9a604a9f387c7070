"""cni0 repair: a node whose pods' bridge is deleted, stripped of its address or MTU, or cut from a pod's veth puts it
back by itself (netlink events), re-attaching only the veths the CNI plugin attached; on every backend."""

import json
import os
import time

import pytest

from testbed.cluster import in_ns, wait_for

NETWORK = "10.244.0.0/16"
IPV6_NETWORK = "fd00:10:244::/56"
CONFIGS = {
    "udp": {"Network": NETWORK, "Backend": {"Type": "udp"}},
    "vxlan": {"Network": NETWORK, "Backend": {"Type": "vxlan"}},
    "host-gw": {"Network": NETWORK, "Backend": {"Type": "host-gw"}},
    "vxlan-dual-stack": {
        "Network": NETWORK,
        "EnableIPv6": True,
        "IPv6Network": IPV6_NETWORK,
        "Backend": {"Type": "vxlan"},
    },
}


def bridge(host, name="cni0") -> dict | None:
    shown = in_ns(host.ns, "ip", "-j", "-d", "addr", "show", "dev", name, check=False)
    return json.loads(shown.stdout)[0] if shown.returncode == 0 else None


def addresses(link: dict) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a.get("scope") != "link"}


def ports(host, name="cni0") -> set[str]:
    shown = json.loads(in_ns(host.ns, "ip", "-j", "link", "show", "master", name, check=False).stdout or "[]")
    return {link["ifname"] for link in shown}


def reachable(bed, src, dst, ipv6=False) -> bool:
    return bed.ping(src.ns, dst.address6 if ipv6 else dst.address, timeout=0.5)


def all_paths_work(bed, ipv6=False) -> bool:
    local_a, local_b = bed.hosts[0].pods
    remote = bed.hosts[1].pods[0]
    return all(reachable(bed, s, d, ipv6) for s, d in ((local_a, remote), (remote, local_b), (local_a, local_b)))


@pytest.fixture(params=list(CONFIGS))
def two_nodes(bed, request):
    """Two nodes of the chosen backend; host 0 has two pods, host 1 one; every pod path works before the damage."""
    bed.write_config(CONFIGS[request.param])
    bed.dual_stack = "dual" in request.param
    for host in bed.hosts[:2]:
        bed.start_node(host, wait=False)
    for host in bed.hosts[:2]:
        bed.wait_ready(host)
    bed.add_pod(bed.hosts[0])
    bed.add_pod(bed.hosts[0])
    bed.add_pod(bed.hosts[1])
    assert wait_for(lambda: all_paths_work(bed), 10), bed.logs()
    yield bed


def test_a_deleted_cni0_comes_back_with_its_pods_within_two_seconds(two_nodes):
    bed = two_nodes
    host = bed.hosts[0]
    before = bridge(host)
    recorded = ports(host)
    assert len(recorded) == 2
    # A veth on cni0 that the CNI plugin did not attach: the repair must not enslave it.
    in_ns(host.ns, "ip", "link", "add", "strayveth", "type", "veth", "peer", "name", "strayveth-p")
    in_ns(host.ns, "ip", "link", "set", "strayveth", "master", "cni0", "up")

    in_ns(host.ns, "ip", "link", "del", "cni0")
    deleted = time.monotonic()
    back = wait_for(lambda: all_paths_work(bed), 2)
    elapsed = time.monotonic() - deleted
    assert back, f"pods not reachable 2 s after cni0 was deleted\n{bed.logs()}"
    if bed.dual_stack:
        assert wait_for(lambda: all_paths_work(bed, ipv6=True), 2), bed.logs()

    after = bridge(host)
    assert after["address"] == before["address"]  # same MAC: the pods' neighbour entries for the gateway stay valid
    assert after["mtu"] == before["mtu"] == int(host.subnet_env()["FLANNEL_MTU"])
    assert addresses(after) == addresses(before)
    assert ports(host) == recorded  # the stray veth stays out
    log = bed.node_log(host)
    assert "Repaired cni0: recreated it" in log and "re-attached 2 pod veths" in log, log[-2000:]
    print(f"pods reachable {elapsed:.3f} s after `ip link del cni0`")


def test_a_lost_address_mtu_or_port_is_put_back(bed):
    bed.write_config(CONFIGS["udp"])
    host = bed.hosts[0]
    bed.start_node(host)
    pod_a, pod_b = bed.add_pod(host), bed.add_pod(host)
    before = bridge(host)
    gateway = host.subnet_env()["FLANNEL_SUBNET"]

    in_ns(host.ns, "ip", "addr", "flush", "dev", "cni0")
    assert wait_for(lambda: gateway in addresses(bridge(host)), 2), bed.node_log(host)[-2000:]
    in_ns(host.ns, "ip", "link", "set", "cni0", "mtu", "1300")
    assert wait_for(lambda: bridge(host)["mtu"] == before["mtu"], 2), bed.node_log(host)[-2000:]
    veth = min(ports(host))
    in_ns(host.ns, "ip", "link", "set", veth, "nomaster")
    assert wait_for(lambda: veth in ports(host), 2), bed.node_log(host)[-2000:]
    assert wait_for(lambda: bed.ping(pod_a.ns, pod_b.address, timeout=0.5), 2)


def test_a_deleted_pod_is_not_re_attached_and_the_flag_turns_repair_off(bed):
    bed.write_config(CONFIGS["udp"])
    host = bed.hosts[0]
    bed.start_node(host, "-cni-bridge-repair=false")
    bed.add_pod(host)
    in_ns(host.ns, "ip", "link", "del", "cni0")
    time.sleep(1)  # the repair, were it on, would act within milliseconds
    assert bridge(host) is None
    assert "Watching the pods' bridge" not in bed.node_log(host)


def test_only_ports_of_live_pods_are_recorded(bed):
    bed.write_config(CONFIGS["udp"])
    host = bed.hosts[0]
    bed.start_node(host)
    pod = bed.add_pod(host)
    records = bed.cni_data_dir(host) + "-ports"
    with open(f"{records}/{pod.name}") as f:
        record = json.load(f)
    assert (
        record["bridge"] == "cni0" and record["veth"] in ports(host) and record["bridgeMac"] == bridge(host)["address"]
    )
    bed.cni(host, "DEL", pod.name, pod.ns)
    assert os.listdir(records) == []
    # With no pod left, a deleted cni0 is not rebuilt: the CNI plugin makes it for the next pod.
    in_ns(host.ns, "ip", "link", "del", "cni0")
    time.sleep(0.5)
    assert bridge(host) is None
    assert bed.add_pod(host) and bridge(host) is not None
