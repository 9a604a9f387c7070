"""flannel-udp deployed as its users deploy it: the image of scripts/build-image.sh in each node's containerd, the
manifest deploy/kube-flannel-udp.yml applied with kubectl, on three nodes that run pods under real kubelets
(testbed/kubenode.py: containerd, runc, kubelet, kube-proxy) against a real control plane with scheduler. One cluster
for the module; the tests run in order (udp, a rolling update, the switch to vxlan, a node deleted)."""

import ipaddress
import re
import subprocess
import time

import pytest

from testbed import kubenode, kubeserver
from testbed.cluster import Testbed, in_ns
from testbed.podcluster import FLANNEL_NAMESPACE, PodCluster, node_subnet_env

pytestmark = pytest.mark.skipif(
    not (kubeserver.available() and kubenode.available()),
    reason="the Kubernetes servers, kubelet or containerd are missing (scripts/setup.sh)",
)
PREFIX = "flannel.alpha.coreos.com/"


@pytest.fixture(scope="module")
def cluster():
    with Testbed(hosts=3) as bed:
        pods = PodCluster(bed)
        pods.start()
        pods.deploy("udp")
        for index, host in enumerate(bed.hosts):
            pods.add_pod(f"pod{index}", host.node_name)
        yield pods


def pod_ips(cluster) -> dict[str, str]:
    return {f"pod{i}": cluster.kubectl("get", "pod", f"pod{i}", "-o", "jsonpath={.status.podIP}") for i in range(3)}


def unreachable_pairs(cluster) -> list[str]:
    ips = pod_ips(cluster)
    return [f"{a}->{b}" for a in ips for b in ips if a != b and not cluster.ping(a, ips[b])]


def test_the_daemonset_runs_ready_on_every_node_and_each_takes_its_pod_cidr(cluster):
    bed = cluster.bed
    agents = cluster.agent_pods()
    assert sorted(agents) == sorted(h.node_name for h in bed.hosts)
    for index, host in enumerate(bed.hosts):
        pod = agents[host.node_name]
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert pod["status"]["phase"] == "Running" and ready["Ready"] == "True", pod["status"]
        node = bed.kube.get_node(host.node_name)
        env = node_subnet_env(bed, index)
        assert str(ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network) == node.spec.podCIDR
        assert node.metadata.annotations[PREFIX + "backend-type"] == ""  # udp, as upstream's udp backend writes it
        unavailable = [c for c in node.status.conditions if c.type == "NetworkUnavailable"]
        assert unavailable and unavailable[0].status == "False" and unavailable[0].reason == "FlannelIsUp"
        assert "flannel0" in in_ns(host.ns, "ip", "-o", "link", "show").stdout
        # Set through netlink: the container's /proc/sys is read-only.
        assert in_ns(host.ns, "cat", "/proc/sys/net/ipv4/conf/flannel0/accept_local").stdout.strip() == "1"
    log = cluster.kubectl("logs", "-n", FLANNEL_NAMESPACE, "ds/kube-flannel-ds", "-c", "kube-flannel")
    assert " W " not in log and " E " not in log, log


def test_pods_on_different_nodes_get_their_nodes_addresses_and_reach_each_other(cluster):
    bed = cluster.bed
    ips = pod_ips(cluster)
    for index, host in enumerate(bed.hosts):
        pod_cidr = ipaddress.ip_network(bed.kube.get_node(host.node_name).spec.podCIDR)
        assert ipaddress.ip_address(ips[f"pod{index}"]) in pod_cidr  # through the flannel CNI plugin on that node
    assert unreachable_pairs(cluster) == []
    assert cluster.tcp_answer("pod0", ips["pod2"]) == "pod2"
    assert cluster.tcp_answer("pod2", ips["pod1"]) == "pod1"


def test_the_agents_log_reads_the_kubernetes_way(cluster):
    log = cluster.kubectl("logs", "-n", FLANNEL_NAMESPACE, "ds/kube-flannel-ds", "-c", "kube-flannel")
    assert "Wrote subnet file /run/flannel/subnet.env" in log and "ready" in log, log
    assert "Traceback" not in log


