"""The fast path's IPv6 side: route table of both families, structural checks and verdicts, hop limit, ICMPv6
no-route, TSO6 split and TCPv6 coalescing, with checksums checked by scapy over the IPv6 pseudo-header."""

import ipaddress
import struct

import pytest
from _fastpath.offload import GSO_TCPV6, GSO_UDP_L4, NEEDS_CSUM, VNET_HEADER_LENGTH, split
from _fastpath.routes import RouteTable
from scapy.all import (
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    raw,
)
from tun_writes import coalesce

from _fastpath import packet

OWN4, OWN6 = "10.5.72.0/24", "fd00:5:0:48::/64"
PEER4, PEER6 = "198.18.0.2", "fd00:198:18::2"
SRC, DST = "fd00:5:0:48::5", "fd00:5:0:1::9"


@pytest.fixture
def table():
    t = RouteTable()
    t.set_route("10.5.1.0/24", PEER4, 8285)
    t.set_route("fd00:5:0:1::/64", PEER6, 8285)
    t.set_route("fd00:5:0:2::/64", PEER4, 8285)  # a peer without an IPv6 underlay: IPv6 over IPv4
    return t


def v6(src="fd00:5:0:1::7", dst="fd00:5:0:48::5", hlim=64, *extensions) -> bytes:
    layers = IPv6(src=src, dst=dst, hlim=hlim)
    for extension in extensions:
        layers = layers / extension
    return raw(layers / TCP(dport=80) / b"payload")


def test_routes_of_both_families_and_peers_of_both_families():
    t = RouteTable()
    t.set_route("fd00::/56", PEER6, 8285)
    t.set_route("fd00:0:0:1::/64", "fd00:198:18::3", 8285)  # longest prefix wins
    t.set_route("10.0.0.0/8", PEER4, 8285)
    assert t.lookup_peer("fd00::1:0:0:0:9") == (ipaddress.ip_address("fd00:198:18::3"), 8285)
    assert t.lookup_peer("fd00:0:0:2::9") == (ipaddress.ip_address(PEER6), 8285)
    assert t.lookup_peer("10.1.2.3") == (ipaddress.ip_address(PEER4), 8285)
    assert t.lookup_peer("fd01::1") is None and t.lookup_peer("11.0.0.1") is None
    assert sorted(map(str, (n for n, _, _ in t.entries()))) == ["10.0.0.0/8", "fd00:0:0:1::/64", "fd00::/56"]
    assert set(t.peer_stats()) == {PEER6, "fd00:198:18::3", PEER4}
    assert t.delete_route("fd00:0:0:1::/64") and not t.delete_route("fd00:0:0:1::/64")
    assert t.lookup_peer("fd00:0:0:1::9") == (ipaddress.ip_address(PEER6), 8285)
    assert set(t.peer_stats()) == {PEER6, PEER4}  # the unused peer is gone


def test_many_ipv6_routes_survive_growth():
    t = RouteTable()
    for i in range(2000):
        t.set_route(f"fd00:0:{i >> 8:x}:{i & 0xFF:x}00::/56", f"fd00:198:18::{i % 300 + 1:x}", 8285)
    assert len(t) == 2000
    for i in range(0, 2000, 7):
        assert t.lookup_peer(f"fd00:0:{i >> 8:x}:{i & 0xFF:x}42::1")[0] == ipaddress.ip_address(
            f"fd00:198:18::{i % 300 + 1:x}"
        )


