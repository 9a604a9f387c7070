"""A Kubernetes node of the testbed that runs real pods: containerd and runc from Debian, and kubelet and kube-proxy
built from k8s.io/kubernetes (scripts/build-go-servers.sh), inside a host's network namespace.

Each node also gets a mount namespace of its own, so that what a node keeps on "its host" is its own and the
machine's files are never touched: /etc, /opt, /var/lib and /var/log are overlays whose writes land in the node's
folder (the CNI config in /etc/cni/net.d, the CNI plugins in /opt/cni/bin, filled first with Debian's as a node's OS
provides them, /var/lib/cni, the pods' logs), and /run is a fresh tmpfs (/run/flannel, /run/netns: the pods' network
namespaces never appear in the root namespace's list; the xtables lock). /sys is the node's network namespace's own
sysfs, with the machine's cgroup hierarchies bound back under it. Every process of the node (the namespace holder,
containerd and its shims, kubelet, kube-proxy, and the pods kubelet starts under its cgroupRoot) lives in one cgroup
named after the node in every hierarchy, so close() finds and kills exactly them, by PID, and removes the cgroups.

What this kind of machine needs: containerd's CRI plugin with restrict_oom_score_adj (writing a negative
oom_score_adj is refused here: without it every sandbox fails in runc), the native snapshotter, kubelet with cgroupfs
and failCgroupV1 false (the machine has cgroup v1).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from .kubeserver import node_binaries_dir

CGROUP_FS = "/sys/fs/cgroup"
CNI_PLUGINS = "/usr/lib/cni"  # Debian's containernetworking-plugins
# The machine's folders a node sees with writes of its own on top, and the folders it starts with inside them.
OVERLAID = ("/etc", "/opt", "/var/lib", "/var/log")
NODE_DIRS = ("/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni", "/var/log/pods", "/var/log/containers", "/run/flannel")


class KubeNodeError(RuntimeError):
    pass


def available() -> bool:
    binaries = ("kubelet", "kube-proxy", "pause")
    tools = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare", "umoci")
    return all(os.access(os.path.join(node_binaries_dir(), b), os.X_OK) for b in binaries) and all(
        shutil.which(t) for t in tools
    )


def cgroup_hierarchies() -> list[str]:
    """The mounted cgroup hierarchies (v1 controllers, and the v2 tree where one is mounted beside them)."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]
    return [m for m in mounts if m.startswith(CGROUP_FS + "/") or m == CGROUP_FS]


