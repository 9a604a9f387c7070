"""The wireguard backend on hostile input: datagrams of any kind through its real receive path (a WgPump on a
loopback socket, its TUN a socketpair) and on into its handshake state machine (the control plane of
flannel_udp/wireguard/device.py, which answers from a loopback socket), and handshake messages that carry a valid
mac1, so the fuzzer gets past the cheap check into the Noise code.

The first byte picks the path: even, the bytes are one datagram to the pump; odd, they become a handshake message of
the type and size their second byte says (mac1 stamped for our key) handed straight to the state machine.

Oracle: nothing but a HandshakeError escapes; no forged datagram ever reaches the TUN (only a peer with the keypair's
keys can write into it); every datagram the pump receives is counted once (a handshake message, a keepalive, a packet
written, or a drop under a reason); the capture's decoder calls a message well formed exactly when its size fits."""

from __future__ import annotations

import ipaddress
import socket

from _fastpath.routes import RouteTable
from _fastpath.wg import WgPump, WgState
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flannel_udp.wireguard import messages, noise
from flannel_udp.wireguard.device import WireguardDevice

OWN, PEER_SUBNET = "10.5.72.0/24", "10.5.1.0/24"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Node:
    def __init__(self) -> None:
        self.tun_app, self.tun_pump = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind(("127.0.0.1", 0))  # the peer's endpoint: handshake answers go here and are read away
        for s in (self.tun_app, self.tun_pump, self.sock, self.sender):
            s.setblocking(False)
        self.routes = RouteTable()
        self.routes.set_route(PEER_SUBNET, "127.0.0.1", self.sender.getsockname()[1])
        self.state = WgState(self.routes)
        self.me = noise.Identity(X25519PrivateKey.generate())
        self.peer = noise.Identity(X25519PrivateKey.generate())
        self.device = WireguardDevice(self.me, bytes(32), self.state, {4: self.sock})
        self.device.set_peer(self.peer.public, self.routes.peer_index(PEER_SUBNET), self.sender.getsockname())
        self.pump = WgPump(self.tun_pump.fileno(), self.sock.fileno(), self.routes, self.state, OWN)

    def drain(self, sock: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sock.recv(1 << 17))
            except BlockingIOError:
                return out

    def datagram(self, data: bytes) -> None:
        try:
            self.sender.sendto(data, self.sock.getsockname())
        except OSError:
            return
        self.pump.on_socket_readable()
        assert self.drain(self.tun_app) == [], "a forged datagram reached the TUN"
        self.device.on_notice()
        self.drain(self.sender)
        c = self.pump.counters()
        handled = c["handshake_messages"] + c["keepalives_received"] + c["tun_written_packets"]
        assert c["udp_received_packets"] == handled + sum(c["drops_udp_to_tun"].values()), c

    def handshake_message(self, data: bytes) -> None:
        kind = (1, 2, 3)[data[0] % 3] if data else 1
        size = messages.SIZES[kind]
        body = bytearray((bytes([kind, 0, 0, 0]) + data[1:] + bytes(size))[:size])
        if kind != noise.COOKIE_REPLY:
            noise.stamp_macs(body, self.me.mac1_key, None)
        assert messages.describe(bytes(body))[1]
        try:
            self.device._on_message(bytes(body), LOOPBACK, self.sender.getsockname()[1], bool(data and data[-1] & 1))
        except noise.HandshakeError:
            pass
        self.drain(self.sender)


NODES: list[Node] = []


def test_one_input(data: bytes) -> None:
    if not NODES:
        NODES.append(Node())
    node = NODES[0]
    if not data:
        return
    summary, valid = messages.describe(data[1:])
    size = messages.SIZES.get(data[1]) if len(data) > 1 else None
    assert not valid or size is None or len(data) - 1 == size, summary
    if data[0] & 1:
        node.handshake_message(data[1:])
    else:
        node.datagram(data[1:])
