"""The wireguard backend's pieces without a network: the handshake (noise.py) against itself and the XChaCha
subkey's published vector, the data path (two WgPumps on socketpairs and loopback sockets: sealing, opening, the
replay window, forgeries), the key file, the options, and the capture's message names."""

import ipaddress
import os
import socket
import struct

import pytest
from _fastpath.routes import RouteTable
from _fastpath.wg import WgPump, WgState
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flannel_udp.backend import BackendError
from flannel_udp.backend.wireguard import parse_options
from flannel_udp.backend.wireguard_link import endpoint_family
from flannel_udp.subnet.lease import LeaseAttrs
from flannel_udp.wireguard import keys, messages, noise
from flannel_udp.wireguard.device import Timers

SUBNET_A, SUBNET_B = "10.9.1.0/24", "10.9.2.0/24"


def identity() -> noise.Identity:
    return noise.Identity(X25519PrivateKey.generate())


def handshake(a: noise.Identity, b: noise.Identity, psk: bytes = bytes(32)) -> tuple[noise.Keys, noise.Keys]:
    message, pending = noise.create_initiation(a, b.public, noise.dh(a.private, b.public), 7, None)
    assert noise.mac1_valid(message, b.mac1_key)
    initiation = noise.open_initiation(b, message, lambda key: noise.dh(b.private, key) if key == a.public else None)
    assert initiation.peer_public == a.public
    response, responder = noise.create_response(initiation, psk, 9, None)
    assert noise.mac1_valid(response, a.mac1_key)
    initiator = noise.open_response(a, pending, response, b.public, noise.dh(a.private, b.public), psk)
    return initiator, responder


def test_hchacha20_matches_the_published_vector():
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert noise.hchacha20(key, nonce).hex() == expected


def test_a_handshake_gives_both_sides_matching_keys():
    a, b = identity(), identity()
    initiator, responder = handshake(a, b)
    assert initiator.send == responder.receive and initiator.receive == responder.send
    assert (initiator.local_index, initiator.remote_index, responder.local_index, responder.remote_index) == (
        7,
        9,
        9,
        7,
    )
    assert initiator.initiator and not responder.initiator


def test_a_different_psk_fails_the_response():
    a, b = identity(), identity()
    message, pending = noise.create_initiation(a, b.public, noise.dh(a.private, b.public), 1, None)
    initiation = noise.open_initiation(b, message, lambda key: noise.dh(b.private, key))
    response, _ = noise.create_response(initiation, bytes(32), 2, None)
    with pytest.raises(noise.HandshakeError):
        noise.open_response(a, pending, response, b.public, noise.dh(a.private, b.public), b"\x01" * 32)


def test_initiations_that_must_not_open():
    a, b, stranger = identity(), identity(), identity()
    message, _ = noise.create_initiation(a, b.public, noise.dh(a.private, b.public), 1, None)
    tampered = bytearray(message)
    tampered[50] ^= 1
    with pytest.raises(noise.HandshakeError, match="authentication failed"):
        noise.open_initiation(b, bytes(tampered), lambda key: noise.dh(b.private, key))
    with pytest.raises(noise.HandshakeError, match="unknown peer key"):
        noise.open_initiation(b, message, lambda key: None)
    for_stranger, _ = noise.create_initiation(a, stranger.public, noise.dh(a.private, stranger.public), 1, None)
    assert not noise.mac1_valid(for_stranger, b.mac1_key)


def test_a_cookie_reply_opens_only_with_the_mac1_it_answers():
    a, b = identity(), identity()
    message, pending = noise.create_initiation(a, b.public, noise.dh(a.private, b.public), 1, None)
    checker = noise.CookieChecker(b)
    reply = checker.reply(message, b"\xc6\x12\x00\x01\x6c\xca")
    cookie = noise.open_cookie_reply(reply, b.public, pending.mac1)
    assert cookie == checker.cookie_for(b"\xc6\x12\x00\x01\x6c\xca")
    with pytest.raises(noise.HandshakeError):
        noise.open_cookie_reply(reply, b.public, bytes(16))
    again, _ = noise.create_initiation(a, b.public, noise.dh(a.private, b.public), 2, cookie)
    assert checker.mac2_valid(again, b"\xc6\x12\x00\x01\x6c\xca")
    assert not checker.mac2_valid(again, b"\xc6\x12\x00\x02\x6c\xca")


