"""-kube-subnet-mgr against a real Kubernetes control plane (etcd, kube-apiserver with RBAC, kube-controller-manager
assigning podCIDRs) in namespaces. Every node runs with a token of the flannel ServiceAccount bound to exactly the
ClusterRole of the shipped manifest (deploy/kube-flannel-udp.yml), so these tests also prove it needs no more."""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from testbed import kubeserver
from testbed.cluster import in_ns, read_until, wait_for

NETWORK = "10.244.0.0/16"
PREFIX = "flannel.alpha.coreos.com/"

pytestmark = pytest.mark.skipif(
    not kubeserver.available(), reason=f"Kubernetes {kubeserver.KUBE_VERSION} not built (scripts/setup.sh)"
)


@pytest.fixture
def kube(bed):
    """The 3-host testbed with a Kubernetes control plane; net-conf.json is what the DaemonSet's ConfigMap holds."""
    bed.write_config({"Network": NETWORK, "Backend": {"Type": "udp"}})
    bed.start_kube()
    return bed


def use_backend(bed, backend: str, **extra) -> None:
    bed.write_config({"Network": NETWORK, "Backend": {"Type": backend}, **extra})


def subnet_of(host) -> ipaddress.IPv4Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network


def annotations(bed, host) -> dict:
    return bed.kube.get_node(host.node_name).metadata.annotations or {}


def ping_matrix(bed) -> list[str]:
    pods = [h.pods[0] for h in bed.hosts if h.pods]
    return [
        f"{s.name}->{d.name}"
        for s in pods
        for d in pods
        if s is not d and not bed.ping(s.ns, d.address, count=2, interval=0.1, timeout=1)
    ]


def reachable(bed, src, dst, within: float) -> bool:
    return wait_for(lambda: bed.ping(src.ns, dst.address, timeout=0.3), within, interval=0.01)


def two_nodes_with_pods(bed, backend: str):
    """Nodes on the first two hosts, a pod on each, reaching each other; returns the three hosts."""
    use_backend(bed, backend)
    a, b, third = bed.hosts
    for host in (a, b):
        bed.start_node(host)
        bed.add_pod(host)
    assert reachable(bed, a.pods[0], b.pods[0], 5), bed.logs()
    return a, b, third


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_three_nodes_take_their_pod_cidrs_and_pods_reach_each_other(kube, backend):
    bed = kube
    use_backend(bed, backend)
    bed.start_cluster()
    for host in bed.hosts:
        node = bed.kube.get_node(host.node_name)
        # The subnet is the podCIDR kube-controller-manager assigned; subnet.env says so to the CNI plugin.
        assert str(subnet_of(host)) == node.spec.podCIDR
        assert host.subnet_env()["FLANNEL_NETWORK"] == NETWORK
        ann = node.metadata.annotations
        assert ann[PREFIX + "kube-subnet-manager"] == "true"
        assert ann[PREFIX + "public-ip"] == str(host.address)
        assert ann[PREFIX + "backend-type"] == ("" if backend == "udp" else backend)
        if backend == "vxlan":
            mac = in_ns(host.ns, "cat", "/sys/class/net/flannel.1/address").stdout.strip()
            assert ann[PREFIX + "backend-data"] == json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":"))
        else:
            assert ann[PREFIX + "backend-data"] == "null"
        condition = next(c for c in node.status.conditions if c.type == "NetworkUnavailable")
        assert (condition.status, condition.reason, condition.message) == (
            "False",
            "FlannelIsUp",
            "Flannel is running on this node",
        )
    assert wait_for(lambda: not ping_matrix(bed), 10), f"{ping_matrix(bed)}\n{bed.logs()}"
    pods = [h.pods[0] for h in bed.hosts]
    assert bed.iperf3(pods[0], pods[1], 1)["end"]["sum_received"]["bytes"] > 1_000_000
    assert bed.iperf3(pods[1], pods[0], 1)["end"]["sum_received"]["bytes"] > 1_000_000
    listing = bed.cli(bed.hosts[0].ns, "leases", *bed.store_args()).stdout
    for host in bed.hosts:
        assert str(subnet_of(host)) in listing and str(host.address) in listing, listing
    assert "Traceback" not in bed.logs()


def test_deleted_node_loses_its_routes_and_a_late_node_is_reachable(kube):
    bed = kube
    a, b, late = two_nodes_with_pods(bed, "vxlan")
    gone = str(subnet_of(b))
    bed.kube.delete_node(b.node_name)
    assert wait_for(lambda: gone not in in_ns(a.ns, "ip", "route").stdout, 2, interval=0.02), bed.logs()
    bed.start_node(late)
    pod = bed.add_pod(late)
    assert reachable(bed, a.pods[0], pod, 2), bed.logs()


