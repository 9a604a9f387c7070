"""A cluster of hosts and pods in network namespaces on this machine, shared by the demo, the benchmarks and the tests.

Layout: one underlay namespace holding a bridge; each host namespace joins it through a veth (`eth0`, an address in
198.18.0.0/24 and one in fd00:198:18::/64 for dual-stack runs); each pod namespace hangs off its host's `cni0` bridge
with an address from the host's FLANNEL_SUBNET. Everything lives in namespaces named with a unique prefix and is removed
by close(), also after a failure. The root namespace is never touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .etcdserver import EtcdCluster

UNDERLAY = ipaddress.ip_network("198.18.0.0/24")
UNDERLAY6 = ipaddress.ip_network("fd00:198:18::/64")  # unique-local: never routed beyond this machine
ETCD_FIRST_ADDRESS = 201  # etcd members sit on the underlay at .201, .202, ...
KUBE_ADDRESS = 200  # the Kubernetes control plane's API server sits on the underlay at .200
CNI_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins: bridge, host-local, ...


# Our own command in a child process. -P: the current directory is not put on sys.path, so a clone's uncompiled
# _fastpath/ sources never shadow the installed extension when a command is run from the clone.
FLANNEL_UDP = [sys.executable, "-P", "-m", "flannel_udp"]


def cni_plugin_path() -> str:
    """The `flannel` CNI plugin installed beside this Python (a console script of this package)."""
    return os.path.join(os.path.dirname(sys.executable), "flannel")


class TestbedError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, timeout: float = 30, capture: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=capture, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise TestbedError(f"{' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Poll until predicate() is truthy or the timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def in_ns(ns: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, **kwargs)


REORDER_COUNTERS = ("TcpExtTCPSACKReorder", "TcpExtTCPTSReorder", "TcpExtTCPRenoReorder")


def tcp_reordering_seen(ns: str) -> dict[str, int]:
    """The namespace's TCP counters of segments found out of order (by SACK, timestamps or duplicate ACKs)."""
    rows = (line.split() for line in in_ns(ns, "nstat", "-az", *REORDER_COUNTERS).stdout.splitlines())
    return {row[0]: int(row[1]) for row in rows if row and row[0] in REORDER_COUNTERS}


SCRAPE = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"


def read_until(process: subprocess.Popen, needle: str, timeout: float = 20) -> str:
    """What a process wrote on stderr (a text pipe) up to and with the first line that holds `needle`."""
    import select

    assert process.stderr is not None
    seen, deadline = "", time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stderr], [], [], left)[0]:
            raise TestbedError(f"no {needle!r} from the process within {timeout} s: {seen}")
        line = process.stderr.readline()
        if not line:
            raise TestbedError(f"the process ended before saying {needle!r}: {seen}")
        seen += line
    return seen