class Node:
    """A WgPump with a socketpair for its TUN and a loopback UDP socket."""

    def __init__(self, own: str) -> None:
        self.app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun = tun
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        for s in (self.app, self.tun, self.sock):
            s.setblocking(False)
        self.routes = RouteTable()
        self.state = WgState(self.routes)
        self.pump = WgPump(tun.fileno(), self.sock.fileno(), self.routes, self.state, own)
        self.local = 0  # the receiver index of its session, once linked()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def link(self, subnet: str, other: "Node") -> int:
        self.routes.set_route(subnet, "127.0.0.1", other.port)
        index = self.routes.peer_index(subnet)
        self.state.attach(index)
        return index

    def tun_packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.app.recv(65536))
            except BlockingIOError:
                return out


def ipv4(src: str, dst: str, payload: bytes = b"x" * 40) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    words = sum(struct.unpack("!10H", header))
    words = (words & 0xFFFF) + (words >> 16)
    checksum = ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def linked() -> tuple[Node, Node, noise.Keys, noise.Keys]:
    """Two nodes with a session: a the initiator, b the responder; each side's keys (their indices on the nodes)."""
    a, b = Node(SUBNET_A), Node(SUBNET_B)
    index_a, index_b = a.link(SUBNET_B, b), b.link(SUBNET_A, a)
    initiator, responder = handshake(identity(), identity())
    a.local, b.local = a.state.reserve_index(), b.state.reserve_index()
    a.state.install(index_a, a.local, b.local, initiator.send, initiator.receive, True)
    b.state.install(index_b, b.local, a.local, responder.send, responder.receive, False)
    return a, b, initiator, responder


@pytest.fixture
def pair():
    a, b, _, _ = linked()
    return a, b


def capture_sent(a: Node, b: Node, packet: bytes) -> bytes:
    """Send a packet through a; return the datagram b's socket got (left unread by b's pump)."""
    a.app.send(packet)
    a.pump.on_tun_readable()
    return b.sock.recv(65536)


def test_packets_cross_sealed_and_every_forgery_is_dropped_by_reason(pair):
    a, b = pair
    packet = ipv4("10.9.1.5", "10.9.2.7")
    datagram = capture_sent(a, b, packet)
    assert datagram[0] == 4 and len(datagram) == 16 + 64 + 16  # 60 bytes padded to 64, then the tag
    assert packet[20:] not in datagram
    for forged in (datagram, datagram[:20] + bytes([datagram[20] ^ 1]) + datagram[21:], datagram[:30]):
        b.sock.sendto(forged, ("127.0.0.1", b.port))  # the first is the original: it must pass once
    b.sock.sendto(datagram, ("127.0.0.1", b.port))  # replayed
    b.sock.sendto(b"\x04\0\0\0" + os.urandom(60), ("127.0.0.1", b.port))
    b.sock.sendto(b"\x09\0\0\0" + os.urandom(60), ("127.0.0.1", b.port))
    b.sock.sendto(ipv4("10.9.1.5", "10.9.2.7"), ("127.0.0.1", b.port))  # clear text is no message at all
    b.pump.on_socket_readable()
    assert b.tun_packets() == [packet]
    drops = b.pump.counters()["drops_udp_to_tun"]
    assert drops == {"bad_auth": 1, "short": 1, "replay": 1, "unknown_index": 1, "unknown_type": 2}


def test_messages_both_ways_are_the_protocols_chacha20_poly1305_under_each_sides_keys():
    """Checked against another implementation (the cryptography package's): the counter as the nonce's last eight
    bytes, little-endian, no associated data, the plaintext padded to 16 bytes; and what it seals, the pump opens."""
    a, b, initiator, responder = linked()
    for size in (0, 1, 15, 16, 700, 1380):
        packet = ipv4("10.9.1.5", "10.9.2.7", os.urandom(size))
        datagram = capture_sent(a, b, packet)
        receiver, counter = struct.unpack_from("<IQ", datagram, 4)
        assert receiver == b.local
        nonce = bytes(4) + struct.pack("<Q", counter)
        padded = ChaCha20Poly1305(initiator.send).decrypt(nonce, datagram[16:], None)
        assert padded == packet + bytes(-len(packet) % 16)
    reply = ipv4("10.9.2.7", "10.9.1.5", os.urandom(1380))
    sealed = ChaCha20Poly1305(responder.send).encrypt(bytes(12), reply, None)
    b.sock.sendto(struct.pack("<IIQ", 4, a.local, 0) + sealed, ("127.0.0.1", a.port))
    a.pump.on_socket_readable()
    assert a.tun_packets() == [reply]


