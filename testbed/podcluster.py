"""A Kubernetes cluster of the testbed whose nodes run pods under real kubelets (testbed/kubenode.py), with flannel-udp
deployed the way its users deploy it: the image built by scripts/build-image.sh imported into every node's containerd,
and deploy/kube-flannel-udp.yml applied with kubectl. Shared by the DaemonSet tests and `flannel-udp demo --kubelet`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import yaml

from . import images
from .cluster import Testbed
from .kubeserver import CACHE, flannel_manifest, kubectl_path

ROOT = Path(__file__).resolve().parents[1]
NETWORK = "10.244.0.0/16"  # the manifest's net-conf.json, and so kube-controller-manager's --cluster-cidr
IMAGE = "docker.io/library/flannel-udp:0.1.0"  # the manifest's `image: flannel-udp:0.1.0`, as containerd names it
FLANNEL_NAMESPACE = "kube-flannel"
DAEMONSET = "ds/kube-flannel-ds"
TCP_PORT = 7000  # each test pod answers a connection here with its name
# What goes into the image: a change to any of these builds it again.
IMAGE_SOURCES = ("flannel_udp", "_fastpath", "pyproject.toml", "setup.py", "scripts/build-image.sh")


class PodClusterError(RuntimeError):
    pass


def image_archive() -> str:
    """flannel-udp's OCI archive for the code in this tree: built by scripts/build-image.sh once per version of the
    sources (about a minute), then reused; older builds are removed."""
    digest = hashlib.sha256()
    for source in IMAGE_SOURCES:
        path = ROOT / source
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts or file.suffix in (".so", ".c") or file.name.endswith(".egg-info"):
                continue
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    folder = Path(CACHE) / "image"
    archive = folder / f"flannel-udp-{digest.hexdigest()[:16]}.oci.tar"
    if not archive.exists():
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build-image.sh"), "--output", str(archive)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if result.returncode != 0:
            raise PodClusterError(f"scripts/build-image.sh failed: {(result.stderr or result.stdout)[-3000:]}")
        for old in folder.glob("flannel-udp-*.oci.tar"):
            if old != archive:
                old.unlink()
    return str(archive)


class PodCluster:
    """start() builds the control plane and a kubelet node in every host of the testbed; deploy() applies the
    manifest. Everything it starts belongs to the testbed, which removes it on close()."""

    def __init__(self, bed: Testbed, network: str = NETWORK) -> None:
        self.bed = bed
        self.network = network  # the ConfigMap's Network, and so kube-controller-manager's --cluster-cidr

    def start(self) -> None:
        bed = self.bed
        bed.write_config({"Network": self.network, "Backend": {"Type": "udp"}})
        bed.start_kube([self.network], kubelets=True)
        archives = [
            (images.pause_archive(bed.workdir), images.PAUSE_IMAGE),
            (images.test_pod_archive(bed.workdir), images.TEST_IMAGE),
            (image_archive(), IMAGE),
        ]
        bed.start_kubelets(archives)
        deadline = time.monotonic() + 60
        while len(self.kubectl("get", "nodes", "-o", "name").split()) < len(bed.hosts):
            if time.monotonic() > deadline:
                raise PodClusterError(f"not every kubelet registered its node: {self.kubectl('get', 'nodes')}")
            time.sleep(0.5)

    def _kubectl(self, args: list[str], input: str | None, timeout: float) -> subprocess.CompletedProcess:
        """kubectl as the cluster's admin, from the control plane's namespace."""
        kubeconfig = self.bed.kube.path("admin.kubeconfig")
        command = ["ip", "netns", "exec", self.bed.kube_ns, kubectl_path(), f"--kubeconfig={kubeconfig}", *args]
        return subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        result = self._kubectl(list(args), input, timeout)
        if result.returncode != 0:
            raise PodClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    # -- flannel-udp ----------------------------------------------------------------------------------------------
    def deploy(self, backend: str = "udp") -> None:
        """deploy/kube-flannel-udp.yml as shipped (its net-conf.json with this network and `backend`), then wait for
        the rollout."""
        documents = list(yaml.safe_load_all(flannel_manifest()))
        for document in documents:
            if document["kind"] == "ConfigMap":
                config = json.loads(document["data"]["net-conf.json"])
                config["Network"] = self.network
                document["data"]["net-conf.json"] = self._net_conf(json.dumps(config), backend)
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
        self.wait_rollout()

    @staticmethod
    def _net_conf(text: str, backend: str) -> str:
        config = json.loads(text)
        config["Backend"] = {"Type": backend}
        return json.dumps(config, indent=2)

    def wait_rollout(self, timeout: float = 180) -> None:
        self.kubectl(
            "rollout", "status", "-n", FLANNEL_NAMESPACE, DAEMONSET, f"--timeout={timeout:.0f}s", timeout=timeout + 10
        )

    def set_backend(self, backend: str) -> None:
        """What an operator does to change the backend: edit the ConfigMap, restart the DaemonSet's pods."""
        configmap = ("configmap", "-n", FLANNEL_NAMESPACE, "kube-flannel-cfg")
        current = json.loads(self.kubectl("get", *configmap, "-o", "json"))
        patch = {"data": {"net-conf.json": self._net_conf(current["data"]["net-conf.json"], backend)}}
        self.kubectl("patch", *configmap, "-p", json.dumps(patch))
        self.kubectl("rollout", "restart", "-n", FLANNEL_NAMESPACE, DAEMONSET)
        self.wait_rollout()

    def agent_pods(self) -> dict[str, dict]:
        """The DaemonSet's pods by node name."""
        listing = json.loads(self.kubectl("get", "pods", "-n", FLANNEL_NAMESPACE, "-l", "app=flannel", "-o", "json"))
        return {pod["spec"]["nodeName"]: pod for pod in listing["items"]}

    # -- test pods ------------------------------------------------------------------------------------------------
    def add_pod(self, name: str, node: str, timeout: float = 60) -> str:
        """A busybox pod scheduled onto `node` (by its hostname label) that answers every TCP connection on port
        7000 with its name; returns its IP once it runs."""
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "flannel-udp-test"}},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "main",
                        "image": images.TEST_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", f"nc -ll -p {TCP_PORT} -e /bin/hostname & exec sleep 1000000"],
                    }
                ],
            },
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.kubectl("wait", "--for=condition=Ready", f"pod/{name}", f"--timeout={timeout:.0f}s", timeout=timeout + 10)
        return self.kubectl("get", "pod", name, "-o", "jsonpath={.status.podIP}")

    def exec(self, pod: str, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A command in a pod, through the API server and its node's kubelet (kubectl exec)."""
        result = self._kubectl(["exec", pod, "--", *command], None, timeout)
        if check and result.returncode != 0:
            raise PodClusterError(f"kubectl exec {pod} -- {' '.join(command)}: {result.stderr.strip()}")
        return result

    def ping(self, pod: str, address: str, count: int = 2) -> bool:
        return self.exec(pod, "ping", "-c", str(count), "-W", "1", address, check=False).returncode == 0

    def tcp_answer(self, pod: str, address: str) -> str:
        """What a test pod at `address` answers over TCP (its name), asked from `pod`."""
        return self.exec(pod, "nc", "-w", "2", address, str(TCP_PORT), check=False).stdout.strip()

    def wait_ping(self, pod: str, address: str, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.ping(pod, address, count=1):
                return True
        return False


def node_subnet_env(bed: Testbed, node_index: int) -> dict[str, str]:
    """subnet.env as the agent wrote it on a node's own /run/flannel."""
    path = bed.kubelet_nodes[node_index].host_path("/run/flannel/subnet.env")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(line.strip().split("=", 1) for line in f if "=" in line)
