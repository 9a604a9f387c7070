"""A real Kubernetes control plane for tests, the benchmarks and the demo: etcd (Debian's etcd-server),
kube-apiserver and kube-controller-manager built from k8s.io/kubernetes by scripts/build-go-servers.sh.

Everything runs inside a network namespace that the caller made, with `address` on its underlay interface:
kube-apiserver serves https://<address>:6443 with a CA, serving certificate and service-account keys made by openssl
for this run, static-token authentication for the admin and RBAC authorization; kube-controller-manager assigns
podCIDRs (`--allocate-node-cidrs --cluster-cidr`) exactly as in a cluster. Nodes are Node objects registered through
the API (no kubelet). The flannel ServiceAccount and its ClusterRole come from the shipped manifest, and each node
process gets a token of that account, so a node provably needs nothing beyond that role.

The admin side (this process) talks to the API from a worker thread that has entered the namespace (setns), so the
root namespace is never touched. close() kills what was started, by PID, and removes the folder.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .etcdserver import EtcdCluster

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kube-flannel-udp.yml"
KUBE_VERSION = "v1.34.4"  # keep in step with scripts/build-go-servers.sh
CACHE = os.environ.get("FLANNEL_UDP_CACHE", "/var/cache/flannel-udp")
API_PORT = 6443
ADMIN_TOKEN_USER = "flannel-udp-admin"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:10:96::/112"  # an IPv6-only cluster's Services (the API server on an IPv6 address)
ISSUER = "https://kubernetes.default.svc.cluster.local"
FLANNEL_NAMESPACE, FLANNEL_ACCOUNT = "kube-flannel", "flannel"
CLONE_NEWNET = 0x40000000


class KubeServerError(RuntimeError):
    pass


def binaries_dir() -> str:
    return os.path.join(CACHE, f"kube-{KUBE_VERSION}")


def node_binaries_dir() -> str:
    """kube-scheduler, kubelet, kube-proxy, kubectl and the pause program (scripts/build-go-servers.sh)."""
    return os.path.join(CACHE, f"kube-node-{KUBE_VERSION}")


def kubectl_path() -> str:
    return os.path.join(node_binaries_dir(), "kubectl")


def available() -> bool:
    return all(
        os.access(os.path.join(binaries_dir(), b), os.X_OK) for b in ("kube-apiserver", "kube-controller-manager")
    )


def flannel_manifest() -> str:
    """What a cluster admin applies: deploy/kube-flannel-udp.yml."""
    return MANIFEST.read_text()


def rbac_manifest() -> str:
    """The manifest's namespace, ServiceAccount and its role: what a node of the tests that run flannel-udp outside
    a DaemonSet gets, so those tests prove the role is enough."""
    documents = flannel_manifest().split("\n---\n")
    kinds = re.compile(r"^kind: (Namespace|ClusterRole|ClusterRoleBinding|ServiceAccount)$", re.M)
    return "\n---\n".join(d for d in documents if kinds.search(d))


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into the namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


def _openssl(*args: str, cwd: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise KubeServerError(f"openssl {' '.join(args)}: {result.stderr.strip()}")


class KubeControlPlane:
    def __init__(
        self,
        ns: str,
        address: str,
        cluster_cidrs: list[str],
        node_mask_v4: int = 24,
        node_mask_v6: int = 64,
        kubelets: bool = False,
    ) -> None:
        """kubelets: a control plane for nodes that run pods (testbed/kubenode.py): every controller (DaemonSets,
        service accounts, the root CA published to each namespace), kube-scheduler, and the `kubernetes` Service's
        endpoints kept, for kube-proxy; without it only podCIDRs are assigned, to Node objects the tests register."""
        if not available():
            raise KubeServerError(
                f"kube-apiserver/kube-controller-manager {KUBE_VERSION} are not built in "
                f"{binaries_dir()} (run scripts/setup.sh)"
            )
        self.ns = ns
        self.address = address
        self.cluster_cidrs = cluster_cidrs
        self.node_masks = (node_mask_v4, node_mask_v6)
        self.workdir = tempfile.mkdtemp(prefix="flannel-udp-kube-")
        ipv6 = ":" in address
        self.url = f"https://[{address}]:{API_PORT}" if ipv6 else f"https://{address}:{API_PORT}"
        self.service_cidr = SERVICE_CIDR6 if ipv6 else SERVICE_CIDR
        self.admin_token = os.urandom(16).hex()
        self.etcd: EtcdCluster | None = None
        self.apiserver: subprocess.Popen | None = None
        self.controller_manager: subprocess.Popen | None = None
        self.scheduler: subprocess.Popen | None = None
        self.kubelets = kubelets
        self._pool = concurrent.futures.ThreadPoolExecutor(1, initializer=enter_netns, initargs=(ns,))
        self._client = None
        try:
            self._make_credentials()
            self.etcd = EtcdCluster(["127.0.0.1"], ns=ns)
            self.start_apiserver()
            self.apply_manifest(rbac_manifest())
            self.start_controller_manager()
            if kubelets:
                self.scheduler = self._spawn(
                    "kube-scheduler",
                    [f"--kubeconfig={self.path('admin.kubeconfig')}", "--leader-elect=false", "--secure-port=0"],
                    binaries=node_binaries_dir(),
                )
        except BaseException:
            self.close()
            raise

    # -- credentials ----------------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def _make_credentials(self) -> None:
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3",
            "-subj",
            "/CN=flannel-udp-test-ca",
            cwd=self.workdir,
        )
        _openssl(
            "req",
            *ec,
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
            cwd=self.workdir,
        )
        with open(self.path("san.cnf"), "w") as f:
            f.write(
                f"subjectAltName=IP:{self.address},IP:127.0.0.1,IP:{self.service_ip},DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            )
        _openssl(
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "3",
            "-extfile",
            "san.cnf",
            cwd=self.workdir,
        )
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=self.workdir)
        _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.workdir)
        with open(self.path("tokens.csv"), "w") as f:
            f.write(f"{self.admin_token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},system:masters\n")
        self.write_kubeconfig(self.path("admin.kubeconfig"), self.admin_token)

    def write_kubeconfig(self, path: str, token: str, server: str | None = None) -> str:
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: flannel-udp-test
  cluster:
    server: {server or self.url}
    certificate-authority: {self.path("ca.crt")}
users:
- name: flannel
  user:
    token: {token}
contexts:
- name: flannel
  context:
    cluster: flannel-udp-test
    user: flannel
current-context: flannel
""")
        return path

    # -- processes ------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], binaries: str | None = None) -> subprocess.Popen:
        with open(self.path(f"{name}.log"), "ab") as log:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.ns, os.path.join(binaries or binaries_dir(), name), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        try:
            with open(self.path(f"{name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start_apiserver(self, timeout: float = 90) -> None:
        p = self.path
        self.apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd.endpoints}",
                "--bind-address=::",  # both families
                f"--secure-port={API_PORT}",
                f"--advertise-address={self.address}",
                f"--tls-cert-file={p('apiserver.crt')}",
                f"--tls-private-key-file={p('apiserver.key')}",
                f"--client-ca-file={p('ca.crt')}",
                f"--token-auth-file={p('tokens.csv')}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                f"--service-account-issuer={ISSUER}",
                f"--api-audiences={ISSUER}",
                f"--service-account-key-file={p('sa.pub')}",
                f"--service-account-signing-key-file={p('sa.key')}",
                f"--service-cluster-ip-range={self.service_cidr}",
                # API Priority and Fairness on, as in every cluster (it is the default): with it off, requests past
                # max-in-flight are refused at once (429), and 1,000 nodes starting together failed their patches.
                "--enable-priority-and-fairness=true",
                # Nodes that run kube-proxy need the `kubernetes` Service's endpoints (pods reach the API through it).
                *([] if self.kubelets else ["--endpoint-reconciler-type=none"]),
                # Logs and exec reach a kubelet at its node's address (the node names resolve nowhere here).
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                f"--cert-dir={p('certs')}",
                "--shutdown-delay-duration=0s",
                "--shutdown-send-retry-after=false",
            ],
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import ssl

        import httpx2

        deadline = time.monotonic() + timeout
        tls = ssl.create_default_context(cafile=self.path("ca.crt"))

        def probe() -> int:
            with httpx2.Client(verify=tls, timeout=2, trust_env=False) as http:
                return http.get(
                    f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
                ).status_code

        while time.monotonic() < deadline:
            if self.apiserver.poll() is not None:
                raise KubeServerError(f"kube-apiserver exited: {self.log('kube-apiserver')[-3000:]}")
            try:
                if self._pool.submit(probe).result() == 200:
                    return
            except (httpx2.HTTPError, OSError):  # not listening yet
                pass
            time.sleep(0.2)
        raise KubeServerError(f"kube-apiserver not ready after {timeout}s: {self.log('kube-apiserver')[-3000:]}")

    @property
    def service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the Service range."""
        return str(ipaddress.ip_network(self.service_cidr)[1])

    def start_controller_manager(self) -> None:
        dual = len(self.cluster_cidrs) > 1
        masks = (
            [f"--node-cidr-mask-size-ipv4={self.node_masks[0]}", f"--node-cidr-mask-size-ipv6={self.node_masks[1]}"]
            if dual
            else [f"--node-cidr-mask-size={self.node_masks[0 if ':' not in self.cluster_cidrs[0] else 1]}"]
        )
        self.controller_manager = self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.path('admin.kubeconfig')}",
                *(
                    ["--controllers=*", f"--root-ca-file={self.path('ca.crt')}"]
                    + [f"--service-account-private-key-file={self.path('sa.key')}"]
                    if self.kubelets
                    else ["--controllers=nodeipam"]
                ),
                "--allocate-node-cidrs=true",
                f"--cluster-cidr={','.join(self.cluster_cidrs)}",
                *masks,
                f"--service-cluster-ip-range={self.service_cidr}",
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ],
        )

    def stop_controller_manager(self) -> None:
        self._stop(self.controller_manager)
        self.controller_manager = None

    def stop_apiserver(self) -> None:
        """SIGKILL, as a crashed or partitioned server looks to clients: their connections end at once."""
        self._stop(self.apiserver, signal.SIGKILL)
        self.apiserver = None
        self._reset_client()

    def _stop(self, process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # -- the admin's API calls (in the namespace's thread) -----------------------------------------------------------
    def call(self, fn, *args, **kwargs):
        """Run fn(client, *args) with a lightkube admin client in the control plane's namespace."""
        return self._pool.submit(self._call, fn, args, kwargs).result()

    def _call(self, fn, args, kwargs):
        if self._client is None:
            from lightkube import Client, KubeConfig

            self._client = Client(KubeConfig.from_file(self.path("admin.kubeconfig")), trust_env=False)
        return fn(self._client, *args, **kwargs)

    def _reset_client(self) -> None:
        self._pool.submit(lambda: setattr(self, "_client", None)).result()

    def apply_manifest(self, text: str) -> None:
        from lightkube import codecs

        def apply(client) -> None:
            for obj in codecs.load_all_yaml(text):
                client.create(obj)

        self.call(apply)

    def flannel_token(self, seconds: int = 24 * 3600) -> str:
        """A token of the kube-flannel/flannel ServiceAccount, bound to exactly the shipped role."""
        return self.service_account_token(FLANNEL_ACCOUNT, FLANNEL_NAMESPACE, seconds)

    def service_account_token(self, name: str, namespace: str, seconds: int = 24 * 3600) -> str:
        """A bound token of a ServiceAccount (TokenRequest API), as the kubelet mounts into a pod."""
        from lightkube.models.authentication_v1 import TokenRequestSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import ServiceAccount

        def request(client) -> str:
            req = ServiceAccount.Token(
                metadata=ObjectMeta(name=name, namespace=namespace),
                spec=TokenRequestSpec(audiences=[ISSUER], expirationSeconds=seconds),
            )
            return client.create(req, name, namespace=namespace).status.token

        return self.call(request)

    def create_service_account(self, name: str, namespace: str) -> None:
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import ServiceAccount

        self.call(lambda client: client.create(ServiceAccount(metadata=ObjectMeta(name=name, namespace=namespace))))

    def create_pod(self, name: str, namespace: str, node_name: str) -> None:
        """A pod bound to a node, as a DaemonSet's pod is (no kubelet runs it: only its spec.nodeName matters)."""
        from lightkube.models.core_v1 import Container, PodSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import Pod

        pod = Pod(
            metadata=ObjectMeta(name=name, namespace=namespace),
            spec=PodSpec(
                nodeName=node_name,
                serviceAccountName=FLANNEL_ACCOUNT,
                automountServiceAccountToken=False,
                containers=[Container(name="kube-flannel", image="flannel-udp")],
            ),
        )
        self.call(lambda client: client.create(pod))

    def register_node(
        self,
        name: str,
        annotations: dict[str, str] | None = None,
        pod_cidrs: list[str] | None = None,
        bare: bool = False,
    ):
        """A Node object as a kubelet would register it (without pod_cidrs kube-controller-manager assigns them);
        bare: without the kubelet's annotations (with none at all unless `annotations`)."""
        from lightkube.models.core_v1 import NodeSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import Node

        spec = NodeSpec(podCIDR=pod_cidrs[0], podCIDRs=pod_cidrs) if pod_cidrs else NodeSpec()
        # The annotations every kubelet sets when it registers (upstream flanneld panics on a Node with none at all).
        kubelet = {
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        }
        node = Node(
            metadata=ObjectMeta(
                name=name,
                labels={"kubernetes.io/hostname": name},
                annotations={**({} if bare else kubelet), **(annotations or {})},
            ),
            spec=spec,
        )
        return self.call(lambda client: client.create(node))

    def get_node(self, name: str):
        from lightkube.resources.core_v1 import Node

        return self.call(lambda client: client.get(Node, name))

    def delete_node(self, name: str) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Node

        def delete(client) -> None:
            try:
                client.delete(Node, name)
            except ApiError as e:
                if e.status.code != 404:
                    raise

        self.call(delete)

    def wait_pod_cidr(self, name: str, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.get_node(name)
            if node.spec and node.spec.podCIDRs:
                return list(node.spec.podCIDRs)
            time.sleep(0.1)
        raise KubeServerError(
            f"node {name} got no podCIDR within {timeout}s: {self.log('kube-controller-manager')[-2000:]}"
        )

    def tamper_etcd_behind_the_api_server(self, delete_node: str) -> int:
        """With the API server stopped: delete a Node's key in etcd and compact the history, so that watches resuming
        from before it get 410 Gone and must list again. Returns the compacted revision."""
        import asyncio

        import aetcd

        async def work() -> int:
            async with aetcd.Client(host="127.0.0.1", port=self.etcd.members[0].client_port) as client:
                await client.delete(f"/registry/minions/{delete_node}".encode())
                revision = (await client.get_prefix(b"/registry/minions/")).header.revision
                await client.compact(revision, physical=True)
                return revision

        return self._pool.submit(lambda: asyncio.run(work())).result()

    # -- teardown -------------------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        procs = [self.apiserver, self.controller_manager, self.scheduler]
        pids = [p.pid for p in procs if p is not None and p.poll() is None]
        if self.etcd is not None:
            pids += [m.process.pid for m in self.etcd.members if m.process is not None]
        return pids

    def close(self) -> None:
        for process in (self.scheduler, self.controller_manager, self.apiserver):
            try:
                self._stop(process, signal.SIGKILL)
            except OSError:
                pass
        self.scheduler = self.controller_manager = self.apiserver = None
        if self.etcd is not None:
            self.etcd.close()
            self.etcd = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubeControlPlane:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
