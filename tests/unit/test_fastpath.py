"""The compiled data plane: route table, per-packet rules (upstream proxy_amd64.c vectors), and the real pump loop.

The pump is driven through a Unix seqpacket socketpair standing in for the TUN (both deliver one packet per read) and
real UDP sockets on loopback, so these tests exercise the same C code the daemon runs, without root.
"""

import ipaddress
import os
import random
import select
import socket
import struct
import time

import pytest
from _fastpath.drivers import bench_lookups
from _fastpath.pump import Pump
from _fastpath.routes import RouteTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP

from _fastpath import packet

OWN = "10.5.72.0/24"


def ip_packet(src="10.5.1.2", dst="10.5.72.5", ttl=64, **kw) -> bytes:
    return bytes(IP(src=src, dst=dst, ttl=ttl, **kw) / UDP(sport=1000, dport=2000) / b"payload")


# -- route table ---------------------------------------------------------------------------------------------------
def test_longest_prefix_match_and_next_hop_replace():
    t = RouteTable()
    t.set_route("10.5.0.0/16", "198.18.0.3", 8285)
    t.set_route("10.5.1.0/24", "198.18.0.2", 8285)
    t.set_route("0.0.0.0/0", "198.18.0.9", 8285)
    assert t.lookup_peer("10.5.1.7")[0] == ipaddress.IPv4Address("198.18.0.2")
    assert t.lookup_peer("10.5.9.1")[0] == ipaddress.IPv4Address("198.18.0.3")
    assert t.lookup_peer("192.0.2.1")[0] == ipaddress.IPv4Address("198.18.0.9")
    t.set_route("10.5.1.0/24", "198.18.0.4", 8285)  # a peer that changed its public IP
    assert t.lookup_peer("10.5.1.7")[0] == ipaddress.IPv4Address("198.18.0.4")
    assert len(t) == 3 and "198.18.0.2" not in t.peer_stats()
    assert t.delete_route("10.5.1.0/24") and not t.delete_route("10.5.1.0/24")
    assert t.lookup_peer("10.5.1.7")[0] == ipaddress.IPv4Address("198.18.0.3")


def test_many_routes_survive_growth_and_deletion():
    t = RouteTable()
    nets = list(ipaddress.ip_network("10.0.0.0/8").subnets(new_prefix=24))[:10000]
    for i, net in enumerate(nets):
        t.set_route(net, ipaddress.IPv4Address(0xC6120000 + i % 500 + 1), 8285)
    assert len(t) == 10000 and len(t.peer_stats()) == 500
    for net in nets[::2]:
        t.delete_route(net)
    assert len(t) == 5000
    assert t.lookup_peer(nets[0].network_address + 1) is None
    assert t.lookup_peer(nets[1].network_address + 1) is not None
    addresses = b"".join(int(n.network_address + 5).to_bytes(4, "big") for n in nets)
    assert bench_lookups(t, addresses) == 5000


# -- per-packet rules ----------------------------------------------------------------------------------------------
def test_ttl_decrement_changes_only_ttl_and_checksum():
    original = ip_packet(ttl=64)
    out = packet.with_ttl_decremented(original)
    changed = [i for i in range(len(out)) if out[i] != original[i]]
    assert out[8] == 63 and set(changed) <= {8, 10, 11}
    rebuilt = IP(out)
    del rebuilt.chksum
    assert IP(bytes(rebuilt)).chksum == IP(out).chksum


def test_rfc1624_corner_case_feff_becomes_zero():
    pkt = bytearray(ip_packet(ttl=64))
    pkt[10:12] = b"\xfe\xff"
    assert packet.with_ttl_decremented(bytes(pkt))[10:12] == b"\x00\x00"


@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_one_and_zero_are_dropped(ttl):
    assert packet.with_ttl_decremented(ip_packet(ttl=ttl)) is None  # upstream forwards TTL 0 as 255; we drop it


def test_net_unreachable_as_upstream():
    offender = ip_packet(src="10.5.72.9", dst="10.9.9.9")
    reply = IP(packet.net_unreachable(offender, "10.5.72.0"))
    assert reply.src == "10.5.72.0" and reply.dst == "10.5.72.9" and reply.ttl == 8 and reply.id == 0
    assert reply[ICMP].type == 3 and reply[ICMP].code == 0
    assert bytes(reply[ICMP].payload)[:28] == offender[:28]
    check = IP(bytes(reply))
    del check.chksum, check[ICMP].chksum
    rebuilt = IP(bytes(check))
    assert rebuilt.chksum == reply.chksum and rebuilt[ICMP].chksum == reply[ICMP].chksum