def test_an_inner_source_outside_the_peers_subnet_is_dropped(pair):
    a, b = pair
    a.routes.set_route("10.9.3.0/24", "127.0.0.1", b.port)  # a's table would send it; b knows 10.9.3/24 is not a's
    datagram = capture_sent(a, b, ipv4("10.9.3.5", "10.9.2.7"))
    b.sock.sendto(datagram, ("127.0.0.1", b.port))
    b.pump.on_socket_readable()
    assert b.tun_packets() == [] and b.pump.counters()["drops_udp_to_tun"] == {"not_allowed": 1}


def test_the_replay_window_takes_reordered_counters_once(pair):
    a, b = pair
    index = a.routes.peer_index(SUBNET_B)
    keepalives = [a.state.keepalive(index) for _ in range(300)]
    for message in reversed(keepalives[:200]):  # 200 behind the newest: still inside the window
        b.sock.sendto(message, ("127.0.0.1", b.port))
    b.pump.on_socket_readable()
    for message in keepalives[:200:50] + keepalives[200:]:
        b.sock.sendto(message, ("127.0.0.1", b.port))
    b.pump.on_socket_readable()
    counters = b.pump.counters()
    assert counters["keepalives_received"] == 300 and counters["drops_udp_to_tun"] == {"replay": 4}


def test_the_responder_sends_only_after_the_initiator_used_the_new_keys(pair):
    a, b = pair
    b.app.send(ipv4("10.9.2.7", "10.9.1.5"))
    b.pump.on_tun_readable()
    assert b.pump.counters()["held_packets"] == 1  # held: its keypair is still "next"
    a.sock.setblocking(False)
    b.sock.sendto(a.state.keepalive(a.routes.peer_index(SUBNET_B)), ("127.0.0.1", b.port))
    b.pump.on_socket_readable()
    ((index, datagram),) = b.state.release_held()
    assert index == b.routes.peer_index(SUBNET_A)
    a.sock.sendto(datagram, ("127.0.0.1", a.port))
    a.pump.on_socket_readable()
    assert a.tun_packets() == [ipv4("10.9.2.7", "10.9.1.5")]


def test_an_authenticated_message_from_elsewhere_moves_the_peer_and_a_forged_one_does_not(pair):
    a, b = pair
    packet = ipv4("10.9.1.5", "10.9.2.7")
    datagram = capture_sent(a, b, packet)
    elsewhere = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    elsewhere.bind(("127.0.0.1", 0))
    elsewhere.settimeout(2)
    index = b.routes.peer_index(SUBNET_A)
    elsewhere.sendto(datagram[:-1] + bytes([datagram[-1] ^ 1]), ("127.0.0.1", b.port))  # tampered: no roaming
    b.pump.on_socket_readable()
    assert b.state.take_roamed() == []
    elsewhere.sendto(datagram, ("127.0.0.1", b.port))
    b.pump.on_socket_readable()
    assert b.tun_packets() == [packet]
    new_port = elsewhere.getsockname()[1]
    assert b.state.take_roamed() == [(index, (ipaddress.IPv4Address("127.0.0.1"), new_port))]
    assert b.state.take_roamed() == []  # reported once
    assert b.state.move_endpoint(index, "127.0.0.1", new_port)
    b.state.settle_roamed(index)
    b.app.send(ipv4("10.9.2.7", "10.9.1.5"))
    b.pump.on_tun_readable()
    assert elsewhere.recv(65536)[0] == 4  # b's next message went to where a now is
    elsewhere.close()


def test_padding_stops_at_the_device_mtu(pair):
    """A full-size packet is sealed without padding past the MTU: the underlay's room is the MTU plus 80 bytes."""
    a, b = pair
    a.state.mtu = 1420
    assert len(capture_sent(a, b, ipv4("10.9.1.5", "10.9.2.7", b"y" * 1400))) == 16 + 1420 + 16
    assert len(capture_sent(a, b, ipv4("10.9.1.5", "10.9.2.7", b"y" * 1390))) == 16 + 1420 + 16  # 1410 -> 1420
    assert len(capture_sent(a, b, ipv4("10.9.1.5", "10.9.2.7", b"y" * 1380))) == 16 + 1408 + 16  # 1400 -> 1408