def scrape_metrics(ns: str, port: int) -> dict[str, float]:
    """A node's /metrics inside its namespace, as {'name{label="v",...}': value} (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = in_ns(ns, sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{port}/metrics").stdout
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@dataclass
class Pod:
    name: str
    ns: str
    address: ipaddress.IPv4Address | None  # None in an IPv6-only network
    address6: ipaddress.IPv6Address | None = None  # dual stack and IPv6-only


@dataclass
class Host:
    name: str
    ns: str
    address: ipaddress.IPv4Address | None  # None on an IPv6-only underlay
    address6: ipaddress.IPv6Address
    subnet_file: str
    process: subprocess.Popen | None = None
    log_path: str = ""
    pods: list[Pod] = field(default_factory=list)
    node_name: str = ""  # the Node object's name in kube mode
    upstream: bool = False  # the node running now is upstream's flanneld, not ours

    def subnet_env(self) -> dict[str, str]:
        with open(self.subnet_file) as f:
            return dict(line.strip().split("=", 1) for line in f if "=" in line)


class Testbed:
    def __init__(self, hosts: int = 3, prefix: str | None = None, mtu: int = 1500, ipv6_only: bool = False) -> None:
        """ipv6_only: the hosts' links carry IPv6 alone (no IPv4 address outside loopback), the API server too."""
        self.ipv6_only = ipv6_only
        self.prefix = prefix or f"fu{secrets.token_hex(3)}"
        self.workdir = tempfile.mkdtemp(prefix=f"flannel-udp-{self.prefix}-")
        self.lease_file = os.path.join(self.workdir, "leases.db")
        self.config_file = os.path.join(self.workdir, "net-conf.json")
        self.underlay_ns = f"{self.prefix}-ul"
        self.mtu = mtu
        self.namespaces: list[str] = []
        self.hosts: list[Host] = []
        self.extra_processes: list[subprocess.Popen] = []
        self.extra_files: list[str] = []  # outside the work folder, removed at close (a killed program's socket)
        self.etcd: EtcdCluster | None = None
        self.etcd_ns = f"{self.prefix}-etcd"
        self.kube = None  # a KubeControlPlane once start_kube() ran: nodes then use -kube-subnet-mgr
        self.kube_ns = f"{self.prefix}-kube"
        self.kubeconfig = os.path.join(self.workdir, "flannel.kubeconfig")
        self.registered: set[str] = set()  # Node objects registered for hosts
        self.kubelet_nodes: list = []  # KubeletNode per host after start_kubelets()
        try:
            self._add_ns(self.underlay_ns)
            in_ns(self.underlay_ns, "ip", "link", "add", "br0", "type", "bridge")
            in_ns(self.underlay_ns, "ip", "link", "set", "br0", "up")
            for _ in range(hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------------------------------------------
    def _add_ns(self, ns: str) -> None:
        self.namespaces.append(ns)  # first: an interrupt right after the add cannot leak it
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")

    def add_host(self) -> Host:
        index = len(self.hosts) + 1
        name = f"h{index}"
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        peer = f"{self.prefix}{name}"[:15]
        # Create the pair inside the underlay namespace, then move one end: nothing appears in the root namespace.
        in_ns(
            self.underlay_ns,
            "ip",
            "link",
            "add",
            peer,
            "mtu",
            str(self.mtu),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            str(self.mtu),
            "netns",
            ns,
        )
        in_ns(self.underlay_ns, "ip", "link", "set", peer, "master", "br0", "up")
        address = UNDERLAY.network_address + index
        address6 = UNDERLAY6.network_address + index
        if not self.ipv6_only:
            in_ns(ns, "ip", "addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0")
        # nodad: usable at once, instead of after a second of duplicate detection on a link we built ourselves.
        in_ns(ns, "ip", "-6", "addr", "add", f"{address6}/{UNDERLAY6.prefixlen}", "dev", "eth0", "nodad")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        host = Host(
            name,
            ns,
            None if self.ipv6_only else address,
            address6,
            os.path.join(self.workdir, f"{name}-subnet.env"),
            node_name=f"{self.prefix}-{name}",
        )
        self.hosts.append(host)
        return host

    def write_config(self, config: dict) -> str:
        """net-conf.json for the embedded store; with etcd running, also stored as its <prefix>/config."""
        with open(self.config_file, "w") as f:
            json.dump(config, f)
        if self.etcd is not None:
            self.cli(self.etcd_ns, "config", "put", self.config_file, "--etcd-endpoints", self.etcd.endpoints)
        return self.config_file

    def start_etcd(self, members: int = 1) -> EtcdCluster:
        """Real etcd members in their own namespace on the underlay; nodes started afterwards use them as the store."""
        addresses = [str(UNDERLAY.network_address + ETCD_FIRST_ADDRESS + i) for i in range(members)]
        self._join_underlay(self.etcd_ns, f"{self.prefix}et", [f"{a}/{UNDERLAY.prefixlen}" for a in addresses])
        self.etcd = EtcdCluster(addresses, ns=self.etcd_ns)
        if os.path.exists(self.config_file):
            with open(self.config_file) as f:
                self.write_config(json.load(f))
        return self.etcd

    def _join_underlay(self, ns: str, link: str, addresses: list[str]) -> None:
        """A namespace of servers on the underlay bridge, through a veth created inside the underlay namespace."""
        self._add_ns(ns)
        in_ns(self.underlay_ns, "ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        in_ns(self.underlay_ns, "ip", "link", "set", link, "master", "br0", "up")
        for address in addresses:
            in_ns(ns, "ip", "addr", "add", address, "dev", "eth0", *(["nodad"] if ":" in address else []))
        in_ns(ns, "ip", "link", "set", "eth0", "up")

    def start_kube(self, cluster_cidrs: list[str] | None = None, kubelets: bool = False):
        """A real Kubernetes control plane on the underlay (.200); nodes started afterwards run -kube-subnet-mgr with
        a token of the flannel ServiceAccount, and each host is registered as a Node when its node first starts.
        cluster_cidrs defaults to the Network of the config written so far (kube-controller-manager's
        --cluster-cidr). kubelets: a control plane for start_kubelets() (scheduler, every controller)."""
        from .kubeserver import KubeControlPlane

        if cluster_cidrs is None:
            with open(self.config_file) as f:
                config = json.load(f)
            cluster_cidrs = [config["Network"]] if config.get("EnableIPv4", True) else []
            cluster_cidrs += [config["IPv6Network"]] if config.get("EnableIPv6") else []
        underlay = UNDERLAY6 if self.ipv6_only else UNDERLAY
        address = str(underlay.network_address + KUBE_ADDRESS)
        addresses = [f"{address}/{underlay.prefixlen}"]
        self._join_underlay(self.kube_ns, f"{self.prefix}kb", addresses)
        self.kube = KubeControlPlane(self.kube_ns, address, cluster_cidrs, kubelets=kubelets)
        self.kube.write_kubeconfig(self.kubeconfig, self.kube.flannel_token())
        return self.kube

    def start_kubelets(self, images: list[tuple[str, str]]) -> list:
        """A kubelet node (containerd, kubelet, kube-proxy: testbed/kubenode.py) in every host, with the images
        (OCI archive, name) in its containerd; each registers its own Node. Needs start_kube(kubelets=True)."""
        from .kubenode import KubeletNode

        admin, cluster_cidr = self.kube.path("admin.kubeconfig"), self.kube.cluster_cidrs[0]
        for host in self.hosts:
            # A default route, as every node has: a Service's ClusterIP (the API server's, 10.96.0.1) needs a route
            # before kube-proxy's rules rewrite it to an address on the underlay.
            in_ns(host.ns, "ip", "route", "replace", "default", "dev", "eth0")
            node = KubeletNode(host.ns, host.node_name, str(host.address), self.workdir, admin, cluster_cidr)
            self.kubelet_nodes.append(node)
            node.start(images)
            self.registered.add(host.node_name)
        return self.kubelet_nodes

    def register_node(self, host: Host, wait_cidr: bool = True, **kwargs) -> None:
        """The host's Node object, as its kubelet would register it; kube-controller-manager gives it a podCIDR."""
        self.kube.register_node(host.node_name, **kwargs)
        self.registered.add(host.node_name)
        if wait_cidr:
            self.kube.wait_pod_cidr(host.node_name)

    def cli(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`flannel-udp ARGS` inside a namespace."""
        return in_ns(ns, *FLANNEL_UDP, *args, check=check)

    def store_args(self) -> list[str]:
        """The flags that point a node (or `leases`) at this testbed's store: the Kubernetes API or etcd when running,
        else the file."""
        if self.kube is not None:
            return ["--kube-subnet-mgr", "--kubeconfig-file", self.kubeconfig]
        if self.etcd is not None:
            return ["--etcd-endpoints", self.etcd.endpoints]
        return ["--lease-file", self.lease_file]

    def start_node(
        self,
        host: Host,
        *extra: str,
        iface: str | None = "eth0",
        wait: bool = True,
        timeout: float = 20,
        env: dict[str, str] | None = None,
        node_name: bool = True,
        store: bool = True,
        upstream: bool = False,
        cpus: str | None = None,
    ) -> Host:
        """Start `flannel-udp run` inside the host's namespace on the shared store (the embedded file, etcd, or the
        Kubernetes API, where the host's Node is registered first and NODE_NAME names it unless node_name is False).
        env adds variables (an empty value removes one); store=False leaves out the store flags. upstream=True runs
        upstream's flanneld with the same command line instead (etcd or Kubernetes only: it has no embedded store).
        cpus: run it confined to these CPUs (taskset -c), and every thread it starts with it."""
        if os.path.exists(host.subnet_file) and wait:
            os.unlink(host.subnet_file)
        host.log_path = os.path.join(self.workdir, f"{host.name}.log")
        if upstream:
            from .upstreamflannel import flanneld_path

            program = [flanneld_path()]
        else:
            program = [*FLANNEL_UDP, "run", "--cni-data-dir", self.cni_data_dir(host)]
        host.upstream = upstream
        cmd = [
            "ip",
            "netns",
            "exec",
            host.ns,
            *(["taskset", "-c", cpus] if cpus else []),
            *program,
            "--net-config-path",
            self.config_file,
            "--subnet-file",
            host.subnet_file,
            *(self.store_args() if store else []),
            *(["--iface", iface] if iface else []),
            *extra,
        ]
        variables = dict(os.environ)
        if self.kube is not None:
            if node_name:
                variables["NODE_NAME"] = host.node_name
            if host.node_name not in self.registered:
                self.register_node(host)
        for name, value in (env or {}).items():
            if value:
                variables[name] = value
            else:
                variables.pop(name, None)
        with open(host.log_path, "ab") as log:
            host.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=variables)
        if wait:
            self.wait_ready(host, timeout)
        return host

    def start_cluster(self, *extra: str, pods_per_host: int = 1) -> None:
        """Every host's node started at once (they race for leases, as a real cluster's do), then pods on each."""
        for host in self.hosts:
            self.start_node(host, *extra, wait=False)
        for host in self.hosts:
            self.wait_ready(host)
            for _ in range(pods_per_host):
                self.add_pod(host)

    def run_node_expecting_failure(
        self, host: Host, *extra: str, iface: str = "eth0", timeout: float = 20, **kwargs
    ) -> str:
        """Start a node that must refuse to run: exit status 1; returns the last line it printed."""
        self.start_node(host, *extra, iface=iface, wait=False, **kwargs)
        code = host.process.wait(timeout)
        host.process = None
        if code != 1:
            raise TestbedError(f"node {host.name} exited with {code}, not 1: {self.node_log(host)[-2000:]}")
        return self.node_log(host).strip().splitlines()[-1]

    def wait_ready(self, host: Host, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(host.subnet_file):
            if host.process.poll() is not None:
                raise TestbedError(
                    f"node {host.name} exited with {host.process.returncode}: {self.node_log(host)[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TestbedError(f"node {host.name} not ready after {timeout}s: {self.node_log(host)[-2000:]}")
            time.sleep(0.05)

    def node_log(self, host: Host) -> str:
        try:
            with open(host.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def logs(self) -> str:
        """The tail of every node's log, for failure messages."""
        return "\n".join(
            f"--- {h.name}{' (upstream flanneld)' if h.upstream else ''}\n{self.node_log(h)[-3000:]}"
            for h in self.hosts
        )

    def stop_node(self, host: Host, timeout: float = 10) -> int | None:
        if host.process is None:
            return None
        if host.process.poll() is None:
            host.process.send_signal(signal.SIGTERM)
            try:
                host.process.wait(timeout)
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait()
        code = host.process.returncode
        host.process = None
        return code

    def add_pod(self, host: Host) -> Pod:
        """A pod namespace wired up by the `flannel` CNI plugin (which runs Debian's bridge and host-local plugins):
        a veth on the host's cni0 and an address from its FLANNEL_SUBNET, exactly as a container runtime would."""
        index = len(host.pods) + 1
        name = f"{host.name}p{index}"
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        result = json.loads(self.cni(host, "ADD", name, ns).stdout)
        addresses = [ipaddress.ip_interface(ip["address"]).ip for ip in result["ips"]]
        pod = Pod(
            name,
            ns,
            next((a for a in addresses if a.version == 4), None),
            next((a for a in addresses if a.version == 6), None),
        )
        if pod.address6 is not None:
            # The bridge's new IPv6 gateway address answers neighbour solicitations only after duplicate address
            # detection (up to ~2 s); a pod's first packets would be lost until then.
            wait_for(lambda: "tentative" not in in_ns(host.ns, "ip", "-6", "addr", "show", "dev", "cni0").stdout, 5)
        host.pods.append(pod)
        return pod

    def cni_data_dir(self, host: Host) -> str:
        return os.path.join(self.workdir, "cni", host.name)

    def cni_config(self, host: Host) -> dict:
        # Masquerading pod traffic is flanneld's job (-ip-masq); inside the cluster pods keep their addresses.
        return {
            "cniVersion": "1.0.0",
            "name": "flannel-udp",
            "type": "flannel",
            "subnetFile": host.subnet_file,
            "dataDir": self.cni_data_dir(host),
            "ipam": {"dataDir": os.path.join(self.workdir, "ipam", host.name)},
            "delegate": {"ipMasq": False},
        }

    def cni(
        self, host: Host, command: str, container: str, ns: str, config: dict | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run the `flannel` CNI plugin in the host's namespace, as a container runtime would."""
        env = dict(
            os.environ,
            CNI_COMMAND=command,
            CNI_CONTAINERID=container,
            CNI_NETNS=f"/var/run/netns/{ns}",
            CNI_IFNAME="eth0",
            CNI_PATH=CNI_PLUGIN_DIR,
        )
        result = subprocess.run(
            ["ip", "netns", "exec", host.ns, cni_plugin_path()],
            input=json.dumps(config or self.cni_config(host)),
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        if check and result.returncode != 0:
            raise TestbedError(f"CNI {command} for {container} failed: {result.stdout} {result.stderr}")
        return result

    def set_underlay_offloads(self, enabled: bool) -> None:
        """veth passes 64 KB GSO packets that a physical NIC would not; benchmarks run both ways."""
        state = "on" if enabled else "off"
        for host in self.hosts:
            in_ns(host.ns, "ethtool", "-K", "eth0", "tso", state, "gso", state, "gro", state, check=False)

    # -- observing -----------------------------------------------------------------------------------------------
    def ping(self, ns: str, target, count: int = 1, timeout: float = 2, interval: float = 0.2) -> bool:
        result = in_ns(
            ns,
            "ping",
            "-c",
            str(count),
            "-i",
            str(interval),
            "-W",
            str(timeout),
            "-q",
            str(target),
            check=False,
            timeout=count * (interval + timeout) + 5,
        )
        return result.returncode == 0

    def iperf3(self, client: Pod, server: Pod, seconds: float = 1, *flags: str, ipv6: bool = False) -> dict:
        """One iperf3 run from pod to pod (a one-shot server in `server`); iperf3's JSON report, or {} if it failed."""
        target = server.address6 if ipv6 else server.address
        process = self.popen(server.ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        result = in_ns(
            client.ns,
            "iperf3",
            "-c",
            str(target),
            "-t",
            f"{seconds:g}",
            "-J",
            *flags,
            check=False,
            timeout=seconds + 20,
        )
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        try:
            return json.loads(result.stdout)
        except ValueError:
            return {}

    def popen(self, ns: str, *args: str, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kwargs)
        self.extra_processes.append(process)
        return process

    # -- teardown ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        for host in self.hosts:
            try:
                self.stop_node(host, timeout=5)
            except OSError:  # a node process that is already gone
                pass
        for process in self.extra_processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for path in self.extra_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for node in self.kubelet_nodes:
            node.close()
        self.kubelet_nodes.clear()
        if self.etcd is not None:
            self.etcd.close()
            self.etcd = None
        if self.kube is not None:
            self.kube.close()
            self.kube = None
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def save_state(self, path: str) -> None:
        """What is running, so that another process can remove it (`demo down`): namespaces, our PIDs, the folder."""
        pids = [h.process.pid for h in self.hosts if h.process is not None and h.process.poll() is None]
        pids += [p.pid for p in self.extra_processes if p.poll() is None]
        if self.etcd is not None:
            pids += [m.process.pid for m in self.etcd.members if m.process is not None]
        if self.kube is not None:
            pids += self.kube.pids()
        with open(path, "w") as f:
            json.dump(
                {
                    "node_cgroups": [node.cgroup for node in self.kubelet_nodes],
                    "namespaces": self.namespaces,
                    "pids": pids,
                    "workdir": self.workdir,
                    "etcd_workdir": self.etcd.workdir if self.etcd else None,
                    "kube_workdir": self.kube.workdir if self.kube else None,
                },
                f,
            )

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def teardown_saved(path: str) -> int:
    """Remove a cluster recorded by save_state: stop its processes (by PID, only if still ours), then its namespaces."""
    with open(path) as f:
        state = json.load(f)
    for pid in state["pids"]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # already gone
        if any(name in cmdline for name in (b"flannel_udp", b"iperf3", b"etcd", b"kube-apiserver", b"kube-")):
            os.kill(pid, signal.SIGTERM)
    for cgroup in state.get("node_cgroups", []):  # kubelet nodes: every process in their cgroups, by PID
        from .kubenode import remove_node_cgroup

        remove_node_cgroup(cgroup)
    deadline = time.monotonic() + 10
    for pid in state["pids"]:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    for ns in reversed(state["namespaces"]):
        sh("ip", "netns", "del", ns, check=False)
    for folder in (state["workdir"], state.get("etcd_workdir"), state.get("kube_workdir")):
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    return len(state["namespaces"])
