"""The udp data plane on hostile input, through its real path: bytes a pod writes into the TUN (with and without a
virtio header, so TSO/USO super-packets and their cutting) and UDP datagrams from a peer (checks, TTL, TCP coalescing
into one TUN write). The pump runs on a socketpair standing in for the TUN and on loopback UDP sockets.

Oracle: nothing crashes; every datagram sent to the peer and every packet written into the TUN is a well-formed IPv4
packet (length, header checksum; for segments cut from a super-packet the TCP/UDP checksum too); the inbound counters
add up (every datagram received is written or dropped under a reason); a packet reaches the TUN only from the peer's
subnet to ours."""
from __future__ import annotations

import socket
import struct

from _fastpath.pump import Pump
from _fastpath.routes import RouteTable

from .ipv4 import check_header, check_l4_checksum, within

OWN, PEER_SUBNET = "10.5.72.0/24", "10.5.1.0/24"
VNET = 10  # struct virtio_net_hdr
GSO_NONE, GSO_TCPV4, GSO_UDP_L4 = 0, 1, 5


class Side:
    """One pump with its TUN stand-in, its UDP socket and a peer that sends to it and receives from it."""

    def __init__(self, vnet_hdr: bool) -> None:
        self.vnet_hdr = vnet_hdr
        self.tun_app, self.tun_pump = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        for s in (self.tun_app, self.tun_pump, self.sock, self.peer):
            s.setblocking(False)
        for s in (self.sock, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.routes = RouteTable()
        self.routes.set_route(PEER_SUBNET, "127.0.0.1", self.peer.getsockname()[1])
        self.pump = Pump(self.tun_pump.fileno(), self.sock.fileno(), self.routes, OWN, True, gso=vnet_hdr,
                         vnet_hdr=vnet_hdr)

    def drain(self, sock: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sock.recv(1 << 17))
            except BlockingIOError:
                return out

    def outbound(self, data: bytes) -> None:
        try:
            self.tun_app.send(data)
        except OSError:
            return  # larger than a socketpair datagram may be: not an input the TUN could give either
        gso_type = data[1] if self.vnet_hdr and len(data) > 1 else GSO_NONE
        self.pump.on_tun_readable()
        for datagram in self.drain(self.peer):
            ihl = check_header(datagram, "datagram to the peer")
            if gso_type != GSO_NONE:
                check_l4_checksum(datagram, ihl, "segment cut from a super-packet")
        self.check_tun_writes()

    def inbound(self, data: bytes) -> None:
        try:
            self.peer.sendto(data, self.sock.getsockname())
        except OSError:
            return
        self.pump.on_socket_readable()
        self.check_tun_writes()
        c = self.pump.counters()
        dropped = sum(c["drops_udp_to_tun"].values())
        assert c["udp_received_packets"] == c["tun_written_packets"] + dropped, c

    def check_tun_writes(self) -> None:
        for written in self.drain(self.tun_app):
            packet = written[VNET:] if self.vnet_hdr else written
            ihl = check_header(packet, "packet written into the TUN")
            if packet[9] == 1 and packet[ihl] == 3:
                continue  # our own ICMP net-unreachable towards a local sender
            assert within(packet[12:16], PEER_SUBNET) and within(packet[16:20], OWN), "a packet outside the leases"
            if self.vnet_hdr and written[1] == GSO_TCPV4:
                mss = struct.unpack("<H", written[4:6])[0]
                assert 0 < mss < len(packet), f"coalesced write with gso_size {mss}"


SIDES: list[Side] = []


def test_one_input(data: bytes) -> None:
    if not SIDES:
        SIDES.extend((Side(vnet_hdr=False), Side(vnet_hdr=True)))
    if len(data) < 1:
        return
    side = SIDES[data[0] & 1]
    (side.inbound if data[0] & 2 else side.outbound)(data[1:])
