"""The shared route table under concurrency: packet threads looking up (each a read lock per round of 64 lookups, as a
pump holds it) while lease events change the table (a write lock per change).

    .venv/bin/python -m bench.route_table [--seconds 2] [--routes 1000] [--threads 1,2] [--updates-per-second 0,1000]

Prints lookups per second per thread and in total for each combination, so the cost of sharing one table (the lock's
cache line, and waiting for a writer) shows as the ratio to one thread without updates. Runs in this process only: no
namespace, no traffic."""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import struct
import threading
import time

from _fastpath.drivers import bench_locked_lookups
from _fastpath.routes import RouteTable


def table_of(routes: int) -> tuple[RouteTable, bytes]:
    table = RouteTable()
    subnets = list(ipaddress.ip_network("10.0.0.0/8").subnets(new_prefix=24))[:routes]
    for i, subnet in enumerate(subnets):
        table.set_route(subnet, f"198.18.{i // 250}.{i % 250 + 1}", 8285)
    rng = random.Random(1)
    addresses = b"".join(
        struct.pack("!I", int(rng.choice(subnets).network_address) + rng.randrange(1, 255)) for _ in range(4096)
    )
    return table, addresses


def churn(table: RouteTable, per_second: int, stop: threading.Event) -> int:
    """Lease events: a route set and deleted again, per_second times a second; returns how many were made."""
    made, subnet = 0, ipaddress.ip_network("10.255.0.0/24")
    interval = 1.0 / per_second
    while not stop.is_set():
        table.set_route(subnet, "198.18.99.1", 8285)
        table.delete_route(subnet)
        made += 2
        time.sleep(interval)
    return made


def measure(table: RouteTable, addresses: bytes, threads: int, updates: int, seconds: float) -> tuple[list[float], int]:
    results: list[float] = [0.0] * threads
    stop = threading.Event()
    made = [0]

    def worker(index: int) -> None:
        lookups, _rounds = bench_locked_lookups(table, addresses, seconds)
        results[index] = lookups / seconds

    updater = threading.Thread(target=lambda: made.__setitem__(0, churn(table, updates, stop))) if updates else None
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    if updater is not None:
        updater.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    if updater is not None:
        updater.join()
    return results, made[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.route_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--threads", default=",".join(str(n) for n in sorted({1, min(2, os.cpu_count() or 1)})))
    parser.add_argument("--updates-per-second", default="0,1000")
    args = parser.parse_args(argv)
    table, addresses = table_of(args.routes)
    baseline = None
    print(f"{args.routes} routes, rounds of 64 lookups under the read lock, {args.seconds:g} s each")
    print(f"{'threads':>8} {'updates/s':>10} {'Mlookups/s per thread':>24} {'total':>8} {'x 1 thread':>11}")
    for updates in (int(u) for u in args.updates_per_second.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            rates, made = measure(table, addresses, threads, updates, args.seconds)
            total = sum(rates)
            baseline = baseline or total
            per_thread = " ".join(f"{r / 1e6:.1f}" for r in rates)
            ratio = total / baseline
            print(f"{threads:>8} {made / args.seconds:>10.0f} {per_thread:>24} {total / 1e6:>8.1f} {ratio:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
