"""TUN offloads: cutting super-packets (TSO/USO reads) and gluing TCP segments (coalesced writes), with every checksum
checked by an independent implementation (scapy), and the pump driven through a virtio-header TUN stand-in."""

import socket
import struct

import pytest
from _fastpath.offload import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    NEEDS_CSUM,
    VNET_HEADER_LENGTH,
    internet_checksum,
    split,
)
from _fastpath.pump import Pump
from _fastpath.routes import RouteTable
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, raw
from tun_writes import coalesce

SRC, DST = "10.5.72.5", "10.5.1.9"


def vnet(gso_type=GSO_NONE, gso_size=0, hdr_len=0, flags=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def checksums_valid(packet: bytes) -> bool:
    """scapy recomputes the IP and L4 checksums; the packet is valid when they equal the ones it carries."""
    parsed = IP(packet)
    rebuilt = parsed.copy()
    del rebuilt.chksum
    layer = TCP if parsed.haslayer(TCP) else UDP
    del rebuilt[layer].chksum
    rebuilt = IP(raw(rebuilt))
    return rebuilt.chksum == parsed.chksum and rebuilt[layer].chksum == parsed[layer].chksum


def super_tcp(payload_len, mss, flags="PA", options=None, tos=0, ip_options=None, seq=1000, ip_id=7, salt=0):
    ip = IP(src=SRC, dst=DST, ttl=63, tos=tos, id=ip_id, flags="DF", options=ip_options or [])
    packet = bytearray(
        raw(
            ip
            / TCP(sport=40000, dport=5201, seq=seq, ack=77, flags=flags, options=options or [])
            / bytes((i + salt) % 251 for i in range(payload_len))
        )
    )
    ihl = (packet[0] & 0x0F) * 4
    hlen = ihl + (packet[ihl + 12] >> 4) * 4
    # As the kernel hands it over: the TCP checksum field holds only the pseudo-header sum.
    pseudo = sum(struct.unpack("!4H", packet[12:20])) + 6 + len(packet) - ihl
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    packet[ihl + 16 : ihl + 18] = struct.pack("!H", pseudo)
    return vnet(GSO_TCPV4, mss, hlen, NEEDS_CSUM, ihl, 16) + bytes(packet), hlen


@pytest.mark.parametrize(
    "payload_len, mss, expected_sizes",
    [
        (1432 * 45 + 700, 1432, [1432] * 45 + [700]),  # a 64 KB TSO read with a short last segment
        (1432 * 4, 1432, [1432] * 4),  # exactly on a segment boundary
        (1000 * 64, 1000, [1000] * 64),  # the 64-segment limit of one UDP GSO send
        (10, 1432, [10]),  # one segment only
    ],
)
def test_tcp_super_packet_is_cut_into_valid_standalone_packets(payload_len, mss, expected_sizes):
    read, hlen = super_tcp(payload_len, mss, flags="FPA")
    segments = split(read)
    assert [len(s) - hlen for s in segments] == expected_sizes
    original = IP(read[VNET_HEADER_LENGTH:])
    offset = 0
    for i, seg in enumerate(segments):
        p = IP(seg)
        assert checksums_valid(seg), i
        assert p.len == len(seg) and p.id == (7 + i) & 0xFFFF and p.ttl == 63 and p.flags == "DF"
        assert p[TCP].seq == 1000 + offset and p[TCP].ack == 77
        assert bytes(p[TCP].payload) == bytes(original[TCP].payload)[offset : offset + expected_sizes[i]]
        last = i == len(segments) - 1
        assert (p[TCP].flags == "FPA") if last else (p[TCP].flags == "A")
        offset += expected_sizes[i]


def test_cwr_only_on_the_first_segment_and_ecn_and_options_kept():
    read, _ = super_tcp(3000, 1000, flags="CA", tos=0x02, options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))])
    segments = [IP(s) for s in split(read)]
    assert [int(p[TCP].flags) for p in segments] == [0x90, 0x10, 0x10]  # CWR|ACK, then ACK
    assert all(p.tos == 0x02 and p[TCP].options[-1] == ("Timestamp", (5, 6)) for p in segments)
    assert all(checksums_valid(raw(p)) for p in segments)


def test_ipv4_options_are_carried_into_every_segment():
    read, hlen = super_tcp(2500, 1000, ip_options=[b"\x01\x01\x01\x00"])  # NOPs + EOL: IHL 6
    segments = split(read)
    assert hlen == 24 + 20 and len(segments) == 3
    assert all(IP(s).ihl == 6 and checksums_valid(s) for s in segments)