def test_api_server_outage_does_not_disturb_traffic_and_the_watch_resumes(kube):
    bed = kube
    a, b, late = two_nodes_with_pods(bed, "udp")
    pinger = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a.pods[0].ns,
            "ping",
            "-i",
            "0.01",
            "-c",
            "6300",
            "-W",
            "1",
            "-q",
            str(b.pods[0].address),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    bed.extra_processes.append(pinger)
    bed.kube.stop_apiserver()
    # A node started during the outage waits for the API server (as a DaemonSet pod would) instead of failing.
    bed.registered.add(late.node_name)  # its Node is registered by its "kubelet" only once the server is back
    bed.start_node(late, wait=False)
    time.sleep(60)
    assert a.process.poll() is None and b.process.poll() is None and late.process.poll() is None, bed.logs()
    bed.kube.start_apiserver()
    # Its kubelet registers the Node once the server is back, and kube-controller-manager assigns the podCIDR; from
    # then on the peers must see it within 2 s. kube-controller-manager's own watch backs off for up to ~30 s after an
    # outage, which is not under test here: it is restarted, as a control-plane restart would do.
    bed.kube.stop_controller_manager()
    bed.kube.start_controller_manager()
    bed.register_node(late)
    bed.wait_ready(late, timeout=10)
    pod = bed.add_pod(late)
    assert reachable(bed, a.pods[0], pod, 2) and reachable(bed, pod, b.pods[0], 2), bed.logs()
    out, _ = pinger.communicate(timeout=60)
    assert " 0% packet loss" in out, out
    for host in (a, b):
        log = bed.node_log(host)
        assert log.count("Lost the Kubernetes API server") == 1, log
        assert log.count("reachable again") == 1, log
        assert "listing the nodes again" not in log or "expired" in log


def test_watch_lists_again_after_410_gone_and_ends_with_the_servers_node_set(kube):
    bed = kube
    use_backend(bed, "host-gw")
    a, b, c = bed.hosts
    bed.start_cluster()
    assert wait_for(lambda: not ping_matrix(bed), 10), bed.logs()
    gone = str(subnet_of(c))
    bed.stop_node(c)
    bed.kube.stop_apiserver()
    # Behind the server's back: c's Node vanishes and the history the nodes would resume from is compacted away.
    bed.kube.tamper_etcd_behind_the_api_server(c.node_name)
    bed.kube.start_apiserver()
    for host in (a, b):
        assert wait_for(lambda host=host: gone not in in_ns(host.ns, "ip", "route").stdout, 10), bed.logs()
        assert "listing the nodes again" in bed.node_log(host), bed.node_log(host)
    assert bed.ping(a.pods[0].ns, b.pods[0].address, count=3, interval=0.1), bed.logs()


def test_kill_9_and_restart_keeps_subnet_and_vtep_mac(kube):
    bed = kube
    a, b, _ = two_nodes_with_pods(bed, "vxlan")
    subnet, mac = subnet_of(b), annotations(bed, b)[PREFIX + "backend-data"]
    b.process.send_signal(signal.SIGKILL)
    b.process.wait()
    # A reboot would also lose the device: the MAC must come back from the node's annotation.
    in_ns(b.ns, "ip", "link", "del", "flannel.1")
    bed.start_node(b)
    assert subnet_of(b) == subnet and annotations(bed, b)[PREFIX + "backend-data"] == mac
    assert json.loads(mac)["VtepMAC"] == in_ns(b.ns, "cat", "/sys/class/net/flannel.1/address").stdout.strip()
    assert reachable(bed, a.pods[0], b.pods[0], 2), bed.logs()


def test_node_name_from_the_pod_spec_and_no_network_unavailable_condition(kube):
    bed = kube
    host = bed.hosts[0]
    bed.register_node(host)
    bed.registered.add(host.node_name)
    bed.kube.create_pod("flannel-ds-x", "kube-flannel", host.node_name)
    env = {"POD_NAME": "flannel-ds-x", "POD_NAMESPACE": "kube-flannel"}
    bed.start_node(host, "--set-node-network-unavailable=false", env=env, node_name=False)
    node = bed.kube.get_node(host.node_name)
    assert str(subnet_of(host)) == node.spec.podCIDR
    assert not any(c.type == "NetworkUnavailable" for c in (node.status.conditions or []))


def test_node_public_ip_and_public_ip_overwrite_annotations(kube):
    bed = kube
    use_backend(bed, "udp")
    a, b, _ = bed.hosts
    # node-public-ip replaces -public-ip (and so picks the interface); public-ip-overwrite is what peers are told.
    bed.register_node(a, annotations={PREFIX + "node-public-ip": str(a.address)})
    bed.register_node(b, annotations={PREFIX + "public-ip-overwrite": "198.18.0.99"})
    bed.registered.update({a.node_name, b.node_name})
    bed.start_node(a, iface=None)
    bed.start_node(b)
    assert f"Using interface eth0 with address {a.address}, public IP {a.address}" in bed.node_log(a)
    assert annotations(bed, a)[PREFIX + "public-ip"] == str(a.address)
    assert annotations(bed, b)[PREFIX + "public-ip"] == "198.18.0.99"
    assert "Overriding public ip with '198.18.0.99'" in bed.node_log(b)