class KubeletNode:
    def __init__(self, ns: str, name: str, address: str, workdir: str, kubeconfig: str, cluster_cidr: str) -> None:
        self.ns, self.name, self.address = ns, name, address
        self.kubeconfig, self.cluster_cidr = kubeconfig, cluster_cidr
        self.dir = os.path.join(workdir, f"node-{name}")
        self.cgroup = f"{os.path.basename(workdir)}-{name}"
        self.socket = os.path.join(self.dir, "containerd.sock")
        self.processes: dict[str, subprocess.Popen] = {}
        os.makedirs(self.dir, exist_ok=True)

    # -- start ----------------------------------------------------------------------------------------------------
    def start(self, images: list[tuple[str, str]]) -> None:
        """containerd with the images (archive, name) imported, then kubelet and kube-proxy; the node registers
        itself with the API server."""
        try:
            self._make_cgroups()
            self._start_holder()
            self._start_containerd()
            for archive, name in images:
                self.import_image(archive, name)
            self._start_kubelet()
            self._start_kube_proxy()
        except BaseException:
            self.close()
            raise

    def _make_cgroups(self) -> None:
        for hierarchy in cgroup_hierarchies():
            path = os.path.join(hierarchy, self.cgroup)
            os.makedirs(path, exist_ok=True)
            if os.path.basename(hierarchy) == "cpuset":  # a v1 cpuset takes no task before it has CPUs and memory
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(hierarchy, knob)) as f:
                        value = f.read().strip()
                    with open(os.path.join(path, knob), "w") as f:
                        f.write(value)

    def _command(self, *args: str) -> list[str]:
        """A command run in the node: its cgroup, its network namespace and (once the holder runs) its mounts."""
        enter = (
            f"for d in {CGROUP_FS}/*/{self.cgroup} {CGROUP_FS}/{self.cgroup}; do "
            '[ -d "$d" ] && echo $$ > "$d/cgroup.procs"; done; exec "$@"'
        )
        holder = self.processes.get("holder")
        namespaces = [f"--net=/run/netns/{self.ns}"] + ([f"--mount=/proc/{holder.pid}/ns/mnt"] if holder else [])
        return ["sh", "-c", enter, "sh", "nsenter", *namespaces, "--", *args]

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(os.path.join(self.dir, f"{name}.log"), "ab") as log:
            process = subprocess.Popen(self._command(*args), stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def _start_holder(self) -> None:
        """The process that holds the node's mount namespace, set up as the module docstring says."""
        overlays = []
        for path in OVERLAID:
            upper, work = (os.path.join(self.dir, "overlay", path.strip("/").replace("/", "-"), d) for d in "uw")
            os.makedirs(upper, exist_ok=True)
            os.makedirs(work, exist_ok=True)
            overlays.append(f"mount -t overlay overlay -o lowerdir={path},upperdir={upper},workdir={work} {path}")
        held = os.path.join(self.dir, "cgroup-held")
        os.makedirs(held, exist_ok=True)
        script = " && ".join(
            [
                "mount --make-rprivate /",
                f"mount --rbind {CGROUP_FS} {held}",
                "umount -l /sys",
                "mount -t sysfs sysfs /sys",
                f"mount --rbind {held} {CGROUP_FS}",
                f"umount -l {held}",
                *overlays,
                "mount -t tmpfs -o mode=0755 tmpfs /run",
                f"mkdir -p {' '.join(NODE_DIRS)}",
                f"cp -a {CNI_PLUGINS}/. /opt/cni/bin/",
                "echo ready",
                "exec sleep infinity",
            ]
        )
        holder = subprocess.Popen(
            self._command("unshare", "--mount", "--propagation", "private", "sh", "-c", script),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.processes["holder"] = holder
        line = holder.stdout.readline().strip() if holder.stdout else ""
        if line != "ready":
            raise KubeNodeError(f"node {self.name}: its mount namespace failed: {line} {holder.stdout.read()}")
        # The holder's PID is the unshare'd shell, now `sleep`: /proc/PID/ns/mnt is the node's mount namespace.

    def _start_containerd(self, timeout: float = 20) -> None:
        config = os.path.join(self.dir, "containerd.toml")
        with open(config, "w") as f:
            f.write(CONTAINERD_CONFIG.format(dir=self.dir, socket=self.socket))
        self._spawn("containerd", "containerd", "--config", config)
        self._wait(lambda: self.ctr("version", check=False).returncode == 0, timeout, "containerd")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ctr", "--address", self.socket, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise KubeNodeError(f"node {self.name}: ctr {' '.join(args)}: {result.stderr.strip()}")
        return result

    def import_image(self, archive: str, name: str) -> None:
        """An OCI archive into the node's containerd under `name` (repository:tag), as a node's image store has it."""
        repository, _, tag = name.rpartition(":")
        self.ctr("images", "import", "--base-name", repository, "--digests", archive)
        imported = f"{repository}:{tag}"
        listed = self.ctr("images", "list", "--quiet").stdout.split()
        if imported not in listed:
            raise KubeNodeError(f"node {self.name}: {archive} did not import as {imported} (have {listed})")

    def _start_kubelet(self) -> None:
        config = os.path.join(self.dir, "kubelet.yaml")
        with open(config, "w") as f:
            f.write(KUBELET_CONFIG.format(address=self.address, cgroup=self.cgroup, socket=self.socket))
        self._spawn(
            "kubelet",
            os.path.join(node_binaries_dir(), "kubelet"),
            f"--config={config}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={os.path.join(self.dir, 'kubelet')}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.address}",
            "--v=1",
        )

    def _start_kube_proxy(self) -> None:
        config = os.path.join(self.dir, "kube-proxy.yaml")
        with open(config, "w") as f:
            f.write(
                KUBE_PROXY_CONFIG.format(kubeconfig=self.kubeconfig, name=self.name, cluster_cidr=self.cluster_cidr)
            )
        self._spawn("kube-proxy", os.path.join(node_binaries_dir(), "kube-proxy"), f"--config={config}")

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            process = self.processes.get(what)
            if process is not None and process.poll() is not None:
                raise KubeNodeError(f"node {self.name}: {what} exited: {self.log(what)[-3000:]}")
            if time.monotonic() > deadline:
                raise KubeNodeError(f"node {self.name}: {what} not up after {timeout} s: {self.log(what)[-3000:]}")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def host_path(self, path: str) -> str:
        """A path of the node's own view (e.g. /run/flannel/subnet.env), reachable from outside the node."""
        return f"/proc/{self.processes['holder'].pid}/root{path}"

    # -- teardown -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops kubelet first (so it starts nothing new), then kills every process of the node by PID and removes
        its cgroups; the mount namespace goes with its last process."""
        kubelet = self.processes.get("kubelet")
        if kubelet is not None and kubelet.poll() is None:
            kubelet.send_signal(signal.SIGTERM)
            try:
                kubelet.wait(5)
            except subprocess.TimeoutExpired:
                pass
        remove_node_cgroup(self.cgroup)
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()


def cgroup_pids(name: str) -> list[int]:
    """Every process in the cgroup tree `name` (a node's: containerd's shims and the pods' processes included)."""
    found: set[int] = set()
    for hierarchy in cgroup_hierarchies():
        for root, _dirs, files in os.walk(os.path.join(hierarchy, name)):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        found.update(int(pid) for pid in f.read().split())
                except OSError:
                    pass
    return sorted(found)


def remove_node_cgroup(name: str, timeout: float = 10) -> None:
    """Kill (SIGKILL, by PID) every process of a node's cgroup tree, then remove the tree in every hierarchy."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for hierarchy in cgroup_hierarchies():
        for root, _dirs, _files in sorted(os.walk(os.path.join(hierarchy, name)), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(root)
            except OSError:
                pass


CONTAINERD_CONFIG = """version = 2
root = "{dir}/containerd/root"
state = "{dir}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"""

KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {address}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
resolvConf: /etc/resolv.conf
serializeImagePulls: false
localStorageCapacityIsolation: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 1Mi
  nodefs.available: "1%"
  imagefs.available: "1%"
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
maxPods: 30
"""

KUBE_PROXY_CONFIG = """apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
mode: iptables
clusterCIDR: {cluster_cidr}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"""