def test_net_unreachable_zero_pads_a_short_offender():
    offender = bytes(IP(src="10.5.72.9", dst="10.9.9.9", proto=17))[:20]
    reply = packet.net_unreachable(offender, "10.5.72.0")
    assert reply[-8:] == b"\x00" * 8


@pytest.mark.parametrize(
    "offender",
    [
        bytes(IP(src="10.5.72.9", dst="10.9.9.9") / ICMP()),  # never answer ICMP with ICMP
        bytes(IP(src="10.5.72.9", dst="10.9.9.9", frag=10) / (b"x" * 8)),  # not the first fragment
        bytes(IP(src="10.5.72.9", dst="10.9.9.9", options=b"\x01" * 40) / (b"x" * 8)),  # ihl 15
    ],
)
def test_net_unreachable_suppressed(offender):
    assert packet.net_unreachable(offender, "10.5.72.0") is None


@pytest.fixture
def table():
    t = RouteTable()
    t.set_route("10.5.1.0/24", "198.18.0.2", 8285)
    t.set_route("10.5.2.0/24", "198.18.0.3", 8285)
    return t


@pytest.mark.parametrize(
    "data,sender,verdict",
    [
        (ip_packet(), "198.18.0.2", "ok"),
        (ip_packet()[:19], "198.18.0.2", "short"),
        (b"\x60" + ip_packet()[1:], "198.18.0.2", "not_ipv4"),
        (b"\x44" + ip_packet()[1:], "198.18.0.2", "bad_header"),
        (b"\x4f" + ip_packet()[1:], "198.18.0.2", "bad_header"),
        (ip_packet() + b"junk", "198.18.0.2", "bad_length"),
        (ip_packet()[:10] + b"\x00\x00" + ip_packet()[12:], "198.18.0.2", "bad_checksum"),
        (ip_packet(), "198.18.0.99", "unknown_peer"),
        (ip_packet(src="10.5.2.7"), "198.18.0.2", "spoofed_source"),
        (ip_packet(src="10.7.0.1"), "198.18.0.2", "spoofed_source"),
        (ip_packet(dst="10.5.9.1"), "198.18.0.2", "not_local"),
        (ip_packet(ttl=1), "198.18.0.2", "ttl_expired"),
    ],
)
def test_inbound_verdicts(table, data, sender, verdict):
    assert packet.inbound_verdict(data, sender, table, OWN) == verdict


def test_inbound_source_check_can_be_turned_off(table):
    assert packet.inbound_verdict(ip_packet(src="10.7.0.1"), "203.0.113.1", table, OWN, protect=False) == "ok"
    assert packet.inbound_verdict(b"\x60" + ip_packet()[1:], "198.18.0.2", table, OWN, protect=False) == "not_ipv4"


def test_outbound_verdicts(table):
    assert packet.outbound_verdict(ip_packet(dst="10.5.1.9"), table) == "ok"
    assert packet.outbound_verdict(ip_packet(dst="10.5.9.9"), table) == "no_route"
    assert packet.outbound_verdict(b"\x60" + bytes(39), table) == "not_ipv4"
    assert packet.outbound_verdict(ip_packet(dst="10.5.1.9", ttl=1), table) == "ttl_expired"