def test_a_node_without_any_annotation_is_annotated(kube):
    """Upstream flanneld v0.28.10 panics (assignment to entry in nil map) on a Node that has no annotation at all."""
    bed = kube
    host = bed.hosts[0]
    bed.register_node(host, bare=True)
    bed.start_node(host)
    assert annotations(bed, host)[PREFIX + "kube-subnet-manager"] == "true"


def test_node_waits_for_its_pod_cidr(kube):
    bed = kube
    host = bed.hosts[0]
    bed.kube.stop_controller_manager()
    bed.register_node(host, wait_cidr=False)
    bed.registered.add(host.node_name)
    bed.start_node(host, wait=False)
    assert wait_for(lambda: "to get its podCIDR" in bed.node_log(host), 10), bed.node_log(host)
    bed.kube.start_controller_manager()
    bed.wait_ready(host, timeout=25)
    assert str(subnet_of(host)) == bed.kube.get_node(host.node_name).spec.podCIDR


def no_trace_of_the_node(bed, host) -> None:
    """Nothing half-configured: no device, no rules, no subnet.env, no annotations."""
    links = in_ns(host.ns, "ip", "-o", "link").stdout
    assert "flannel" not in links, links
    assert "FLANNEL" not in in_ns(host.ns, "iptables-save").stdout
    assert not os.path.exists(host.subnet_file)
    if host.node_name in bed.registered and bed.kube.apiserver is not None:
        assert not any(key.startswith(PREFIX) for key in annotations(bed, host)), annotations(bed, host)


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_pod_cidr_outside_the_network_is_one_clear_line(kube, backend):
    bed = kube
    use_backend(bed, backend)
    host = bed.hosts[0]
    bed.register_node(host, wait_cidr=False, pod_cidrs=["10.99.1.0/24"])
    bed.registered.add(host.node_name)
    line = bed.run_node_expecting_failure(host)
    assert line == (
        f'error: subnet "{NETWORK}" specified in the flannel net config doesn\'t contain "10.99.1.0/24" '
        f'PodCIDR of the "{host.node_name}" node'
    ), bed.node_log(host)
    no_trace_of_the_node(bed, host)


def test_missing_pod_cidr_after_30_s_is_one_clear_line(kube):
    bed = kube
    host = bed.hosts[0]
    bed.kube.stop_controller_manager()
    bed.register_node(host, wait_cidr=False)
    bed.registered.add(host.node_name)
    line = bed.run_node_expecting_failure(host, timeout=45)
    assert line == f'error: node "{host.node_name}" pod cidr not assigned', bed.node_log(host)
    no_trace_of_the_node(bed, host)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--kube-annotation-prefix", "org.COM"],
            "error: error creating network manager: subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*",
        ),
        (
            ["--kubeconfig-file", "/nonexistent/kubeconfig"],
            "error: fail to create kubernetes config: cannot read "
            "kubeconfig /nonexistent/kubeconfig: No such file or directory",
        ),
    ],
)
def test_bad_kube_flags_are_one_clear_line(kube, flags, message):
    bed = kube
    host = bed.hosts[0]
    assert bed.run_node_expecting_failure(host, *flags) == message
    no_trace_of_the_node(bed, host)


@pytest.mark.parametrize(
    "text, message",
    [
        ("garbage: [\n", "not YAML: expected the node content, but found '<stream end>' at line 2"),
        ("", "invalid configuration: no configuration has been provided in "),
    ],
    ids=["not-yaml", "empty"],
)
def test_a_damaged_kubeconfig_is_one_clear_line(kube, text, message):
    bed = kube
    host = bed.hosts[0]
    path = os.path.join(bed.workdir, "damaged.kubeconfig")
    with open(path, "w") as f:
        f.write(text)
    line = bed.run_node_expecting_failure(host, "--kube-subnet-mgr", "--kubeconfig-file", path, store=False)
    assert line.startswith("error: fail to create kubernetes config: ") and message in line, line
    assert "Traceback" not in bed.node_log(host)
    no_trace_of_the_node(bed, host)


