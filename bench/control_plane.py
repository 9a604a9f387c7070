"""Control-plane scale: N simulated nodes acquire leases at once (one /16 cut into /26 subnets, 1,023 of them) and each
follows the others with its own lease watch; reported is the time until every node has seen every other lease, for
each store and each N, how many watches and allocation races were lost on the way, and the fan-out's throughput
(leases and lease events the watches handed over per second), and where the CPU went (all node processes together,
and the store's server: etcd, or kube-apiserver from the moment the nodes start). Then, on the lease stores, churn:
every 10th node releases its lease, and once every survivor has seen that, acquires again; reported is how long the
survivors took to see each change.

    .venv/bin/python -m bench.control_plane --nodes 100,300,1000 --stores embedded,etcd,kube

Each simulated node is what a node process runs against the store: its own client (its own SQLite connection, its own
gRPC channel to etcd, its own HTTPS client and list+watch of the Nodes), its own Manager and its own watch, on uvloop as
the agent runs. The nodes are spread over --processes OS processes (default 4 per core; a process per node would need
~40 MB each), which all start acquiring at the same instant (a barrier). The embedded store is a fresh SQLite file; etcd
is a real etcd server started on loopback for the run. `kube` is a real control plane (etcd, kube-apiserver,
kube-controller-manager) in a network namespace of its own: the N Node objects are registered through the API first (as
kubelets would) and get their podCIDRs from kube-controller-manager, then N Kubernetes subnet managers start at once,
annotate their Node and follow the others. The nodes' public IPs are consecutive (one underlay, as clusters number
their nodes) or, with --public-ips scattered, spread at random over 198.18.0.0/15. Simplified: no data plane, every
node on one machine's cores (with the servers, so 1,000 nodes put 10^6 watch deliveries on 2 cores that a cluster
spreads over 1,000 machines), and a node "sees" a lease when its watch delivers it. A size that times out says in
which phase and how far each process's nodes got. Nothing is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import logging
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback

import uvloop

from bench.harness import cpu_seconds
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.lease import LeaseAttrs, Snapshot
from flannel_udp.subnet.watcher import LeaseWatcher
from testbed.etcdserver import EtcdCluster

CONFIG = '{"Network": "10.100.0.0/16", "SubnetLen": 26}'
UNDERLAY = ipaddress.ip_network("198.18.0.0/15")
CHURN_EVERY = 10  # every 10th node leaves and rejoins after convergence
LOST_WATCH = ("Lost the etcd watch", "Lost the Kubernetes API server", "fell behind")
LOST_RACE = "was taken by another node meanwhile"


class LostWatches(logging.Handler):
    """Counts the store clients' own reports of a broken or overtaken watch, and the allocation races they lost."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.races = 0
        self.reasons: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if LOST_RACE in message:
            self.races += 1
        elif any(text in message for text in LOST_WATCH):
            self.count += 1
            self.reasons[re.sub(r"\d+", "N", message)[:160]] += 1


async def open_node(store: str, target: dict, i: int):
    """(manager, close) for node i: a client of its own, as a node process has."""
    if store == "kube":
        from flannel_udp.subnet.config import parse_config
        from flannel_udp.subnet.kube.client import KubeOptions
        from flannel_udp.subnet.kube.manager import KubeManager

        manager = await KubeManager.open(
            KubeOptions(kubeconfig_file=target["kubeconfig"]),
            parse_config(json.dumps({"Network": KUBE_NETWORK})),
            node_name=target["names"][i],
        )
        return manager, manager.close
    from flannel_udp.subnet.manager import Manager

    if store == "embedded":
        from flannel_udp.subnet.local.registry import LocalRegistry

        registry = LocalRegistry.open_sync(target["lease_file"])
    else:
        from flannel_udp.subnet.etcd.client import EtcdOptions
        from flannel_udp.subnet.etcd.registry import EtcdRegistry

        registry = EtcdRegistry(EtcdOptions(endpoints=target["endpoints"], prefix=target["prefix"]))
    return Manager(registry, load_config(CONFIG)), registry.close


