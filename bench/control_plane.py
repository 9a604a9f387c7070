"""Control-plane scale: N simulated nodes acquire leases at once (one /16 cut into /26 subnets, 1,023 of them) and each
follows the others with its own lease watch; reported is the time until every node has seen every other lease, for
each store and each N.

    .venv/bin/python -m bench.control_plane --nodes 100,300,1000 --stores embedded,etcd,kube

Nodes are asyncio tasks in this process, each with its own Manager and its own watch stream; they share a pool of store
connections (--connections), as a pool of node processes would share the machine. The embedded store is a fresh
SQLite file; etcd is a real etcd server started on loopback for the run. `kube` is a real control plane (etcd,
kube-apiserver, kube-controller-manager) in a network namespace of its own: the N Node objects are registered through
the API first (as kubelets would) and get their podCIDRs from kube-controller-manager, then N Kubernetes subnet
managers start at once, each with its own client connection and its own list+watch of the Nodes, annotate their Node
and follow the others. Nothing is left behind.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time

from flannel_udp.etcdserver import EtcdCluster
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.etcd_client import EtcdOptions
from flannel_udp.subnet.etcd_store import EtcdRegistry
from flannel_udp.subnet.lease import LeaseAttrs
from flannel_udp.subnet.local_store import LocalRegistry
from flannel_udp.subnet.manager import Manager
from flannel_udp.subnet.watcher import LeaseWatcher

CONFIG = '{"Network": "10.100.0.0/16", "SubnetLen": 26}'
UNDERLAY = ipaddress.ip_network("198.18.0.0/15")


async def simulate(registries: list, nodes: int, timeout: float) -> dict:
    config = load_config(CONFIG)
    started = time.monotonic()
    acquired: list[float] = []
    converged: list[float] = []

    async def node(i: int) -> None:
        registry = registries[i % len(registries)]
        lease = await Manager(registry, config).acquire_lease(LeaseAttrs(UNDERLAY.network_address + i + 1))
        acquired.append(time.monotonic() - started)
        watcher = LeaseWatcher(lease.subnet)
        watch = registry.watch_subnets()
        try:
            async for result in watch:
                watcher.apply(result)
                if len(watcher.leases) == nodes - 1:
                    converged.append(time.monotonic() - started)
                    return
        finally:
            await watch.aclose()

    await asyncio.wait_for(asyncio.gather(*(node(i) for i in range(nodes))), timeout)
    return {"nodes": nodes, "all_acquired_s": max(acquired), "all_converged_s": max(converged),
            "median_node_converged_s": statistics.median(converged)}


async def run_embedded(nodes: int, connections: int, timeout: float) -> dict:
    folder = tempfile.mkdtemp(prefix="flannel-udp-scale-")
    registries = [LocalRegistry.open_sync(f"{folder}/leases.db") for _ in range(min(connections, nodes))]
    try:
        return await simulate(registries, nodes, timeout)
    finally:
        for registry in registries:
            await registry.close()
        shutil.rmtree(folder, ignore_errors=True)


async def run_etcd(endpoints: str, prefix: str, nodes: int, connections: int, timeout: float) -> dict:
    registries = [EtcdRegistry(EtcdOptions(endpoints=endpoints, prefix=prefix)) for _ in range(min(connections, nodes))]
    try:
        return await simulate(registries, nodes, timeout)
    finally:
        for registry in registries:
            await registry.close()


KUBE_NETWORK = "10.100.0.0/16"


def run_kube(nodes: int, timeout: float) -> dict:
    """A fresh control plane per size (so every size starts from an empty cluster), in a namespace of its own; the
    simulation's event loop runs in a thread that entered that namespace, where the API server is on loopback."""
    import secrets
    import subprocess

    from flannel_udp import kubeserver

    ns = f"fu{secrets.token_hex(3)}-cpbench"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        with kubeserver.KubeControlPlane(ns, "127.0.0.1", [KUBE_NETWORK], node_mask_v4=26) as cp:
            names = [f"node-{i:04d}" for i in range(nodes)]
            cp.call(register_nodes, names)
            kubeconfig = cp.write_kubeconfig(cp.path("bench.kubeconfig"), cp.flannel_token())
            return run_in_namespace(ns, simulate_kube(kubeconfig, names, timeout))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def run_in_namespace(ns: str, coroutine) -> dict:
    """Run the coroutine on an event loop in a thread that entered `ns`; an interruption (Ctrl-C, SIGTERM) cancels it,
    so the nodes close their connections and the thread ends before the control plane is removed."""
    import concurrent.futures

    from flannel_udp import kubeserver

    loop = asyncio.new_event_loop()
    task = loop.create_task(coroutine)
    pool = concurrent.futures.ThreadPoolExecutor(1, initializer=kubeserver.enter_netns, initargs=(ns,))
    try:
        return pool.submit(loop.run_until_complete, task).result()
    except BaseException:
        loop.call_soon_threadsafe(task.cancel)
        raise
    finally:
        pool.shutdown(wait=True)
        loop.close()


