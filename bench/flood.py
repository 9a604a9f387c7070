"""`python -m bench.flood --datagrams 1000000`: hostile datagrams at a node of the udp backend while its pod is pinged
from the other node's pod (every 10 ms, during the flood and for 5 s after). Two sources, each sending --datagrams to
port 8285: a stranger on the underlay (an address that is no lease's PublicIP) and the peer node's own address (which
passes the sender check, so the inner checks are what stops it). The datagrams cycle through: random bytes of random
length, IPv6 and other versions, IHL below 5 or beyond the packet, wrong total lengths, wrong header checksums, TTL 0
and 1, spoofed inner sources, inner destinations outside the node's subnet, fragments, IP options, and 60 KB datagrams.
Reported: whether the node survived, every datagram accounted for on /metrics (received by the pump and counted by
reason, or dropped by the kernel's socket buffer), the drops by reason, and the pings lost during and after.

    .venv/bin/python -m bench.flood --datagrams 1000000
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import signal
import subprocess
import sys
import time

from testbed.cluster import Testbed, in_ns, scrape_metrics, wait_for

from .harness import NETWORK

HEALTH_PORT = 8471
STRANGER = "198.18.0.200"

# Runs in a sender's namespace: argv = target, port, count, own pod subnet, target pod subnet, seed.
GENERATOR = r"""
import ipaddress, os, random, socket, struct, sys
target, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
own = ipaddress.ip_network(sys.argv[4]); dst_net = ipaddress.ip_network(sys.argv[5])
rng = random.Random(int(sys.argv[6]))

def checksum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def ip(src, dst, payload=b"x" * 40, ttl=64, ihl=5, version=4, total=None, flags_frag=0, options=b"", fix=True):
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total or 20 + len(options) + len(payload),
                                rng.randrange(65536), flags_frag, ttl, 17, 0, src.packed, dst.packed) + options)
    if fix: hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    return bytes(hdr) + payload

src = lambda: own[rng.randrange(2, 200)]
dst = lambda: dst_net[rng.randrange(2, 200)]
other = ipaddress.ip_network("10.244.250.0/24")
kinds = [
    lambda: os.urandom(rng.randrange(0, 1500)),
    lambda: bytes([0x60]) + os.urandom(rng.randrange(39, 200)),
    lambda: ip(src(), dst(), version=rng.choice([0, 5, 7, 15])),
    lambda: ip(src(), dst(), ihl=rng.randrange(0, 5)),
    lambda: ip(src(), dst(), ihl=15),
    lambda: ip(src(), dst(), total=rng.randrange(0, 20)),
    lambda: ip(src(), dst(), total=rng.randrange(100, 65535)),
    lambda: ip(src(), dst(), fix=False),
    lambda: ip(src(), dst(), ttl=0),
    lambda: ip(src(), dst(), ttl=1),
    lambda: ip(other[5], dst()),
    lambda: ip(src(), other[9]),
    lambda: ip(src(), dst(), flags_frag=0x2000),
    lambda: ip(src(), dst(), flags_frag=rng.randrange(1, 0x1FFF)),
    lambda: ip(src(), dst(), ihl=6, options=b"\x01\x01\x01\x00"),
    lambda: ip(src(), dst(), payload=os.urandom(60000)),
]
templates = [kind() for _ in range(32) for kind in kinds]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sent = 0
for i in range(count):
    try:
        s.sendto(templates[i % len(templates)], (target, port)); sent += 1
    except OSError:
        pass  # e.g. ENOBUFS: not sent, not counted