class Follower:
    """A node's watch, consumed for the whole run, so that later phases can wait for what it has seen."""

    def __init__(self, manager, lease) -> None:
        self.watcher = LeaseWatcher(lease.subnet)
        self.watch = manager.watch_leases()
        self.changed = asyncio.Event()
        self.delivered = 0  # leases and lease events this watch handed over
        self.task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        try:
            async for result in self.watch:
                self.delivered += len(result.leases if isinstance(result, Snapshot) else result.events)
                self.watcher.apply(result)
                self.changed.set()
        finally:
            self.changed.set()  # a watch that ended (or raised) wakes until(), which says so

    async def until(self, count: int) -> float:
        """Wait until the watch shows `count` other leases; returns when (time.time()). A watch that ended is an
        error of its own (with the watch's exception), not a timeout."""
        while len(self.watcher.leases) != count:
            if self.task.done():
                error = None if self.task.cancelled() else self.task.exception()
                raise RuntimeError(f"a node's lease watch ended with {len(self.watcher.leases)} leases: {error!r}")
            self.changed.clear()
            await self.changed.wait()
        return time.time()

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.watch.aclose()


async def run_share(store: str, target: dict, ids: list[int], nodes: int, barrier, timeout: float) -> dict:
    """Acquire and converge; then (lease stores) the churn: every CHURN_EVERY-th node releases its lease and, once
    every survivor has seen that, acquires again; the survivors' time to see each change is measured."""
    opened = dict(zip(ids, [await open_node(store, target, i) for i in ids], strict=True))
    followers: dict[int, Follower] = {}
    await asyncio.to_thread(barrier.wait, timeout)  # every process has its clients: all nodes start at once
    started = time.time()
    result: dict = {"started": started, "acquired": []}

    async def join(i: int) -> None:
        manager = opened[i][0]
        lease = await manager.acquire_lease(LeaseAttrs(ipaddress.IPv4Address(target["public_ips"][i])))
        followers[i] = Follower(manager, lease)

    async def first_join(i: int) -> float:
        await join(i)
        result["acquired"].append(time.time())
        return await followers[i].until(nodes - 1)

    async def leave(i: int) -> None:
        await followers.pop(i).close()
        await opened[i][0].release_created_lease()

    movers = [i for i in ids if i % CHURN_EVERY == 0]
    survivors = [i for i in ids if i % CHURN_EVERY != 0]
    moving = len(range(0, nodes, CHURN_EVERY))
    try:
        async with asyncio.timeout(timeout):
            result["phase"] = "acquire and converge"
            result["converged"] = await asyncio.gather(*(first_join(i) for i in ids))
            result["delivered"] = sum(follower.delivered for follower in followers.values())
            if store != "kube":  # a Kubernetes node leaves by its Node object going away, not through a lease store
                for phase, move, count in (("left_s", leave, nodes - 1 - moving), ("rejoined_s", join, nodes - 1)):
                    result["phase"] = phase
                    await asyncio.to_thread(barrier.wait, timeout)
                    began = time.time()
                    await asyncio.gather(*(move(i) for i in movers))
                    seen = await asyncio.gather(*(followers[i].until(count) for i in survivors))
                    result[phase] = max(seen, default=began) - began
    except TimeoutError:
        # Where it stuck: the phase, and how far this process's nodes got (a node's count of other leases seen).
        seen = collections.Counter(len(f.watcher.leases) for f in followers.values())
        result["timeout"] = f"in {result['phase']}: {len(followers)}/{len(ids)} nodes joined, seen {dict(seen)}"
    finally:
        # A copy: after a timeout, cancelled joins may still be adding their followers while these close.
        for follower in list(followers.values()):
            await follower.close()
        for _, close in opened.values():
            await close()
    return result


