"""CPU per etcd watch message in one node process: the bare gRPC Watch stream against the node's whole lease pipeline
(EtcdRegistry.watch_subnets and a LeaseWatcher, as the daemon runs them), in one run, interleaved.

    .venv/bin/python -m bench.watch_cost --watchers 125 --revisions 400 --repeat 4

A process of `--watchers` watches (each its own gRPC channel, as the simulated nodes of bench.control_plane) follows
`--revisions` single-key writes, one revision each, so every watch gets one message per write, as the churn of
bench.control_plane delivers them. Reported: the reading process's CPU (user + system, gRPC's poller thread included)
per message delivered, the median over the repeats. The bare stream is the floor any Python node on this client pays;
the difference is the lease code's share.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import multiprocessing
import resource
import statistics
import sys

import uvloop

from flannel_udp.subnet.etcd.client import EtcdClient, EtcdOptions
from flannel_udp.subnet.etcd.registry import EtcdRegistry
from flannel_udp.subnet.lease import LeaseAttrs
from flannel_udp.subnet.watcher import LeaseWatcher
from testbed.etcdserver import EtcdCluster

VARIANTS = ("grpc-stream", "lease-pipeline")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def follow(variant: str, endpoints: str, prefix: str, watchers: int, revisions: int, ready, go) -> float:
    """Open the watches, wait for the writer, and return CPU seconds per message until every watch saw every write."""
    seen = [0] * watchers
    messages = 0
    done = asyncio.Event()
    options = EtcdOptions(endpoints=endpoints, prefix=prefix)

    async def stream(i: int) -> None:
        nonlocal messages
        client = EtcdClient(options)
        async for batch in client.watch_prefix_batches(f"{prefix}/subnets".encode(), 1):
            seen[i] += len(batch)
            messages += 1 if batch else 0
            if seen[i] >= revisions:
                break

    async def pipeline(i: int) -> None:
        nonlocal messages
        watcher = LeaseWatcher(ipaddress.ip_network("10.99.0.0/26"))  # not one of the written subnets
        async for result in EtcdRegistry(options).watch_subnets(0):
            watcher.apply(result)
            seen[i] += len(result.events)
            messages += 1
            if seen[i] >= revisions:
                break

    async def one(i: int) -> None:
        await (stream(i) if variant == "grpc-stream" else pipeline(i))
        if all(count >= revisions for count in seen):
            done.set()

    tasks = [asyncio.create_task(one(i)) for i in range(watchers)]
    await asyncio.sleep(2)  # every watch created
    ready.set()
    await asyncio.to_thread(go.wait)
    before = cpu_seconds()
    await asyncio.wait_for(done.wait(), 300)
    used = cpu_seconds() - before
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return used / messages


def reader(results, *args) -> None:
    logging.getLogger("flannel_udp").setLevel(logging.ERROR)  # each client says it is on plain http: once is enough
    results.put(uvloop.run(follow(*args)))


async def write(endpoints: str, prefix: str, revisions: int) -> None:
    client = EtcdClient(EtcdOptions(endpoints=endpoints, prefix=prefix))
    attrs = LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"), None, "udp").to_json().encode()
    subnets = ipaddress.ip_network("10.100.0.0/16").subnets(new_prefix=26)
    for _, subnet in zip(range(revisions), subnets, strict=False):
        await client.put(f"{prefix}/subnets/{subnet.network_address}-26".encode(), attrs)
    await client.close()


def measure(endpoints: str, prefix: str, variant: str, watchers: int, revisions: int) -> float:
    context = multiprocessing.get_context("spawn")
    ready, go, results = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=reader, args=(results, variant, endpoints, prefix, watchers, revisions, ready, go))
    process.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the watching process did not start")
        go.set()
        uvloop.run(write(endpoints, prefix, revisions))
        return results.get(timeout=300)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=125, help="watches in the one reading process")
    parser.add_argument("--revisions", type=int, default=400, help="single-key writes (at most 1,024)")
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args(argv)
    logging.getLogger("flannel_udp").setLevel(logging.ERROR)
    if not 1 <= args.revisions <= 1024 or args.watchers < 1 or args.repeat < 1:
        parser.error("--revisions from 1 to 1024, --watchers and --repeat at least 1")
    figures: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with EtcdCluster() as etcd:
        for run in range(args.repeat):
            for variant in VARIANTS:  # interleaved: this machine's noise hits both alike
                prefix = f"/watch-cost-{run}-{variant}/network"  # a fresh history per measurement
                figures[variant].append(measure(etcd.endpoints, prefix, variant, args.watchers, args.revisions))
    floor = statistics.median(figures["grpc-stream"])
    print(f"{args.watchers} watches x {args.revisions} revisions, {args.repeat} runs; CPU per message, µs:")
    for variant in VARIANTS:
        median = statistics.median(figures[variant])
        runs = ", ".join(f"{1e6 * x:.1f}" for x in figures[variant])
        print(f"  {variant:15} median {1e6 * median:6.1f}  ({median / floor:.2f}x the bare stream)  runs: {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