@pytest.mark.parametrize(
    "data, sender, verdict",
    [
        (v6(), PEER6, "ok"),
        (v6(src="fd00:5:0:2::7"), PEER4, "ok"),  # IPv6 over the IPv4 underlay
        (v6(src="fd00:5:0:2::7"), PEER6, "spoofed_source"),  # that subnet's peer is the IPv4 address
        (v6(src="fd00:5:0:99::7"), PEER6, "spoofed_source"),
        (v6(dst="fd00:5:0:1::5"), PEER6, "not_local"),
        (v6(), "fd00:198:18::66", "unknown_peer"),
        (v6(hlim=1), PEER6, "ttl_expired"),
        (v6(hlim=0), PEER6, "ttl_expired"),
        (v6()[:39], PEER6, "short"),
        (v6()[:-1], PEER6, "bad_length"),  # payload length says one byte more
        (
            v6(
                "fd00:5:0:1::7",
                "fd00:5:0:48::5",
                64,
                IPv6ExtHdrHopByHop(),
                IPv6ExtHdrDestOpt(),
                IPv6ExtHdrRouting(),
                IPv6ExtHdrFragment(),
            ),
            PEER6,
            "ok",
        ),  # a valid chain is forwarded
        (v6("fd00:5:0:1::7", "fd00:5:0:48::5", 64, IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop()), PEER6, "bad_header"),
        (
            v6("fd00:5:0:1::7", "fd00:5:0:48::5", 64, *[IPv6ExtHdrDestOpt()] * 9),
            PEER6,
            "bad_header",
        ),  # too long a chain
    ],
)
def test_inbound_ipv6_verdicts(table, data, sender, verdict):
    assert packet.inbound_verdict(data, sender, table, OWN4, own_subnet6=OWN6) == verdict


def test_a_chain_running_past_the_end_is_a_bad_header(table):
    data = bytearray(v6("fd00:5:0:1::7", "fd00:5:0:48::5", 64, IPv6ExtHdrDestOpt()))
    data[41] = 200  # the destination options header claims 1,608 bytes
    assert packet.inbound_verdict(bytes(data), PEER6, table, OWN4, own_subnet6=OWN6) == "bad_header"


def test_ipv6_is_not_ipv4_on_a_node_without_an_ipv6_subnet(table):
    assert packet.inbound_verdict(v6(), PEER6, table, OWN4) == "not_ipv4"
    assert packet.outbound_verdict(v6(SRC, DST), table) == "not_ipv4"


def test_an_ipv6_only_node_carries_nothing_but_ipv6(table):
    v4 = raw(IP(src="10.5.1.7", dst="10.5.72.9") / TCP(dport=80))
    assert packet.outbound_verdict(v4, table, ipv4=False) == "not_ipv6"
    assert packet.outbound_verdict(v6(SRC, DST), table, ipv4=False) == "ok"
    assert packet.inbound_verdict(v4, PEER4, table, None, own_subnet6=OWN6) == "not_ipv6"
    assert packet.inbound_verdict(b"", PEER6, table, None, own_subnet6=OWN6) == "short"
    assert packet.inbound_verdict(v6(), PEER6, table, None, own_subnet6=OWN6) == "ok"
    with pytest.raises(ValueError):
        packet.inbound_verdict(v6(), PEER6, table, None)


def test_outbound_ipv6_verdicts(table):
    assert packet.outbound_verdict(v6(SRC, DST), table, ipv6=True) == "ok"
    assert packet.outbound_verdict(v6(SRC, "fd00:5:0:77::1"), table, ipv6=True) == "no_route"
    assert packet.outbound_verdict(v6(SRC, DST, 1), table, ipv6=True) == "ttl_expired"
    # The kernel's own chatter on flannel0: MLD reports and router solicitations go nowhere, and say so.
    assert packet.outbound_verdict(v6("fe80::1", "ff02::16"), table, ipv6=True) == "not_unicast"
    assert packet.outbound_verdict(v6("fe80::1", "fe80::2"), table, ipv6=True) == "not_unicast"


def test_hop_limit_decrement_touches_only_the_hop_limit():
    original = v6(hlim=64)
    out = packet.with_ttl_decremented(original)
    assert out[7] == 63 and out[:7] == original[:7] and out[8:] == original[8:]
    assert packet.with_ttl_decremented(v6(hlim=1)) is None


def test_icmpv6_no_route_quotes_the_offender_with_a_valid_checksum():
    offender = raw(IPv6(src=SRC, dst="fd00:5:0:77::1") / UDP(dport=53) / (b"x" * 2000))
    reply = IPv6(packet.no_route6(offender, "fd00:5:0:48::"))
    assert (reply.src, reply.dst, reply.nh, reply.plen) == ("fd00:5:0:48::", SRC, 58, 1280 - 40)
    message = reply[ICMPv6DestUnreach]
    assert (message.type, message.code) == (1, 0)
    assert raw(message.payload)[:48] == offender[:48]
    rebuilt = reply.copy()
    del rebuilt[ICMPv6DestUnreach].cksum
    assert IPv6(raw(rebuilt))[ICMPv6DestUnreach].cksum == message.cksum
    small = raw(IPv6(src=SRC, dst="fd00:5:0:77::1") / TCP())
    assert len(packet.no_route6(small, "fd00:5:0:48::")) == 40 + 8 + len(small)