def longest_gap(ping_output: str, interval: float) -> tuple[float, int]:
    """The longest run of unanswered pings (in seconds) and how many were answered, from busybox ping's lines."""
    answered = sorted(int(s) for s in re.findall(r"seq=(\d+)", ping_output))
    if not answered:
        return float("inf"), 0
    gaps = [b - a - 1 for a, b in zip(answered, answered[1:], strict=False)]
    return (max(gaps, default=0)) * interval, len(answered)


def test_a_rolling_update_keeps_pod_traffic_flowing(cluster):
    """The DaemonSet moves to a new image tag, one node after another, while pod0 pings pod1 every 50 ms: every
    agent is replaced, and traffic comes back after each restart (the longest gap is printed)."""
    bed = cluster.bed
    ips = pod_ips(cluster)
    for node in bed.kubelet_nodes:
        node.ctr(
            "images", "tag", "--force", "docker.io/library/flannel-udp:0.1.0", "docker.io/library/flannel-udp:next"
        )
    before = {name: pod["metadata"]["uid"] for name, pod in cluster.agent_pods().items()}
    interval = 0.05
    ping = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            bed.kube_ns,
            kubeserver.kubectl_path(),
            f"--kubeconfig={bed.kube.path('admin.kubeconfig')}",
        ]
        + ["exec", "pod0", "--", "ping", "-i", str(interval), "-W", "1", "-w", "150", ips["pod1"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1)
        cluster.kubectl("set", "image", "-n", FLANNEL_NAMESPACE, "ds/kube-flannel-ds", "*=flannel-udp:next")
        cluster.wait_rollout()
        assert cluster.wait_ping("pod0", ips["pod1"], 10)
        time.sleep(1)
    finally:
        ping.terminate()
        output = ping.communicate(timeout=10)[0]
    after = cluster.agent_pods()
    assert all(after[name]["metadata"]["uid"] != uid for name, uid in before.items()), "not every agent was replaced"
    assert all(c["image"].endswith("flannel-udp:next") for p in after.values() for c in p["spec"]["containers"])
    gap, answered = longest_gap(output, interval)
    print(f"rolling update: longest gap in pod traffic {gap:.2f} s, {answered} pings answered")
    assert answered > 20 and gap < 30, output[-2000:]


def test_changing_the_configmap_to_vxlan_moves_the_cluster_to_vxlan(cluster):
    bed = cluster.bed
    cluster.set_backend("vxlan")
    for index, host in enumerate(bed.hosts):
        links = in_ns(host.ns, "ip", "-o", "link", "show").stdout
        assert "flannel.1" in links and "flannel0" not in links, links
        assert bed.kube.get_node(host.node_name).metadata.annotations[PREFIX + "backend-type"] == "vxlan"
        assert node_subnet_env(bed, index)["FLANNEL_MTU"] == "1450"
    ips = pod_ips(cluster)
    assert cluster.wait_ping("pod0", ips["pod2"], 10)
    assert unreachable_pairs(cluster) == []
    assert cluster.tcp_answer("pod1", ips["pod0"]) == "pod0"


def test_a_deleted_node_loses_its_routes_on_the_others(cluster):
    """The third node is shut down and its Node deleted, as an operator removes a machine: the others drop the
    route to its podCIDR within 2 s."""
    bed = cluster.bed
    gone = bed.hosts[2]
    subnet = bed.kube.get_node(gone.node_name).spec.podCIDR
    assert subnet in in_ns(bed.hosts[0].ns, "ip", "route").stdout
    bed.kubelet_nodes[2].close()
    started = time.monotonic()
    cluster.kubectl("delete", "node", gone.node_name)
    while subnet in in_ns(bed.hosts[0].ns, "ip", "route").stdout and time.monotonic() - started < 2:
        time.sleep(0.05)
    routes = in_ns(bed.hosts[0].ns, "ip", "route").stdout + in_ns(bed.hosts[1].ns, "ip", "route").stdout
    assert subnet not in routes, routes
    ips = pod_ips(cluster)
    assert cluster.ping("pod0", ips["pod1"])