def worker(results, store: str, target: dict, ids: list[int], nodes: int, barrier, timeout: float) -> None:
    """One OS process's share of the nodes (runs in a spawned process); puts its result on `results`."""
    if store == "kube":
        from testbed import kubeserver

        kubeserver.enter_netns(target["ns"])  # the API server is on this namespace's loopback
    lost = LostWatches()
    nodes_log = logging.getLogger("flannel_udp")
    nodes_log.addHandler(lost)
    nodes_log.setLevel(logging.INFO)
    nodes_log.propagate = False  # the nodes' chatter is not the point; the lost watches are counted
    try:
        result = uvloop.run(run_share(store, target, ids, nodes, barrier, timeout))  # the loop a node process runs
    except TimeoutError:
        result = {"timeout": "before the start"}
    except Exception as e:  # noqa: BLE001 - any fault is said to the parent, which would otherwise wait forever
        where = traceback.extract_tb(e.__traceback__)[-1]  # the innermost frame: where a node's code failed
        result = {"error": f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # the whole process: start-up, lists, watches, churn
    result["lost_watches"] = lost.count
    result["lost_races"] = lost.races
    result["lost_reasons"] = dict(lost.reasons)
    results.put(result)


def public_ips(nodes: int, scattered: bool) -> list[str]:
    """The simulated nodes' underlay addresses: consecutive from 198.18.0.1 (one underlay, numbered as clusters number
    their nodes: each node's home subnet is its own), or scattered at random over 198.18.0.0/15 (homes then collide as
    random picks do, and allocation falls back to its uniform draws)."""
    first = int(UNDERLAY.network_address) + 1
    offsets = random.Random(nodes).sample(range(UNDERLAY.num_addresses - 2), nodes) if scattered else range(nodes)
    return [str(ipaddress.IPv4Address(first + offset)) for offset in offsets]


def simulate(
    store: str, target: dict, nodes: int, processes: int, timeout: float, scattered: bool, server_pid: int | None = None
) -> dict:
    """Run one size; `server_pid` is the store's server (etcd, kube-apiserver), whose CPU time over the run is
    reported beside the node processes' own."""
    processes = min(processes, nodes)
    server_cpu = cpu_seconds(server_pid) if server_pid is not None else 0.0
    target = {**target, "public_ips": public_ips(nodes, scattered)}
    context = multiprocessing.get_context("spawn")  # no fork: gRPC and threads do not survive it
    barrier, queue = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=worker, args=(queue, store, target, list(range(k, nodes, processes)), nodes, barrier, timeout)
        )
        for k in range(processes)
    ]
    try:
        for process in workers:
            process.start()
        results = [queue.get(timeout=timeout + 120) for _ in workers]
    finally:
        for process in workers:  # ours, and done or interrupted: none outlives the run
            if process.is_alive():
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
    lost = sum(r["lost_watches"] for r in results)
    reasons = collections.Counter()
    for r in results:
        reasons.update(r["lost_reasons"])
    for reason, count in reasons.most_common(3):
        print(f"  lost watch, {count} times: {reason}", file=sys.stderr, flush=True)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {processes} node processes failed; the first: {errors[0]}")
    stuck = [r["timeout"] for r in results if "timeout" in r]
    if stuck:
        print(f"  {len(stuck)} of {processes} node processes timed out, the first {stuck[0]}", file=sys.stderr)
        raise TimeoutError(lost)
    start = min(r["started"] for r in results)
    converged = [t - start for r in results for t in r["converged"]]
    return {
        "nodes": nodes,
        "processes": processes,
        "all_acquired_s": max(t - start for r in results for t in r["acquired"]),
        "all_converged_s": max(converged),
        "median_node_converged_s": statistics.median(converged),
        "lost_watches": lost,
        "lost_races": sum(r["lost_races"] for r in results),
        # Where the machine's CPU went: all node processes together, and the store's server (None: no server).
        "nodes_cpu_s": sum(r["cpu_s"] for r in results),
        "server_cpu_s": cpu_seconds(server_pid) - server_cpu if server_pid is not None else None,
        # The fan-out's throughput: every lease (in snapshots) and lease event the watches handed over until all had
        # converged, per second. Constant over N means no per-watcher cost that grows with the cluster.
        "delivered_per_s": sum(r["delivered"] for r in results) / max(converged),
        **{
            f"churn_{phase}": max(r[phase] for r in results) if all(phase in r for r in results) else None
            for phase in ("left_s", "rejoined_s")
        },
    }


def run_embedded(nodes: int, processes: int, timeout: float, scattered: bool) -> dict:
    folder = tempfile.mkdtemp(prefix="flannel-udp-scale-")
    try:
        return simulate("embedded", {"lease_file": f"{folder}/leases.db"}, nodes, processes, timeout, scattered)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_etcd(etcd: EtcdCluster, prefix: str, nodes: int, processes: int, timeout: float, scattered: bool) -> dict:
    target = {"endpoints": etcd.endpoints, "prefix": prefix}
    return simulate("etcd", target, nodes, processes, timeout, scattered, etcd.members[0].process.pid)


KUBE_NETWORK = "10.100.0.0/16"


