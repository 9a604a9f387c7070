"""A lease event is never held up by the underlay: while the pump's sends find the socket buffer full (and wait up to
SEND_WAIT_MS for room), route changes from the control plane still take their turn at once. The underlay is made slow
for real: a token-bucket qdisc on the loopback of a fresh namespace, and a small send buffer."""

import json
import sys

from testbed.cluster import in_ns

SATURATED = r"""
import json, os, socket, threading, time
from _fastpath.pump import Pump
from _fastpath.routes import RouteTable
from scapy.all import IP, UDP, raw

tun_app, tun_pump = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
tun_pump.setblocking(False)
tun_app.setblocking(False)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a few datagrams fill it while the qdisc holds them
sock.bind(("127.0.0.1", 0))
sock.setblocking(False)
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
peer.bind(("127.0.0.1", 0))
routes = RouteTable()
routes.set_route("10.5.1.0/24", "127.0.0.1", peer.getsockname()[1])
pump = Pump(tun_pump.fileno(), sock.fileno(), routes, "10.5.72.0/24", True)
stop = os.eventfd(0, os.EFD_CLOEXEC)
thread = threading.Thread(target=pump.run, args=(stop,), daemon=True)
thread.start()
packet = raw(IP(src="10.5.72.5", dst="10.5.1.9") / UDP() / (b"x" * 1372))
running = True


def feed():  # keep the pump's TUN side full: every round it has a batch to send into the full socket
    while running:
        try:
            tun_app.send(packet)
        except BlockingIOError:
            time.sleep(0.001)


feeder = threading.Thread(target=feed, daemon=True)
feeder.start()
time.sleep(0.5)  # the bucket's burst is spent and the sends wait
slow, changes = 0, 200
for i in range(changes):
    started = time.perf_counter()
    routes.set_route(f"10.6.{i}.0/24", "127.0.0.1", peer.getsockname()[1])
    slow += time.perf_counter() - started > 0.010
    time.sleep(0.002)
running = False
os.eventfd_write(stop, 1)
thread.join(5)
failed = pump.counters()["drops_tun_to_udp"].get("send_failed", 0)
print(json.dumps({"slow": slow, "changes": changes, "send_failed": failed}))
"""


def test_lease_events_are_not_held_up_by_a_full_socket(bed):
    ns = bed.hosts[0].ns
    in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "100kbit", "burst", "3000", "limit", "100000")
    result = json.loads(in_ns(ns, sys.executable, "-c", SATURATED, timeout=60).stdout)
    assert result["send_failed"] > 0, result  # the socket was full: sends waited, then gave up on the rest
    # A change waits at most for the rest of a round's work; held up by a send's wait it would take up to 20 ms.
    assert result["slow"] <= result["changes"] // 20, result
