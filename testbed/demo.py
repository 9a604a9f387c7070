"""`flannel-udp demo` (its options are in flannel_udp/demo.py): a small cluster in network namespaces, shown working,
then removed (also on Ctrl-C), or kept (`--keep`) until `flannel-udp demo down`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from .cluster import KUBE_ADDRESS, UNDERLAY, UNDERLAY6, Testbed, TestbedError, teardown_saved
from .images import ImageError
from .kubenode import KubeNodeError
from .kubeserver import KubeServerError
from .podcluster import PodCluster, PodClusterError, image_archive

STATE_FILE = "/run/flannel-udp-demo.json"  # what `demo --keep` left running, for `demo down`
DEFAULT_IPV6_NETWORK = "fd00:10:244::/56"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    if args.action == "down":
        return demo_down()
    if args.keep and os.path.exists(STATE_FILE):
        print(f"error: a kept demo is still running ({STATE_FILE}); run `flannel-udp demo down` first", file=sys.stderr)
        return 1
    if not 2 <= args.nodes <= 50 or not 1 <= args.pods <= 20:
        print("error: --nodes must be 2..50 and --pods 1..20", file=sys.stderr)
        return 1
    if ":" in args.network:  # an IPv6 overlay network alone: an IPv6-only cluster
        args.ipv6_only, args.ipv6_network = True, args.ipv6_network or args.network
    if args.ipv6_only and not args.ipv6_network:
        args.ipv6_network = DEFAULT_IPV6_NETWORK
    if args.kubelet and (args.ipv6_network or args.kube or args.nodes > 5):
        print("error: --kubelet runs IPv4 clusters of 2..5 nodes (it implies --kube)", file=sys.stderr)
        return 1
    # SIGTERM takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bed = None
    try:
        underlay = f"{UNDERLAY6}, IPv6 only" if args.ipv6_only else str(UNDERLAY)
        step(f"Building {args.nodes} hosts on an underlay bridge ({underlay}) in network namespaces")
        bed = Testbed(hosts=args.nodes, ipv6_only=args.ipv6_only)
        failures = kubelet_demo(bed, args) if args.kubelet else agents_demo(bed, args)
        outcome = "" if not failures else f" ({failures} checks failed)"
        if args.keep:
            bed.save_state(STATE_FILE)
            step(
                f"Done; the cluster keeps running (namespaces {bed.prefix}-*, logs in {bed.workdir}); "
                "remove it with `flannel-udp demo down`" + outcome
            )
            bed = None  # not closed: kept
        else:
            step("Done; removing the cluster" + outcome)
        return 0 if failures == 0 else 1
    except (TestbedError, KubeServerError, KubeNodeError, PodClusterError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; removing the cluster", file=sys.stderr)
        return 130
    finally:
        if bed is not None:
            bed.close()


def agents_demo(bed: Testbed, args: argparse.Namespace) -> int:
    """A node agent started in each host, pods made by the CNI plugin, the traffic shown; returns failed checks."""
    start_nodes(bed, args)
    step(f"Creating {args.pods} pods per host through the flannel CNI plugin (bridge cni0, host-local IPAM)")
    for host in bed.hosts:
        for _ in range(args.pods):
            bed.add_pod(host)
    step("Leases")
    print(bed.cli(bed.hosts[0].ns, "leases", *bed.store_args()).stdout)
    return show_traffic(bed, args)


def kubelet_demo(bed: Testbed, args: argparse.Namespace) -> int:
    """The DaemonSet on a cluster of kubelet nodes, pods scheduled on each, the traffic shown; returns failed checks."""
    step("Building flannel-udp's image with scripts/build-image.sh (reused while the code is unchanged)")
    print(f"    {image_archive()}")
    cluster = PodCluster(bed, args.network)
    step(
        "Starting Kubernetes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler on the underlay, and in "
        "each host a node with containerd, runc, kubelet and kube-proxy"
    )
    cluster.start()
    print(cluster.kubectl("get", "nodes", "-o", "wide"))
    step(f"kubectl apply -f deploy/kube-flannel-udp.yml ({args.backend} backend), waiting for the DaemonSet")
    cluster.deploy(args.backend)
    print(cluster.kubectl("get", "pods", "-n", "kube-flannel", "-o", "wide"))
    step(f"Scheduling {args.pods} busybox pods on each node (addresses from the flannel CNI plugin)")
    names = [f"pod-{n + 1}-{p + 1}" for n in range(len(bed.hosts)) for p in range(args.pods)]
    ips = {name: cluster.add_pod(name, bed.hosts[int(name.split("-")[1]) - 1].node_name) for name in names}
    print(cluster.kubectl("get", "pods", "-o", "wide"))
    failures = ping_matrix(names, lambda src, dst: cluster.ping(src, ips[dst], count=1), "IPv4 (kubectl exec)")
    step(f"TCP from {names[0]} to {names[-1]} (nc; the pod answers with its name)")
    answer = cluster.tcp_answer(names[0], ips[names[-1]])
    print(f"    {answer or 'no answer'}")
    failures += answer != names[-1]
    step("The agents' logs, the Kubernetes way (kubectl logs)")
    print(cluster.kubectl("logs", "-n", "kube-flannel", "ds/kube-flannel-ds", "-c", "kube-flannel", "--tail=4"))
    return failures


def start_nodes(bed: Testbed, args: argparse.Namespace) -> None:
    """The network config, the store (embedded, or a Kubernetes control plane), and a ready node on every host."""
    config: dict = {"Network": args.network, "Backend": {"Type": args.backend}}
    if args.ipv6_only:
        config = {"EnableIPv4": False, "Backend": {"Type": args.backend}}
    if args.ipv6_network:
        config.update(EnableIPv6=True, IPv6Network=args.ipv6_network)
    bed.write_config(config)
    if args.kube:
        api = (UNDERLAY6 if args.ipv6_only else UNDERLAY).network_address + KUBE_ADDRESS
        step(
            f"Starting a Kubernetes control plane on the underlay ({api}): etcd, kube-apiserver with RBAC, "
            "kube-controller-manager --allocate-node-cidrs"
        )
        bed.start_kube()
        store = "Kubernetes API: podCIDRs from kube-controller-manager, the flannel ServiceAccount's token"
    else:
        store = f"embedded store {bed.lease_file}"
    step(f"Starting a flannel-udp node in each host ({args.backend} backend, {store})")
    for host in bed.hosts:
        bed.start_node(host, wait=False)
    for host in bed.hosts:
        bed.wait_ready(host)
        env = host.subnet_env()
        shown = " ".join(f"{k}={env[k]}" for k in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU") if k in env)
        print(f"    {host.name} ({host.address or host.address6}): {shown}")


def show_traffic(bed: Testbed, args: argparse.Namespace) -> int:
    """The ping matrix of every family, then one iperf3 between two hosts; returns the number of failed checks."""
    pods = [pod for host in bed.hosts for pod in host.pods]
    time.sleep(0.5)  # routes follow the leases within the store's poll interval
    by_name = {pod.name: pod for pod in pods}
    names = list(by_name)

    def reach(attribute: str):
        return lambda src, dst: bed.ping(by_name[src].ns, getattr(by_name[dst], attribute), count=1, timeout=2)

    failures = 0 if args.ipv6_only else ping_matrix(names, reach("address"), "IPv4")
    if args.ipv6_network:
        failures += ping_matrix(names, reach("address6"), "IPv6")
    if args.iperf_seconds > 0:
        a, b = bed.hosts[0].pods[0], bed.hosts[1].pods[0]
        family = "over IPv6 " if args.ipv6_only else ""
        step(f"iperf3 TCP {a.name} -> {b.name} {family}for {args.iperf_seconds:g}s through the {args.backend} backend")
        report = bed.iperf3(a, b, args.iperf_seconds, ipv6=args.ipv6_only)
        try:
            print(f"    {report['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s")
        except KeyError:
            print(f"    iperf3 failed: {report.get('error', 'no report')}")
            failures += 1
    return failures


def ping_matrix(names: list[str], reach, family: str) -> int:
    """Print who reaches whom (reach(source, destination) -> bool); returns the number of failed pairs."""
    step(f"{family} ping matrix (pod to pod; ok = 1 echo answered)")
    width = max(len(name) for name in names) + 2
    print(" " * width + "".join(f"{name:>{width}}" for name in names))
    failures = 0
    for src in names:
        cells = []
        for dst in names:
            if src == dst:
                cells.append(f"{'-':>{width}}")
                continue
            ok = reach(src, dst)
            failures += not ok
            cells.append(f"{'ok' if ok else 'FAIL':>{width}}")
        print(f"{src:<{width}}" + "".join(cells))
    return failures


def demo_down() -> int:
    if not os.path.exists(STATE_FILE):
        print("no kept demo cluster (nothing to remove)")
        return 0
    removed = teardown_saved(STATE_FILE)
    os.unlink(STATE_FILE)
    print(f"removed the demo cluster: {removed} namespaces")
    return 0