def test_udp_super_packet_uso_is_cut_with_udp_lengths_and_checksums():
    packet = bytearray(raw(IP(src=SRC, dst=DST, ttl=63) / UDP(sport=1, dport=2) / (bytes(range(256)) * 10)))
    packet[2:4] = struct.pack("!H", len(packet))
    segments = split(vnet(GSO_UDP_L4, 1000, 28, NEEDS_CSUM, 20, 6) + bytes(packet))
    assert [len(s) - 28 for s in segments] == [1000, 1000, 560]
    for s in segments:
        p = IP(s)
        assert p[UDP].len == len(s) - 20 and checksums_valid(s)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_single_packet_with_partial_checksum_is_completed(proto):
    for length in range(0, 40):  # odd and even lengths
        l4 = TCP(sport=1, dport=2, flags="PA") if proto == "tcp" else UDP(sport=1, dport=2)
        good = raw(IP(src=SRC, dst=DST) / l4 / (b"z" * length))
        packet = bytearray(good)
        field = 20 + (16 if proto == "tcp" else 6)
        pseudo = sum(struct.unpack("!4H", packet[12:20])) + (6 if proto == "tcp" else 17) + len(packet) - 20
        while pseudo >> 16:
            pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        packet[field : field + 2] = struct.pack("!H", pseudo)
        assert split(vnet(GSO_NONE, flags=NEEDS_CSUM, csum_start=20, csum_offset=field - 20) + bytes(packet)) == [good]


@pytest.mark.parametrize(
    "read",
    [
        vnet(GSO_TCPV4, 0, 40) + raw(IP(src=SRC, dst=DST) / TCP() / (b"x" * 100)),  # gso_size 0
        vnet(GSO_TCPV4, 1000, 40) + raw(IP(src=SRC, dst=DST) / UDP() / (b"x" * 100)),  # says TCP, is UDP
        vnet(GSO_TCPV4, 1000, 40) + raw(IP(src=SRC, dst=DST) / TCP())[:30],  # truncated TCP header
        vnet(GSO_TCPV4, 1000, 40) + raw(IP(src=SRC, dst=DST) / TCP()),  # no payload to cut
        vnet(7, 1000, 40) + raw(IP(src=SRC, dst=DST) / TCP() / b"x"),  # unknown GSO type
        vnet(GSO_NONE, flags=NEEDS_CSUM, csum_start=60, csum_offset=16) + raw(IP(src=SRC, dst=DST) / TCP()),  # beyond
        b"\x00" * 5,  # shorter than the header
    ],
)
def test_malformed_offload_reads_are_refused(read):
    with pytest.raises(ValueError):
        split(read)


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=10, max_size=400))
def test_hostile_virtio_reads_never_crash(blob):
    try:
        for segment in split(blob):
            assert len(segment) <= 65535
    except ValueError:
        pass


def segments_of(count, size=1000, last=None, flags="A", seq=5000, **ip):
    out = []
    for i in range(count):
        length = last if (last is not None and i == count - 1) else size
        f = flags if i == count - 1 else "A"
        out.append(
            raw(
                IP(src=DST, dst=SRC, ttl=62, flags="DF", **ip)
                / TCP(sport=5201, dport=40000, seq=seq, ack=9, flags=f)
                / (bytes([i]) * length)
            )
        )
        seq += length
    return out