def register_nodes(client, names: list[str]) -> None:
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Node
    for name in names:
        client.create(Node(metadata=ObjectMeta(name=name)))
    deadline = time.monotonic() + 120
    while sum(1 for n in client.list(Node) if n.spec and n.spec.podCIDR) < len(names):
        if time.monotonic() > deadline:
            raise RuntimeError("kube-controller-manager did not assign every podCIDR within 120 s")
        time.sleep(0.2)


async def simulate_kube(kubeconfig: str, names: list[str], timeout: float) -> dict:
    from flannel_udp.subnet.config import parse_config
    from flannel_udp.subnet.kube_client import KubeOptions
    from flannel_udp.subnet.kube_manager import KubeManager

    config = parse_config(json.dumps({"Network": KUBE_NETWORK}))
    opts = KubeOptions(kubeconfig_file=kubeconfig)
    started = time.monotonic()
    acquired: list[float] = []
    converged: list[float] = []

    async def node(i: int) -> None:
        manager = await KubeManager.open(opts, config, node_name=names[i])
        try:
            lease = await manager.acquire_lease(LeaseAttrs(UNDERLAY.network_address + i + 1))
            acquired.append(time.monotonic() - started)
            watcher = LeaseWatcher(lease.subnet)
            async for result in manager.watch_leases():
                watcher.apply(result)
                if len(watcher.leases) == len(names) - 1:
                    converged.append(time.monotonic() - started)
                    return
        finally:
            await manager.close()

    await asyncio.wait_for(asyncio.gather(*(node(i) for i in range(len(names)))), timeout)
    return {"nodes": len(names), "all_acquired_s": max(acquired), "all_converged_s": max(converged),
            "median_node_converged_s": statistics.median(converged)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,300,1000", help="comma list of cluster sizes (at most 1023)")
    parser.add_argument("--stores", default="embedded,etcd", help="comma list of: embedded, etcd, kube")
    parser.add_argument("--connections", type=int, default=32, help="store connections shared by the simulated nodes")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one size may take")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the simulated nodes' own chatter is not the point
    sizes = [int(n) for n in args.nodes.split(",")]
    stores = args.stores.split(",")
    if any(not 2 <= n <= 1023 for n in sizes) or any(s not in ("embedded", "etcd", "kube") for s in stores):
        parser.error("--nodes from 2 to 1023; --stores of embedded, etcd, kube")
    results: dict = {s: [] for s in stores}
    # SIGTERM (timeout, a CI runner) takes the Ctrl-C path, so the servers started here are stopped and removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    etcd = EtcdCluster(extra_args=("--quota-backend-bytes", str(2 << 30))) if "etcd" in stores else None
    try:
        print(f"{'store':9} {'nodes':>6} {'all acquired s':>15} {'all converged s':>16} {'median node s':>14}")
        for store in stores:
            for n in sizes:
                try:
                    if store == "embedded":
                        figures = asyncio.run(run_embedded(n, args.connections, args.timeout))
                    elif store == "kube":
                        figures = run_kube(n, args.timeout)
                    else:
                        figures = asyncio.run(run_etcd(etcd.endpoints, f"/scale-{n}/network", n, args.connections,
                                                       args.timeout))
                except asyncio.TimeoutError:
                    print(f"{store:9} {n:6} {'did not converge within ' + format(args.timeout, 'g') + ' s':>47}", flush=True)
                    results[store].append({"nodes": n, "timeout_s": args.timeout})
                    continue
                results[store].append(figures)
                print(f"{store:9} {n:6} {figures['all_acquired_s']:15.2f} {figures['all_converged_s']:16.2f} "
                      f"{figures['median_node_converged_s']:14.2f}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if etcd is not None:
            etcd.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