def structural_verdict(blob: bytes) -> str:
    """RFC 791's rules for an IPv4 packet of exactly these bytes, read independently of the fast path."""
    if len(blob) < 20:
        return "short"
    if blob[0] >> 4 != 4:
        return "not_ipv4"
    ihl = (blob[0] & 0x0F) * 4
    if ihl < 20 or ihl > len(blob):
        return "bad_header"
    if struct.unpack("!H", blob[2:4])[0] != len(blob):
        return "bad_length"
    total = sum(struct.unpack(f"!{ihl // 2}H", blob[:ihl]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return "ok" if total == 0xFFFF else "bad_checksum"


def expected_verdicts(blob: bytes) -> tuple[str, str]:
    """What a datagram from the peer 198.18.0.2 and the same bytes read from the TUN must give, through
    TABLE_FOR_FUZZ (whose routes the oracle reads from ROUTES_FOR_FUZZ)."""
    inbound = outbound = structural_verdict(blob)
    if inbound == "ok":
        source, destination = ipaddress.IPv4Address(blob[12:16]), ipaddress.IPv4Address(blob[16:20])
        if route_of(source) != (ipaddress.IPv4Address("198.18.0.2"), 8285):
            inbound = "spoofed_source"
        elif destination not in ipaddress.IPv4Network(OWN):
            inbound = "not_local"
        elif blob[8] <= 1:
            inbound = "ttl_expired"
        outbound = "no_route" if route_of(destination) is None else "ttl_expired" if blob[8] <= 1 else "ok"
    return inbound, outbound


def check_rules_on(blob: bytes) -> None:
    table = TABLE_FOR_FUZZ
    inbound, outbound = expected_verdicts(blob)
    assert packet.inbound_verdict(blob, "198.18.0.2", table, OWN) == inbound
    assert packet.outbound_verdict(blob, table) == outbound
    if len(blob) >= 20:
        decremented = packet.with_ttl_decremented(blob)
        if decremented is not None and structural_verdict(blob) == "ok":
            assert structural_verdict(decremented) == "ok" and decremented[8] == blob[8] - 1
        packet.net_unreachable(blob, "10.5.72.0")


def mutated(rng, template: bytes) -> bytes:
    data = bytearray(template)
    for _ in range(rng.randint(0, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data[: rng.randint(0, len(data))]) if rng.random() < 0.3 else bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=120))
def test_hypothesis_packet_rules_never_crash(blob):
    check_rules_on(blob)


def test_fuzz_packet_rules_100k_inputs():
    """100,000 random and mutated packets through every rule: no crash, and the verdict an independent reading of
    the rules expects."""
    rng = random.Random(7)
    template = ip_packet(src="10.5.1.3")
    for _ in range(100_000):
        check_rules_on(rng.randbytes(rng.randint(0, 80)) if rng.random() < 0.3 else mutated(rng, template))


# The routes of the fuzzed table, and the same routes as plain data for the oracle (which never asks the table).
ROUTES_FOR_FUZZ = {ipaddress.ip_network("10.5.1.0/24"): (ipaddress.IPv4Address("198.18.0.2"), 8285)}
TABLE_FOR_FUZZ = RouteTable()
for _network, (_peer, _port) in ROUTES_FOR_FUZZ.items():
    TABLE_FOR_FUZZ.set_route(_network, _peer, _port)


def route_of(address: ipaddress.IPv4Address):
    """The longest prefix of ROUTES_FOR_FUZZ holding the address, read with ipaddress: (peer, port) or None."""
    holding = [network for network in ROUTES_FOR_FUZZ if address in network]
    return ROUTES_FOR_FUZZ[max(holding, key=lambda network: network.prefixlen)] if holding else None


# -- the pump itself -----------------------------------------------------------------------------------------------
class PumpRig:
    """pump <-> fake TUN (socketpair) and pump <-> a peer UDP socket, all on loopback."""

    def __init__(self, protect=True, gso=False, gro=False):
        self.tun_app, self.tun_pump = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun_pump.setblocking(False)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(1)
        self.routes = RouteTable()
        self.routes.set_route("10.5.1.0/24", "127.0.0.1", self.peer.getsockname()[1])
        if gro:
            self.sock.setsockopt(17, 104, 1)  # SOL_UDP, UDP_GRO
        self.pump = Pump(self.tun_pump.fileno(), self.sock.fileno(), self.routes, OWN, protect, gso=gso, gro=gro)
        self.tun_app.settimeout(1)

    def close(self):
        for s in (self.tun_app, self.tun_pump, self.sock, self.peer):
            s.close()


def readable(sock, timeout: float = 2.0) -> None:
    """Until a datagram waits on sock (loopback delivers each during its sendto; this only guards the rest)."""
    assert select.select([sock], [], [], timeout)[0], "nothing arrived"


@pytest.fixture
def rig():
    r = PumpRig()
    yield r
    r.close()


def test_pump_encapsulates_tun_packets_to_the_peer(rig):
    # A Unix datagram queue holds 10 packets (net.unix.max_dgram_qlen), so the pump runs whenever it is full.
    rig.tun_app.setblocking(False)
    for i in range(100):
        try:
            rig.tun_app.send(ip_packet(src="10.5.72.5", dst=f"10.5.1.{i % 200 + 1}", ttl=64))
        except BlockingIOError:
            rig.pump.on_tun_readable()
            rig.tun_app.send(ip_packet(src="10.5.72.5", dst=f"10.5.1.{i % 200 + 1}", ttl=64))
    rig.pump.on_tun_readable()
    received = [rig.peer.recv(65535) for _ in range(100)]
    assert all(IP(d).ttl == 63 and IP(d).dst.startswith("10.5.1.") for d in received)
    c = rig.pump.counters()
    assert c["udp_sent_packets"] == 100 and c["send_batches"] <= 11  # one sendmmsg per queue-full, not per packet
    peer_stats = rig.routes.peer_stats()["127.0.0.1"]
    assert peer_stats[0] == 100 and peer_stats[1] == sum(len(d) for d in received)


def test_pump_gso_sends_runs_that_arrive_as_plain_datagrams():
    r = PumpRig(gso=True)
    try:
        r.tun_app.setblocking(False)
        sizes = [1400] * 9 + [700]  # a run of equal packets and a shorter last one: one GSO message
        for size in sizes:
            r.tun_app.send(bytes(IP(src="10.5.72.5", dst="10.5.1.9") / UDP() / (b"q" * (size - 28))))
        r.pump.on_tun_readable()
        got = [r.peer.recv(65535) for _ in sizes]  # the peer socket has no UDP_GRO: the kernel cuts the run
        assert [len(d) for d in got] == sizes and all(IP(d).ttl == 63 for d in got)
        c = r.pump.counters()
        assert c["gso_sends"] == 1 and c["udp_sent_packets"] == 10
    finally:
        r.close()


def test_pump_gro_receive_splits_runs_into_packets():
    r = PumpRig(gro=True)
    try:
        one = ip_packet(src="10.5.1.2", dst="10.5.72.5")
        run = one * 8
        # Send a GSO run from the peer (UDP_SEGMENT cmsg); with UDP_GRO the pump receives it as one message.
        r.peer.sendmsg([run], [(17, 103, struct.pack("H", len(one)))], 0, r.sock.getsockname())
        readable(r.sock)
        r.pump.on_socket_readable()
        got = [r.tun_app.recv(65535) for _ in range(8)]
        assert all(IP(d).ttl == 63 and len(d) == len(one) for d in got)
        c = r.pump.counters()
        assert c["tun_written_packets"] == 8 and c["gro_receives"] == 1 and c["receive_batches"] == 1
    finally:
        r.close()


def test_pump_answers_unroutable_with_icmp_and_drops_ipv6(rig):
    rig.tun_app.send(ip_packet(src="10.5.72.5", dst="10.9.0.1"))
    rig.tun_app.send(b"\x60" + bytes(47))
    rig.pump.on_tun_readable()
    reply = IP(rig.tun_app.recv(65535))
    assert reply[ICMP].type == 3 and reply.src == "10.5.72.0" and reply.dst == "10.5.72.5"
    drops = rig.pump.counters()["drops_tun_to_udp"]
    assert drops == {"no_route": 1, "not_ipv4": 1}


def test_pump_decapsulates_valid_datagrams_and_counts_hostile_ones(rig):
    pump_addr = rig.sock.getsockname()
    good = ip_packet(src="10.5.1.2", dst="10.5.72.5", ttl=10)
    big = bytes(IP(src="10.5.1.2", dst="10.5.72.5") / UDP() / (b"z" * 9000))  # larger than any MTU: not truncated
    hostile = [
        b"",
        b"\x45",
        b"\x60" + bytes(39),
        ip_packet(src="10.5.1.2")[:30],
        ip_packet(src="10.6.0.1"),
        ip_packet(src="10.5.1.2", dst="10.5.3.3"),
        os.urandom(200),
        ip_packet(src="10.5.1.2", ttl=1),
    ]
    for data in [good, *hostile, big]:
        rig.peer.sendto(data, pump_addr)
    readable(rig.sock)
    rig.pump.on_socket_readable()
    first = IP(rig.tun_app.recv(65535))
    second = rig.tun_app.recv(65535)
    assert first.ttl == 9 and len(second) == len(big)
    c = rig.pump.counters()
    assert c["tun_written_packets"] == 2
    assert sum(c["drops_udp_to_tun"].values()) == len(hostile)
    assert c["drops_udp_to_tun"]["spoofed_source"] == 1 and c["drops_udp_to_tun"]["not_local"] == 1
    assert rig.routes.peer_stats()["127.0.0.1"][2] == 2


def test_pump_drops_datagrams_from_strangers():
    r = PumpRig()
    try:
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.2", 0))
        stranger.sendto(ip_packet(src="10.5.1.2"), r.sock.getsockname())
        r.routes.delete_route("10.5.1.0/24")
        r.peer.sendto(ip_packet(src="10.5.1.2"), r.sock.getsockname())
        readable(r.sock)
        r.pump.on_socket_readable()
        assert r.pump.counters()["drops_udp_to_tun"] == {"unknown_peer": 2}
        stranger.close()
    finally:
        r.close()


def test_pump_survives_100k_hostile_datagrams(rig):
    """100,000 random and mutated datagrams through the real C loop: no crash, every one accounted for."""
    rng = random.Random(1)
    pump_addr = rig.sock.getsockname()
    rig.tun_app.setblocking(False)
    templates = [ip_packet(src="10.5.1.2", dst="10.5.72.5"), ip_packet(src="10.5.1.2", dst="10.5.72.5") * 3]
    sent = 0
    for _ in range(1000):
        for _ in range(100):
            data = rng.randbytes(rng.randint(0, 100)) if rng.random() < 0.3 else mutated(rng, rng.choice(templates))
            rig.peer.sendto(data, pump_addr)
            sent += 1
        rig.pump.on_socket_readable()
        while True:  # keep the fake TUN from filling up
            try:
                rig.tun_app.recv(65535)
            except BlockingIOError:
                break
    deadline = time.time() + 2
    c = rig.pump.counters()
    while c["udp_received_packets"] < sent and time.time() < deadline:
        rig.pump.on_socket_readable()
        c = rig.pump.counters()
    assert c["udp_received_packets"] == sent
    assert c["tun_written_packets"] + sum(c["drops_udp_to_tun"].values()) == sent


def asleep(tid: int, within: float = 2.0, samples: int = 10) -> bool:
    """The thread is sleeping (state S in /proc) in `samples` reads in a row, 10 ms apart, within `within` s: a thread
    that spins stays runnable (R) and never passes."""
    import time

    deadline, row = time.monotonic() + within, 0
    while time.monotonic() < deadline and row < samples:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        row = row + 1 if state == "S" else 0
        time.sleep(0.01)
    return row >= samples


@pytest.mark.parametrize("busy_poll_us", [0, 1000])
def test_pump_thread_moves_a_lone_packet_and_sleeps_when_idle(busy_poll_us):
    """The pump's own loop (run(), as the backend runs it in its thread): a lone packet crosses at once, with or without
    a busy-poll window; once the tunnel is idle the thread sleeps again in poll() (a window that never closed would
    keep it running); and its stop eventfd ends it, also in the middle of a window."""
    import os
    import threading

    rig = PumpRig()
    stop = os.eventfd(0, os.EFD_CLOEXEC)
    thread = threading.Thread(target=rig.pump.run, args=(stop, busy_poll_us), daemon=True)
    thread.start()
    try:
        for i in range(3):
            rig.tun_app.send(ip_packet(src="10.5.72.5", dst=f"10.5.1.{i + 1}", ttl=64))
            assert IP(rig.peer.recv(65535)).dst == f"10.5.1.{i + 1}"
        assert asleep(thread.native_id), "the pump kept running on an idle tunnel"
        rig.tun_app.send(ip_packet(src="10.5.72.5", dst="10.5.1.9", ttl=64))
        rig.peer.recv(65535)
        os.eventfd_write(stop, 1)  # at once: the window opened by that packet is still running
        thread.join(1)
        assert not thread.is_alive()
    finally:
        os.eventfd_write(stop, 1)
        thread.join(1)
        os.close(stop)
        rig.close()
