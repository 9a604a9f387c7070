"""`flannel-udp demo`: its options, and the hand-over to the repository's testbed (testbed/demo.py), which builds the
cluster. The demo runs from a clone of the repository, whose programs (built by scripts/) it starts and whose
manifest (deploy/) it applies; the installed package carries the node agent, the CNI plugin and the tools only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=["up", "down"],
        default="up",
        help="up (default): build, show, remove; down: remove what `--keep` left",
    )
    parser.add_argument(
        "--backend", choices=["udp", "vxlan", "host-gw"], default="udp", help="data plane (default udp)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the cluster running; `flannel-udp demo down` removes it"
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of hosts (default 3)")
    parser.add_argument("--pods", type=int, default=2, help="pods per host (default 2)")
    parser.add_argument(
        "--network",
        default="10.244.0.0/16",
        help="overlay network (default 10.244.0.0/16); an IPv6 network here means --ipv6-only with it",
    )
    parser.add_argument(
        "--ipv6-network",
        default="",
        metavar="CIDR",
        help="dual stack: also this IPv6 network, e.g. fd00:10:244::/56 (every backend)",
    )
    parser.add_argument(
        "--ipv6-only",
        action="store_true",
        help="an IPv6-only cluster: hosts whose links carry no IPv4 at all, EnableIPv4 false, pods with IPv6 "
        "addresses alone (network: --ipv6-network, default fd00:10:244::/56)",
    )
    parser.add_argument("--iperf-seconds", type=float, default=3, help="length of the throughput sample (0: skip)")
    parser.add_argument(
        "--kube",
        action="store_true",
        help="run the nodes with -kube-subnet-mgr against a real Kubernetes control plane (etcd, "
        "kube-apiserver, kube-controller-manager assigning the podCIDRs) instead of the embedded store",
    )
    parser.add_argument(
        "--kubelet",
        action="store_true",
        help="a real Kubernetes cluster whose nodes run pods under kubelets (containerd, runc, kubelet, kube-proxy "
        "in each host), with flannel-udp deployed as users deploy it: the image of scripts/build-image.sh (built on "
        "first use) and deploy/kube-flannel-udp.yml applied with kubectl",
    )


def run(args: argparse.Namespace) -> int:
    if not (REPOSITORY / "testbed" / "demo.py").is_file():
        print(
            "error: the demo runs from a clone of the flannel-udp repository (its testbed/, scripts/ and deploy/), "
            f"and {REPOSITORY} is not one",
            file=sys.stderr,
        )
        return 1
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    from testbed.demo import run_demo

    return run_demo(args)
