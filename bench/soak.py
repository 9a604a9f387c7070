"""`python -m bench.soak --minutes 10`: two nodes of the udp backend with a pod each, one TCP stream (iperf3) and a
ping every 10 ms through them for the whole run. Every --interval seconds: each daemon's resident memory, open file
descriptors and threads, the packets its pump moved, and the pings lost so far; at the end the growth from the first
sample (after a warm-up) to the last.

    .venv/bin/python -m bench.soak --minutes 10
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

from testbed.cluster import scrape_metrics

from .harness import rss_mib, two_pod_cluster

HEALTH_PORT = 8471
NODE = f"udp@--healthz-port={HEALTH_PORT}@--healthz-ip=127.0.0.1"


def sample(bed) -> list[dict]:
    rows = []
    for host in bed.hosts:
        pid = host.process.pid
        metrics = scrape_metrics(host.ns, HEALTH_PORT)
        rows.append(
            {
                "rss_mib": rss_mib(pid),
                "fds": len(os.listdir(f"/proc/{pid}/fd")),
                "threads": len(os.listdir(f"/proc/{pid}/task")),
                "packets": metrics.get('flannel_udp_packets_total{stage="udp_received"}', 0)
                + metrics.get('flannel_udp_packets_total{stage="udp_sent"}', 0),
                "alive": host.process.poll() is None,
            }
        )
    return rows


def pings_so_far(path: str) -> tuple[int, int]:
    """(sent, answered) from ping's output so far: its sequence numbers and reply lines."""
    with open(path) as f:
        text = f.read()
    sequences = [int(m) for m in re.findall(r"icmp_seq=(\d+)", text)]
    return (max(sequences) if sequences else 0), len(re.findall(r"bytes from", text))


def start_load(bed, a, b, seconds: float, log: str):
    """One TCP stream from pod a to pod b and a ping every 10 ms beside it, both for `seconds`, the ping into log."""
    server = bed.popen(b.ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    duration = f"{seconds:.0f}"
    client = bed.popen(
        a.ns,
        "iperf3",
        "-c",
        str(b.address),
        "-t",
        duration,
        "-J",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    with open(log, "w") as out:
        ping = bed.popen(
            a.ns, "ping", "-i", "0.01", "-W", "1", "-w", duration, str(b.address), stdout=out, stderr=subprocess.STDOUT
        )
    return server, client, ping


def print_row(elapsed: float, rows: list[dict], log: str) -> None:
    sent, answered = pings_so_far(log)
    print(
        f"{elapsed:6.0f} "
        + "".join(f"{r['rss_mib']:14.1f}{r['fds']:6d}{r['threads']:5d}{r['packets'] / 1e6:8.2f}" for r in rows)
        + f"{sent:10d}{sent - answered:7d}",
        flush=True,
    )


def sample_until(bed, seconds: float, interval: float, log: str) -> tuple[list[dict], list[dict]]:
    """A row every interval until seconds have passed or a daemon died: (the first samples, the last)."""
    start = time.monotonic()
    first = rows = sample(bed)
    print(
        f"{'t s':>6} "
        + "".join(f"{h.name + ' RSS MiB':>14}{'fds':>6}{'thr':>5}{'Mpkts':>8}" for h in bed.hosts)
        + f"{'pings':>10}{'lost':>7}",
        flush=True,
    )
    while True:
        elapsed = time.monotonic() - start
        print_row(elapsed, rows, log)
        if elapsed >= seconds or not all(r["alive"] for r in rows):
            return first, rows
        time.sleep(min(interval, max(seconds - elapsed, 0.1)))
        rows = sample(bed)


def print_growth(bed, minutes: float, first: list[dict], last_rows: list[dict], log: str, iperf_json: str) -> None:
    sent, answered = pings_so_far(log)
    moved = re.search(r'"sum_received":\s*{[^}]*"bytes":\s*(\d+)', iperf_json)
    print(
        f"\nafter {minutes:g} min: "
        + "; ".join(
            f"{h.name}: RSS {last['rss_mib'] - begin['rss_mib']:+.1f} MiB, "
            f"fds {last['fds'] - begin['fds']:+d}, "
            f"threads {last['threads'] - begin['threads']:+d}, {'alive' if last['alive'] else 'DEAD'}"
            for h, begin, last in zip(bed.hosts, first, last_rows, strict=True)
        )
    )
    print(f"pings: {sent} sent, {sent - answered} lost; TCP moved {int(moved.group(1)) / 1e9 if moved else 0:.1f} GB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval", type=float, default=30, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=10, help="seconds before the first sample")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with two_pod_cluster(NODE) as (bed, a, b):
            log = os.path.join(bed.workdir, "soak-ping.log")
            server, client, ping = start_load(bed, a, b, seconds + args.warmup, log)
            time.sleep(args.warmup)
            first, rows = sample_until(bed, seconds, args.interval, log)
            ping.wait(60)
            result = client.communicate(timeout=60)[0]
            server.wait(10)
            print_growth(bed, args.minutes, first, rows, log, result)
            return 0 if all(r["alive"] for r in rows) else 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything built was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
