"""`python -m bench.latency`: round trips through each backend, run as users run it, side by side in one run.

Per backend a fresh 2-host cluster with a pod on each (upstream's flanneld on a real etcd for `upstream-*`; the
reference C tunnel of ../shared/reference for `limit-c`, and `limit-c@rt=10` runs it at real-time priority 10), then:
  idle     ping every 5 ms (after a warm-up), percentiles of the round trip
  loaded   the same ping while one TCP stream (iperf3) runs between the same pods
  rr       request/response: sockperf TCP ping-pong with 64-byte messages as fast as it goes (transactions per
           second = completed round trips per second; percentiles of the round trip)
Percentiles p50/p99/p99.9 in ms, and each backend as a ratio to the first one given (kernel vxlan by default).

    .venv/bin/python -m bench.latency --backends vxlan,udp,upstream-udp --count 2000 --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import time

from testbed.cluster import Testbed, in_ns, wait_for

from .compare import setup_limit_c
from .harness import check_backends, two_pod_cluster

RR_PORT = 11111


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"p50": None, "p99": None, "p999": None, "n": 0}
    s = sorted(samples)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(len(s) * q))]

    return {"p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "n": len(s)}


def ping_rtts(bed: Testbed, client, server, count: int, interval: float = 0.005) -> list[float]:
    out = in_ns(
        client.ns,
        "ping",
        "-i",
        str(interval),
        "-c",
        str(count),
        "-W",
        "1",
        str(server.address),
        check=False,
        timeout=count * interval * 4 + 20,
    ).stdout
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


def loaded_rtts(bed: Testbed, client, server, count: int) -> list[float]:
    """Ping while one TCP stream runs between the same pods, from before the first ping until after the last."""
    seconds = count * 0.005 + 3
    srv = bed.popen(server.ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    cli = bed.popen(
        client.ns,
        "iperf3",
        "-c",
        str(server.address),
        "-t",
        f"{seconds:g}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # the stream is at full speed
    try:
        return ping_rtts(bed, client, server, count)
    finally:
        for process in (cli, srv):
            try:
                process.wait(seconds + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def request_response(bed: Testbed, client, server, seconds: float) -> dict:
    """sockperf TCP ping-pong, 64-byte messages, closed loop at full speed."""
    srv = bed.popen(
        server.ns,
        "sockperf",
        "sr",
        "--tcp",
        "-i",
        str(server.address),
        "-p",
        str(RR_PORT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        out = in_ns(
            client.ns,
            "sockperf",
            "pp",
            "--tcp",
            "-i",
            str(server.address),
            "-p",
            str(RR_PORT),
            "-m",
            "64",
            "--mps=max",
            "-t",
            f"{seconds:g}",
            check=False,
            timeout=seconds + 30,
        ).stdout
    finally:
        srv.kill()
        srv.wait()
    figures = {}
    for name, key in (("50.000", "p50"), ("99.000", "p99"), ("99.900", "p999")):
        m = re.search(rf"percentile {re.escape(name)} =\s+([\d.]+)", out)
        figures[key] = float(m.group(1)) / 1000 if m else None  # usec -> ms
    m = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)", out)
    figures["tps"] = int(m.group(3)) / float(m.group(1)) if m else None
    return figures


def limit_c_priority(backend: str) -> int | None:
    """The real-time priority of a `limit-c[@rt=N]` backend (0: ordinary scheduling); None for any other backend."""
    name, *flags = backend.split("@")
    if name != "limit-c":
        return None
    if not flags:
        return 0
    value = flags[0].removeprefix("rt=")
    if len(flags) > 1 or value == flags[0] or not value.isdigit() or not 1 <= int(value) <= 99:
        raise SystemExit(f"bench.latency: {backend!r}: limit-c takes one @rt=PRIORITY, 1..99")
    return int(value)


@contextlib.contextmanager
def cluster(backend: str):
    """(testbed, pod a, pod b) for one backend: flanneld's (two_pod_cluster) or the reference C tunnel's."""
    priority = limit_c_priority(backend)
    if priority is None:
        with two_pod_cluster(backend) as pods:
            yield pods
        return
    with Testbed(hosts=2) as bed:
        bed.set_underlay_offloads(True)
        setup_limit_c(bed, priority)
        a, b = (bed.add_pod(h) for h in bed.hosts)
        if not wait_for(lambda: bed.ping(a.ns, b.address, timeout=0.5), 5):
            raise RuntimeError(f"{backend}: pods cannot reach each other")
        yield bed, a, b


def measure(backend: str, count: int, rr_seconds: float) -> dict:
    with cluster(backend) as (bed, a, b):
        ping_rtts(bed, a, b, 100)  # warm-up: neighbours, routes, caches
        return {
            "idle": percentiles(ping_rtts(bed, a, b, count)),
            "loaded": percentiles(loaded_rtts(bed, a, b, count)),
            "rr": request_response(bed, a, b, rr_seconds),
        }


def median_of(runs: list[dict], section: str, key: str):
    values = [r[section][key] for r in runs if r[section].get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="vxlan,udp,upstream-udp", help="comma list (first = the ratio base)")
    parser.add_argument("--count", type=int, default=2000, help="pings per percentile set (every 5 ms)")
    parser.add_argument("--rr-seconds", type=float, default=5, help="length of the request/response test")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (backends interleaved); medians reported")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if not backends:
        raise SystemExit(f"{parser.prog}: no backend given")
    # A mistyped backend or variant fails in one line before any cluster is built.
    check_backends(parser.prog, [b for b in backends if limit_c_priority(b) is None])
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    runs: dict = {b: [] for b in backends}
    try:
        for repetition in range(args.repeat):
            for backend in backends:
                print(f"  .. repetition {repetition + 1}/{args.repeat}: {backend}", file=sys.stderr, flush=True)
                runs[backend].append(measure(backend, args.count, args.rr_seconds))
    except KeyboardInterrupt:
        print("\ninterrupted; everything built was removed", file=sys.stderr)
        return 130
    base = backends[0]
    rows = [
        ("idle", "p50"),
        ("idle", "p99"),
        ("idle", "p999"),
        ("loaded", "p50"),
        ("loaded", "p99"),
        ("loaded", "p999"),
        ("rr", "p50"),
        ("rr", "p99"),
        ("rr", "p999"),
        ("rr", "tps"),
    ]
    print(f"{'figure':16}" + "".join(f"{b:>24}" for b in backends))
    for section, key in rows:
        unit = "/s" if key == "tps" else " ms"
        cells = []
        for backend in backends:
            value, ref = median_of(runs[backend], section, key), median_of(runs[base], section, key)
            if value is None:
                cells.append(f"{'-':>24}")
                continue
            ratio = f" ({value / ref:.2f}x)" if ref else ""
            cells.append(f"{(f'{value:.0f}' if key == 'tps' else f'{value:.3f}') + ratio:>24}")
        print(f"{section + ' ' + key + unit:16}" + "".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