@pytest.mark.skipif(not os.access(kubeserver.kubectl_path(), os.X_OK), reason="kubectl not built (scripts/setup.sh)")
def test_kube_api_url_alone_reaches_the_api_through_kubectl_proxy(kube):
    """-kube-api-url without a kubeconfig, as upstream: no credentials of its own, so it works against an endpoint
    that allows that, here `kubectl proxy` holding the flannel ServiceAccount's token on each node's loopback."""
    bed = kube
    a, b, _ = bed.hosts
    for host in (a, b):
        bed.popen(
            host.ns,
            kubeserver.kubectl_path(),
            "proxy",
            "--address=127.0.0.1",
            "--port=8001",
            f"--kubeconfig={bed.kubeconfig}",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_for(lambda h=host: in_ns(h.ns, "ss", "-Hltn", "sport = :8001", check=False).stdout.strip(), 10)
        bed.start_node(host, "--kube-subnet-mgr", "--kube-api-url", "http://127.0.0.1:8001", store=False)
        bed.add_pod(host)
    assert reachable(bed, a.pods[0], b.pods[0], 5), bed.logs()
    assert annotations(bed, a)[PREFIX + "kube-subnet-manager"] == "true"


def test_a_token_without_the_role_is_one_clear_line(kube):
    bed = kube
    host = bed.hosts[0]
    bed.kube.create_service_account("nobody", "kube-flannel")
    bed.kube.write_kubeconfig(bed.kubeconfig, bed.kube.service_account_token("nobody", "kube-flannel"))
    line = bed.run_node_expecting_failure(host)
    assert line.startswith(
        "error: error waiting for nodeController to sync state: nodes is forbidden: User "
        '"system:serviceaccount:kube-flannel:nobody" cannot list resource "nodes"'
    ), line
    no_trace_of_the_node(bed, host)


def test_no_kube_configuration_at_all_is_upstreams_line(kube):
    bed = kube
    host = bed.hosts[0]
    env = {"KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": ""}
    line = bed.run_node_expecting_failure(host, "--kube-subnet-mgr", env=env, store=False)
    assert line.startswith(
        "error: fail to create kubernetes config: invalid configuration: no configuration has been provided"
    ), line
    no_trace_of_the_node(bed, host)


def test_missing_node_name_is_one_clear_line(kube):
    bed = kube
    host = bed.hosts[0]
    line = bed.run_node_expecting_failure(host, env={"POD_NAME": "", "POD_NAMESPACE": ""}, node_name=False)
    assert line == "error: env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)"


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "udp"])
def test_dual_stack_takes_both_pod_cidrs(bed, backend):
    bed.write_config(
        {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": backend}}
    )
    bed.start_kube()  # kube-controller-manager gets both cluster CIDRs: each Node gets an IPv4 and an IPv6 podCIDR
    bed.start_cluster()
    for host in bed.hosts:
        node = bed.kube.get_node(host.node_name)
        v6 = ipaddress.ip_interface(host.subnet_env()["FLANNEL_IPV6_SUBNET"]).network
        assert [str(subnet_of(host)), str(v6)] == list(node.spec.podCIDRs)
        ann = node.metadata.annotations
        assert ann[PREFIX + "public-ipv6"] == str(host.address6)
        if backend == "vxlan":
            mac = in_ns(host.ns, "cat", "/sys/class/net/flannel-v6.1/address").stdout.strip()
            assert json.loads(ann[PREFIX + "backend-v6-data"]) == {"VNI": 1, "VtepMAC": mac}
    pods = [h.pods[0] for h in bed.hosts]
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert wait_for(lambda src=src, dst=dst: bed.ping(src.ns, dst.address6, timeout=0.5), 5), bed.logs()


def test_capture_takes_the_peers_from_the_nodes(kube):
    bed = kube
    a, b, _ = two_nodes_with_pods(bed, "udp")
    capture = bed.popen(
        b.ns,
        sys.executable,
        "-m",
        "flannel_udp",
        "capture",
        *bed.store_args(),
        "--iface",
        "eth0",
        "--proto",
        "icmp",
        "--count",
        "2",
        "--duration",
        "15",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    early = read_until(capture, "listening on")  # from here on nothing is missed
    assert bed.ping(a.pods[0].ns, b.pods[0].address, count=2, interval=0.2)
    out, err = capture.communicate(timeout=20)
    err = early + err
    assert capture.returncode == 0 and "no leases" not in err, err
    request = next(line for line in out.splitlines() if "echo-request" in line)
    assert f"{a.address} [{subnet_of(a)}] > {b.address} [{subnet_of(b)}] udp: ICMP" in request and request.endswith(
        " ok"
    )


def test_sigterm_while_waiting_for_the_api_server_ends_the_node_at_once(kube):
    bed = kube
    host = bed.hosts[0]
    bed.register_node(host)
    bed.kube.stop_apiserver()
    bed.start_node(host, wait=False)
    assert wait_for(lambda: "Lost the Kubernetes API server" in bed.node_log(host), 10), bed.node_log(host)
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(5) == 0, bed.node_log(host)
    assert bed.node_log(host).rstrip().endswith("Exiting cleanly...")
    no_trace_of_the_node(bed, host)