@pytest.mark.parametrize(
    ("mode", "public_ip", "public_ipv6", "ours", "family"),
    [
        ("auto", "198.18.0.2", "fd00::2", {4: "198.18.0.1", 6: "fd00::1"}, 4),  # a public IPv4 address: IPv4
        ("auto", "10.0.0.2", "2001:db8::2", {4: "10.0.0.1", 6: "2001:db8::1"}, 6),  # private IPv4, public IPv6 both
        ("auto", "10.0.0.2", "fd00::2", {4: "10.0.0.1", 6: "fd00::1"}, 4),  # both private: IPv4
        ("auto", "10.0.0.2", "2001:db8::2", {4: "10.0.0.1", 6: "fd00::1"}, 4),  # our IPv6 private: IPv4
        ("auto", "0.0.0.0", "fd00::2", {6: "fd00::1"}, 6),  # IPv6-only
        ("ipv6", "198.18.0.2", "fd00::2", {4: "198.18.0.1", 6: "fd00::1"}, 6),
        ("ipv6", "198.18.0.2", None, {4: "198.18.0.1", 6: "fd00::1"}, None),  # the peer has no IPv6 address
        ("ipv4", "198.18.0.2", "fd00::2", {4: "198.18.0.1", 6: "fd00::1"}, 4),
    ],
)
def test_a_peer_is_reached_on_the_family_upstreams_modes_pick(mode, public_ip, public_ipv6, ours, family):
    attrs = LeaseAttrs(
        ipaddress.IPv4Address(public_ip), ipaddress.IPv6Address(public_ipv6) if public_ipv6 else None, "wireguard"
    )
    assert endpoint_family(mode, attrs, {f: ipaddress.ip_address(a) for f, a in ours.items()}) == family


def test_the_key_file_is_made_once_private_and_reused(tmp_path):
    path = str(tmp_path / "run" / "wgkey")
    first = keys.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o400
    assert noise.public_bytes(keys.load_or_create(path)) == noise.public_bytes(first)
    with open(tmp_path / "bad", "w") as f:
        f.write("not a key")
    with pytest.raises(keys.WireguardKeyError, match="could not parse private key from file: .* is not base64"):
        keys.load_or_create(str(tmp_path / "bad"))


@pytest.mark.parametrize(
    ("backend", "error"),
    [
        ({"PSK": "short"}, "could not parse psk: PSK is not base64"),
        ({"PSK": "AAAA"}, "could not parse psk: PSK is 3 bytes, a WireGuard key is 32"),
        ({"Mode": "both"}, "no valid Mode configured"),
        ({"ListenPort": "51820"}, "ListenPort must be an integer"),
        ({"ListenPort": 70000}, "ListenPort must be from 1 to 65535"),
        ({"PersistentKeepaliveInterval": -1}, "PersistentKeepaliveInterval must be from 0"),
    ],
)
def test_bad_options_are_named(backend, error):
    with pytest.raises(BackendError, match=error):
        parse_options(backend, 1500)


@pytest.mark.parametrize("value", ["fast", "0", "-1", "inf"])
def test_a_bad_time_scale_is_named(monkeypatch, value):
    monkeypatch.setenv("FLANNEL_UDP_WG_TIME_SCALE", value)
    with pytest.raises(ValueError, match=f"FLANNEL_UDP_WG_TIME_SCALE must be a positive number, got '{value}'"):
        Timers.from_environment()


def test_upstream_defaults():
    options = parse_options({"Type": "wireguard"}, 1450)
    assert (options["port"], options["port6"], options["mtu"], options["keepalive"]) == (51820, 51821, 1450, 0)


def test_capture_names_messages_without_keys():
    a, b = identity(), identity()
    message, _ = noise.create_initiation(a, b.public, noise.dh(a.private, b.public), 0x1234, None)
    assert messages.describe(message) == ("handshake initiation sender 0x00001234", True)
    assert messages.describe(message[:100]) == ("handshake initiation of 100 bytes (a well-formed one has 148)", False)
    transport = struct.pack("<IIQ", 4, 0xABCD, 17) + bytes(48)
    assert messages.describe(transport) == ("transport receiver 0x0000abcd counter 17 32 bytes sealed", True)
    assert messages.describe(transport[:32]) == ("transport receiver 0x0000abcd counter 17 keepalive", True)
    assert messages.describe(b"\x45\0\0\x14")[1] is False