@pytest.mark.parametrize(
    "offender",
    [
        raw(IPv6(src=SRC, dst="fd00:5:0:77::1") / ICMPv6DestUnreach()),  # never an error about an error
        raw(IPv6(src="::", dst="fd00:5:0:77::1") / TCP()),
        raw(IPv6(src="ff02::1", dst="fd00:5:0:77::1") / TCP()),
    ],
)
def test_icmpv6_no_route_suppressed(offender):
    assert packet.no_route6(offender, "fd00:5:0:48::") is None


def vnet(gso_type, gso_size, hdr_len, csum_start, csum_offset):
    return struct.pack("<BBHHHH", NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def l4_checksum_valid(segment: bytes) -> bool:
    parsed = IPv6(segment)
    layer = TCP if parsed.haslayer(TCP) else UDP
    rebuilt = parsed.copy()
    del rebuilt[layer].chksum
    return IPv6(raw(rebuilt))[layer].chksum == parsed[layer].chksum


def super_tcp6(payload_len, mss, seq=1000, flags="PA"):
    data = bytearray(
        raw(
            IPv6(src=SRC, dst=DST, hlim=63)
            / TCP(sport=40000, dport=5201, seq=seq, ack=77, flags=flags)
            / bytes(i % 251 for i in range(payload_len))
        )
    )
    return vnet(GSO_TCPV6, mss, 60, 40, 16) + bytes(data)


def test_tso6_super_packet_is_cut_into_valid_standalone_ipv6_packets():
    segments = split(super_tcp6(1432 * 3 + 100, 1432))
    assert [len(s) - 60 for s in segments] == [1432, 1432, 1432, 100]
    offset = 0
    for i, seg in enumerate(segments):
        p = IPv6(seg)
        assert p.plen == len(seg) - 40 and p.hlim == 63 and l4_checksum_valid(seg), i
        assert p[TCP].seq == 1000 + offset and p[TCP].flags == ("PA" if i == 3 else "A")
        offset += len(seg) - 60


def test_uso_over_ipv6_sets_udp_lengths_and_checksums():
    data = raw(IPv6(src=SRC, dst=DST) / UDP(sport=1, dport=2) / bytes(3000))
    segments = split(vnet(GSO_UDP_L4, 1200, 48, 40, 6) + data)
    assert [IPv6(s)[UDP].len for s in segments] == [1208, 1208, 608]
    assert all(l4_checksum_valid(s) for s in segments)


def test_tso6_with_an_extension_header_or_the_wrong_family_is_refused():
    with_ext = raw(IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt() / TCP() / bytes(3000))
    with pytest.raises(ValueError):
        split(vnet(GSO_TCPV6, 1000, 68, 48, 16) + with_ext)
    with pytest.raises(ValueError):
        split(vnet(1, 1000, 60, 40, 16) + super_tcp6(3000, 1000)[VNET_HEADER_LENGTH:])  # TCPV4 on an IPv6 packet


def test_consecutive_ipv6_segments_become_one_tcpv6_write():
    segments = split(super_tcp6(1000 * 4, 1000))
    (write,) = coalesce(segments)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", write[:VNET_HEADER_LENGTH])
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV6, 60, 1000, 40, 16)
    glued = IPv6(write[VNET_HEADER_LENGTH:])
    assert glued.plen == 20 + 4000 and bytes(glued[TCP].payload) == bytes(i % 251 for i in range(4000))
    assert glued[TCP].flags == "PA"  # the last segment's PSH


def test_ipv6_segments_of_different_flows_or_hop_limits_are_not_glued():
    first = split(super_tcp6(2000, 1000))
    other = bytearray(first[1])
    other[7] = 9  # another hop limit: not the same path
    assert len(coalesce([first[0], bytes(other)])) == 2