def glued(write):
    """Check one coalesced write as the kernel would take it: virtio header, then a packet whose TCP checksum field
    holds the pseudo-header sum. Returns the packet with its checksum completed."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", write[:VNET_HEADER_LENGTH])
    packet = bytearray(write[VNET_HEADER_LENGTH:])
    assert (flags, gso_type, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV4, 20, 16)
    assert hdr_len == 40 and IP(bytes(packet)).len == len(packet)
    packet[36:38] = struct.pack("!H", internet_checksum(bytes(packet[20:])))  # what the kernel finishes
    assert checksums_valid(bytes(packet))
    return bytes(packet), gso_size


def test_consecutive_segments_become_one_write_with_a_gso_header():
    packets = segments_of(5, last=300, flags="PA")
    writes = coalesce(packets)
    assert len(writes) == 1
    packet, gso_size = glued(writes[0])
    p = IP(packet)
    assert gso_size == 1000 and len(p[TCP].payload) == 4300 and p[TCP].flags == "PA" and p[TCP].seq == 5000
    assert bytes(p[TCP].payload) == b"".join(bytes(IP(x)[TCP].payload) for x in packets)


@pytest.mark.parametrize(
    "name, packets, sizes",
    [
        ("psh ends a run", segments_of(2, flags="PA") + segments_of(2, seq=7000), [2, 2]),
        ("short segment ends a run", segments_of(3, last=10) + segments_of(2, seq=7010), [3, 2]),
        ("sequence gap", segments_of(2) + segments_of(2, seq=9000), [2, 2]),
        (
            "other flow",
            segments_of(2)
            + [
                raw(
                    IP(src=DST, dst=SRC, ttl=62, flags="DF")
                    / TCP(sport=5202, dport=40000, seq=7000, ack=9, flags="A")
                    / (b"x" * 1000)
                )
            ],
            [2, 1],
        ),
        (
            "other ttl",
            segments_of(2)
            + [
                raw(
                    IP(src=DST, dst=SRC, ttl=61, flags="DF")
                    / TCP(sport=5201, dport=40000, seq=7000, ack=9, flags="A")
                    / (b"x" * 1000)
                )
            ],
            [2, 1],
        ),
        (
            "other ack",
            segments_of(2)
            + [
                raw(
                    IP(src=DST, dst=SRC, ttl=62, flags="DF")
                    / TCP(sport=5201, dport=40000, seq=7000, ack=10, flags="A")
                    / (b"x" * 1000)
                )
            ],
            [2, 1],
        ),
        ("other tos (ECN)", segments_of(2) + segments_of(2, seq=7000, tos=3), [2, 2]),
        ("larger after smaller", segments_of(1, size=500) + segments_of(1, seq=5500), [1, 1]),
        ("syn and fin never glued", segments_of(1, flags="S") + segments_of(1, seq=5001, flags="FA"), [1, 1]),
        (
            "ip options",
            [
                raw(IP(src=DST, dst=SRC, options=[b"\x01\x01\x01\x00"]) / TCP(flags="A", seq=s) / (b"x" * 100))
                for s in (1, 101)
            ],
            [1, 1],
        ),
        (
            "fragments",
            [raw(IP(src=DST, dst=SRC, flags="MF") / TCP(flags="A", seq=s) / (b"x" * 100)) for s in (1, 101)],
            [1, 1],
        ),
        ("bare acks", [raw(IP(src=DST, dst=SRC) / TCP(flags="A", seq=1, ack=a)) for a in (1, 2)], [1, 1]),
        ("64 segments at most", segments_of(70, size=900), [64, 6]),
        ("65535 bytes at most", segments_of(50, size=1400), [46, 4]),
    ],
)
def test_coalescing_rules(name, packets, sizes):
    writes = coalesce(packets)
    counts = []
    for write in writes:
        if write[1] == GSO_TCPV4:
            packet, gso_size = glued(write)
            counts.append(-(-len(IP(packet)[TCP].payload) // gso_size))
        else:
            assert write[:VNET_HEADER_LENGTH] == bytes(VNET_HEADER_LENGTH)
            counts.append(1)
    assert counts == sizes, name
    assert sum(len(w) - VNET_HEADER_LENGTH for w in writes) == sum(len(p) for p in packets) - 40 * (
        len(packets) - len(writes)
    )


# -- the pump with a virtio-header TUN -------------------------------------------------------------------------------
@pytest.fixture
def vnet_rig():
    tun_app, tun_pump = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_pump.setblocking(False)
    tun_app.settimeout(1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.2", 0))
    peer.settimeout(1)
    routes = RouteTable()
    routes.set_route("10.5.1.0/24", "127.0.0.2", peer.getsockname()[1])
    pump = Pump(tun_pump.fileno(), sock.fileno(), routes, "10.5.72.0/24", True, gso=True, gro=False, vnet_hdr=True)
    yield pump, tun_app, sock, peer
    for s in (tun_app, tun_pump, sock, peer):
        s.close()


def test_pump_cuts_a_tso_read_into_plain_datagrams(vnet_rig):
    pump, tun_app, sock, peer = vnet_rig
    read, hlen = super_tcp(1432 * 10 + 5, 1432)
    tun_app.send(read)
    pump.on_tun_readable()
    got = [peer.recv(65535) for _ in range(11)]
    assert [len(g) - hlen for g in got] == [1432] * 10 + [5]
    assert all(checksums_valid(g) and IP(g).ttl == 62 for g in got)  # the node's own TTL decrement
    c = pump.counters()
    assert c["tso_reads"] == 1 and c["tso_segments"] == 11 and c["udp_sent_packets"] == 11 and c["gso_sends"] >= 1


def test_pump_sends_every_segment_intact_when_reads_overflow_the_batch(vnet_rig):
    """Segments point into the read buffers until their batch is sent. Here the 64 slots fill up while a super-packet
    is being cut (30 plain reads, then 46 segments), and 31 more reads follow before the next send, the last one
    another super-packet: were the cut buffer handed out again, that read would overwrite the payload of the first
    one's last segments before they leave."""
    pump, tun_app, sock, peer = vnet_rig
    peer.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: room for the whole burst
    tun_app.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE: the stand-in TUN queues every read

    def plain(k):
        packet = raw(IP(src=SRC, dst=DST, ttl=63) / UDP(sport=9, dport=9) / (bytes([k % 256]) * 1400))
        return vnet() + packet, [packet]

    def cut(k):
        read, _ = super_tcp(1432 * 45 + 100, 1432, seq=1000 + k * 100000, ip_id=k * 100, salt=k * 37)
        return read, split(read)

    reads = [plain(k) for k in range(30)] + [cut(1)] + [plain(k) for k in range(100, 130)] + [cut(2), cut(3)]
    expected = []
    for read, packets in reads:
        tun_app.send(read)
        expected += packets
    pump.on_tun_readable()
    got = [peer.recv(65535) for _ in range(len(expected))]
    assert all(checksums_valid(g) for g in got)
    # The pump's only change to each packet: TTL 63 -> 62 (and the header checksum that goes with it).
    assert [bytes(IP(g).payload) for g in got] == [bytes(IP(e).payload) for e in expected]
    assert [IP(g).ttl for g in got] == [62] * len(expected)
    assert pump.counters()["udp_sent_packets"] == len(expected) == 60 + 3 * 46


