"""The demo as a newcomer runs it: every backend, --keep then `demo down`, and Ctrl-C leaving nothing behind."""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from testbed import kubenode, kubeserver


def namespaces() -> set[str]:
    return {
        line.split()[0]
        for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    }


def demo(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "flannel_udp", "demo", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_demo_shows_a_working_cluster_and_removes_it(backend):
    before = namespaces()
    result = demo("--nodes", "3", "--pods", "2", "--backend", backend, "--iperf-seconds", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAIL" not in out and out.count(" ok") >= 30  # 6 pods: 30 pairs
    assert f"through the {backend} backend" in out and "Gbit/s" in out and "SUBNET" in out
    assert not (namespaces() - before)  # nothing of its own left


@pytest.mark.skipif(not kubeserver.available(), reason="Kubernetes binaries not built (scripts/setup.sh)")
def test_kube_demo_runs_the_nodes_on_a_real_control_plane(backend="vxlan"):
    before = namespaces()
    result = demo("--kube", "--nodes", "2", "--pods", "1", "--backend", backend, "--iperf-seconds", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count(" ok") >= 2
    assert "never (podCIDR)" in result.stdout  # `leases` read the Nodes
    assert not (namespaces() - before)  # nothing of its own left


@pytest.mark.skipif(not kubeserver.available(), reason="Kubernetes binaries not built (scripts/setup.sh)")
def test_ipv6_only_demo_on_the_kubernetes_api_shows_ipv6_alone():
    before = namespaces()
    result = demo("--network", "fd00:10:244::/56", "--kube", "--nodes", "2", "--pods", "1", "--iperf-seconds", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "IPv6 only" in out and "IPv6 ping matrix" in out and "IPv4 ping matrix" not in out
    assert "FAIL" not in out and out.count(" ok") >= 2 and "over IPv6" in out and "Gbit/s" in out
    assert "FLANNEL_IPV6_SUBNET=fd00:10:244:" in out and "FLANNEL_SUBNET" not in out
    assert not (namespaces() - before)


def node_cgroups() -> set[str]:
    return {path for path in glob.glob("/sys/fs/cgroup/*/fu*") if os.path.isdir(path)}


@pytest.mark.skipif(
    not (kubeserver.available() and kubenode.available()), reason="kubelet or containerd missing (scripts/setup.sh)"
)
def test_kubelet_demo_deploys_the_daemonset_and_pods_talk_across_nodes():
    before, cgroups = namespaces(), node_cgroups()
    result = demo("--kubelet", "--nodes", "2", "--pods", "1", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = re.findall(r"^(pod-\d-1) +(\S+) +(\S+)$", out, re.M)  # the ping matrix
    assert rows == [("pod-1-1", "-", "ok"), ("pod-2-1", "ok", "-")], out
    assert "kube-flannel-ds-" in out and "1/1     Running" in out
    assert "\n    pod-2-1\n" in out  # the TCP answer
    assert "Wrote subnet file /run/flannel/subnet.env" in out  # kubectl logs
    assert not (namespaces() - before) and not (node_cgroups() - cgroups)  # nothing of its own left


def test_kept_demo_is_removed_by_demo_down():
    before = namespaces()
    result = demo("--nodes", "2", "--pods", "1", "--iperf-seconds", "0", "--keep")
    assert result.returncode == 0, result.stderr
    assert len(namespaces() - before) == 5  # underlay, 2 hosts, 2 pods
    assert demo("--keep", "--nodes", "2").returncode == 1  # one kept demo at a time
    down = demo("down")
    assert down.returncode == 0 and "removed the demo cluster: 5 namespaces" in down.stdout
    assert not (namespaces() - before)  # nothing of its own left
    assert "nothing to remove" in demo("down").stdout


def test_ctrl_c_removes_everything():
    before = namespaces()
    process = subprocess.Popen(
        [sys.executable, "-m", "flannel_udp", "demo", "--nodes", "3", "--iperf-seconds", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(namespaces() - before) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted; removing the cluster" in err
    assert not (namespaces() - before)  # nothing of its own left
    assert not any(p for p in os.listdir("/proc") if p.isdigit() and _is_demo_node(p))


def _is_demo_node(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"flannel_udp\x00run" in cmdline and b"flannel-udp-fu" in cmdline