print(sent)
"""


def drops_and_received(ns: str) -> tuple[dict[str, float], float]:
    metrics = scrape_metrics(ns, HEALTH_PORT)
    drops = {}
    for name, value in metrics.items():
        m = re.match(r'flannel_udp_dropped_packets_total\{direction="udp_to_tun",reason="([^"]+)"\}', name)
        if m:
            drops[m.group(1)] = value
    return drops, metrics.get('flannel_udp_packets_total{stage="udp_received"}', 0.0)


def lost(output: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    return (int(m.group(1)), int(m.group(1)) - int(m.group(2))) if m else (0, 0)


def flood(stranger, peer, target, datagrams: int) -> dict[str, int]:
    """The hostile datagrams from the stranger, then from the peer's own address: {source: datagrams sent}."""
    own = str(ipaddress.ip_interface(peer.subnet_env()["FLANNEL_SUBNET"]).network)
    theirs = str(ipaddress.ip_interface(target.subnet_env()["FLANNEL_SUBNET"]).network)
    sent = {}
    for name, host in (("stranger", stranger), ("peer", peer)):
        out = in_ns(
            host.ns,
            sys.executable,
            "-c",
            GENERATOR,
            str(target.address),
            "8285",
            str(datagrams),
            own,
            theirs,
            "7",
            timeout=datagrams / 1000 + 120,
        ).stdout
        sent[name] = int(out.strip())
    return sent


def report(sent: dict[str, int], flood_seconds: float, alive: bool, received: float, drops: dict, pings) -> None:
    during, after = pings
    socket_drops = drops.pop("socket_receive_buffer", 0)
    total_sent = sum(sent.values())
    print(
        f"sent {total_sent:,} hostile datagrams in {flood_seconds:.1f} s "
        f"({', '.join(f'{k} {v:,}' for k, v in sent.items())}; {total_sent / flood_seconds / 1e3:.0f} k/s)"
    )
    print(
        f"node: {'alive' if alive else 'DEAD'}; received by the pump {received:,.0f}, dropped by the "
        f"socket buffer {socket_drops:,.0f}: accounted {received + socket_drops:,.0f} of {total_sent:,} "
        f"(a 60 KB datagram travels as IP fragments; one lost on the underlay never reaches the node)"
    )
    print(
        f"delivered into flannel0 (well-formed, from the peer's subnet to ours): {received - sum(drops.values()):,.0f}"
    )
    print(
        "dropped by reason: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]) if v)
    )
    print(f"pings lost: {during[1]} of {during[0]} during the flood (+5 s), {after[1]} of {after[0]} after")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=1_000_000, help="per source")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with Testbed(hosts=3) as bed:
            target, peer, stranger = bed.hosts
            in_ns(stranger.ns, "ip", "addr", "add", f"{STRANGER}/24", "dev", "eth0")
            bed.write_config({"Network": NETWORK, "Backend": {"Type": "udp"}})
            for host in (target, peer):
                bed.start_node(host, f"--healthz-port={HEALTH_PORT}", "--healthz-ip=127.0.0.1")
            a, b = bed.add_pod(peer), bed.add_pod(target)
            if not wait_for(lambda: bed.ping(a.ns, b.address, timeout=0.5), 5):
                raise RuntimeError(f"pods cannot reach each other\n{bed.logs()}")
            drops_before, received_before = drops_and_received(target.ns)
            ping = bed.popen(
                a.ns,
                "ping",
                "-i",
                "0.01",
                "-W",
                "1",
                str(b.address),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            started = time.monotonic()
            sent = flood(stranger, peer, target, args.datagrams)
            flood_seconds = time.monotonic() - started
            time.sleep(5)
            ping.send_signal(signal.SIGINT)
            during = lost(ping.communicate(timeout=10)[0])
            after = lost(in_ns(a.ns, "ping", "-i", "0.01", "-c", "300", "-W", "1", str(b.address), check=False).stdout)
            alive = target.process.poll() is None
            drops_after, received_after = drops_and_received(target.ns)
            drops = {k: drops_after.get(k, 0) - drops_before.get(k, 0) for k in drops_after}
            received = received_after - received_before - during[0] - after[0]  # the ping requests are not hostile
            report(sent, flood_seconds, alive, received, drops, (during, after))
            return 0 if alive else 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything built was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