def test_pump_glues_received_segments_into_one_tun_write(vnet_rig):
    pump, tun_app, sock, peer = vnet_rig
    packets = [
        raw(
            IP(src="10.5.1.7", dst="10.5.72.5", ttl=64, flags="DF")
            / TCP(sport=1, dport=2, seq=100 + 1000 * i, ack=5, flags="A")
            / (b"d" * 1000)
        )
        for i in range(6)
    ]
    for p in packets:
        peer.sendto(p, sock.getsockname())
    pump.on_socket_readable()
    write = tun_app.recv(70000)
    packet, gso_size = glued(write)
    assert gso_size == 1000 and len(IP(packet)[TCP].payload) == 6000 and IP(packet).ttl == 63
    c = pump.counters()
    assert c["coalesced_writes"] == 1 and c["tun_writes"] == 1 and c["tun_written_packets"] == 6


def test_pump_prefixes_a_zero_virtio_header_on_plain_writes_and_icmp(vnet_rig):
    pump, tun_app, sock, peer = vnet_rig
    peer.sendto(raw(IP(src="10.5.1.7", dst="10.5.72.5") / UDP() / b"hi"), sock.getsockname())
    pump.on_socket_readable()
    write = tun_app.recv(70000)
    assert write[:VNET_HEADER_LENGTH] == bytes(VNET_HEADER_LENGTH) and IP(write[VNET_HEADER_LENGTH:])[UDP].load == b"hi"
    tun_app.send(vnet() + raw(IP(src=SRC, dst="10.9.9.9") / UDP()))  # no route: ICMP net-unreachable back
    pump.on_tun_readable()
    icmp = tun_app.recv(70000)
    assert icmp[:VNET_HEADER_LENGTH] == bytes(VNET_HEADER_LENGTH) and IP(icmp[VNET_HEADER_LENGTH:]).proto == 1
    tun_app.send(b"\x00\x07" + bytes(8) + raw(IP(src=SRC, dst=DST) / TCP() / b"x"))  # hostile virtio header
    pump.on_tun_readable()
    assert pump.counters()["drops_tun_to_udp"] == {"no_route": 1, "bad_offload": 1}


def reference_checksum(data: bytes) -> int:
    """RFC 1071 written the slow, obvious way: big-endian 16-bit words, odd byte zero-padded, end-around carries."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 7))
def test_fast_checksum_equals_rfc1071_at_any_length_and_alignment(data, shift):
    buffer = bytes(shift) + data  # the fast path reads unaligned words: try every offset from 8-byte alignment
    assert internet_checksum(memoryview(buffer)[shift:]) == reference_checksum(data)


@pytest.mark.parametrize("length", [0, 1, 2, 31, 32, 33, 63, 64, 65, 1500, 65535])
def test_fast_checksum_carries_with_all_ones_and_all_zeros(length):
    # All 0xFF words make every 64-bit addition carry; all zeros must give 0xFFFF.
    for byte in (b"\xff", b"\x00", b"\x80"):
        assert internet_checksum(byte * length) == reference_checksum(byte * length)