def run_kube(nodes: int, processes: int, timeout: float, scattered: bool) -> dict:
    """A fresh control plane per size (so every size starts from an empty cluster), in a namespace of its own; the
    worker processes enter that namespace, where the API server is on loopback."""
    import secrets
    import subprocess

    from testbed import kubeserver

    ns = f"fu{secrets.token_hex(3)}-cpbench"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        with kubeserver.KubeControlPlane(ns, "127.0.0.1", [KUBE_NETWORK], node_mask_v4=26) as cp:
            names = [f"node-{i:04d}" for i in range(nodes)]
            cp.call(register_nodes, names)
            kubeconfig = cp.write_kubeconfig(cp.path("bench.kubeconfig"), cp.flannel_token())
            target = {"ns": ns, "kubeconfig": kubeconfig, "names": names}
            return simulate("kube", target, nodes, processes, timeout, scattered, cp.apiserver.pid)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


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


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,300,1000", help="comma list of cluster sizes (at most 1023)")
    parser.add_argument("--stores", default="embedded,etcd", help="comma list of: embedded, etcd, kube")
    parser.add_argument(
        "--processes",
        type=int,
        default=4 * (os.cpu_count() or 1),
        help="OS processes the nodes are spread over (each node has its own store client)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds one size may take")
    parser.add_argument(
        "--public-ips",
        choices=("consecutive", "scattered"),
        default="consecutive",
        help="the nodes' underlay addresses: consecutive (one underlay) or scattered at random over 198.18.0.0/15",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    args.sizes = [int(n) for n in args.nodes.split(",")]
    args.stores = args.stores.split(",")
    if any(not 2 <= n <= 1023 for n in args.sizes) or any(s not in ("embedded", "etcd", "kube") for s in args.stores):
        parser.error("--nodes from 2 to 1023; --stores of embedded, etcd, kube")
    return args


def run_size(store: str, run: int, n: int, etcd, args: argparse.Namespace) -> dict:
    """One cluster size on one store; a row is printed, and its figures (or why it failed) returned."""
    scattered = args.public_ips == "scattered"
    try:
        if store == "embedded":
            figures = run_embedded(n, args.processes, args.timeout, scattered)
        elif store == "kube":
            figures = run_kube(n, args.processes, args.timeout, scattered)
        else:
            figures = run_etcd(etcd, f"/scale-{run}-{n}/network", n, args.processes, args.timeout, scattered)
    except RuntimeError as e:  # nodes that gave up (e.g. the API server refusing connections)
        print(f"{store:9} {n:6} failed: {e}", flush=True)
        return {"nodes": n, "failed": str(e)}
    except TimeoutError as e:
        lost = e.args[0] if e.args else "?"
        print(
            f"{store:9} {n:6} {'did not converge within ' + format(args.timeout, 'g') + ' s':>47} {lost:>13}",
            flush=True,
        )
        return {"nodes": n, "timeout_s": args.timeout, "lost_watches": lost}
    server_cpu = "-" if figures["server_cpu_s"] is None else f"{figures['server_cpu_s']:.1f}"
    churn = "".join(
        f" {figures[k]:11.2f}" if figures[k] is not None else f" {'-':>11}"
        for k in ("churn_left_s", "churn_rejoined_s")
    )
    print(
        f"{store:9} {n:6} {figures['all_acquired_s']:15.2f} {figures['all_converged_s']:16.2f} "
        f"{figures['median_node_converged_s']:14.2f} {figures['lost_watches']:13d} "
        f"{figures['lost_races']:11d}{churn} {figures['delivered_per_s']:14,.0f} "
        f"{figures['nodes_cpu_s']:12.1f} {server_cpu:>13}",
        flush=True,
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    results: dict = {s: [] for s in args.stores}
    # SIGTERM (timeout, a CI runner) takes the Ctrl-C path, so the servers started here are stopped and removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    etcd = EtcdCluster(extra_args=("--quota-backend-bytes", str(2 << 30))) if "etcd" in args.stores else None
    try:
        print(
            f"{'store':9} {'nodes':>6} {'all acquired s':>15} {'all converged s':>16} {'median node s':>14} "
            f"{'lost watches':>13} {'lost races':>11} {'10% left s':>11} {'rejoined s':>11} {'leases seen/s':>14} "
            f"{'nodes CPU s':>12} {'server CPU s':>13}",
            flush=True,
        )
        for store in args.stores:
            for run, n in enumerate(args.sizes):
                results[store].append(run_size(store, run, n, etcd, args))
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
