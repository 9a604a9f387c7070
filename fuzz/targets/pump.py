"""The udp data plane on hostile input, through its real path: bytes a pod writes into the TUN (with and without a
virtio header, so TSO/USO super-packets and their cutting) and UDP datagrams from a peer (checks, TTL, TCP coalescing
into one TUN write). The pump runs on a socketpair standing in for the TUN and on loopback UDP sockets.

Two of the four pumps are dual stack (an IPv6 subnet each, the peer's IPv6 subnet routed over the IPv4 loopback).

Oracle: nothing crashes; every datagram sent to the peer and every packet written into the TUN is a well-formed IPv4
or (dual stack) IPv6 packet (length, IPv4 header checksum, IPv6 payload length and hop limit; for segments cut from a
super-packet the TCP/UDP checksum too); the inbound counters add up (every datagram received is written or dropped
under a reason); a packet reaches the TUN only from the peer's subnet to ours, per family."""

from __future__ import annotations

import socket
import struct

from _fastpath.pump import Pump
from _fastpath.routes import RouteTable

from .ipv4 import check_header, check_l4_checksum, within
from .ipv6 import check_header6, check_l4_checksum6, within6

OWN, PEER_SUBNET = "10.5.72.0/24", "10.5.1.0/24"
OWN6, PEER_SUBNET6 = "fd00:5:0:48::/64", "fd00:5:0:1::/64"
VNET = 10  # struct virtio_net_hdr
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5


class Side:
    """One pump with its TUN stand-in, its UDP socket and a peer that sends to it and receives from it."""

    def __init__(self, vnet_hdr: bool, dual: bool) -> None:
        self.vnet_hdr = vnet_hdr
        self.dual = dual
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
        if dual:
            self.routes.set_route(PEER_SUBNET6, "127.0.0.1", self.peer.getsockname()[1])
        self.pump = Pump(
            self.tun_pump.fileno(),
            self.sock.fileno(),
            self.routes,
            OWN,
            True,
            gso=vnet_hdr,
            vnet_hdr=vnet_hdr,
            own_subnet6=OWN6 if dual else None,
        )

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
            if self.dual and datagram and datagram[0] >> 4 == 6:
                check_header6(datagram, "IPv6 datagram to the peer")
                if gso_type != GSO_NONE:
                    check_l4_checksum6(datagram, "IPv6 segment cut from a super-packet")
                continue
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
            if self.dual and packet and packet[0] >> 4 == 6:
                check_header6(packet, "IPv6 packet written into the TUN")
                if packet[6] == 58 and packet[40] == 1:
                    continue  # our own ICMPv6 no-route towards a local sender
                assert within6(packet[8:24], PEER_SUBNET6) and within6(packet[24:40], OWN6), "IPv6 outside the leases"
                self.check_gso_size(written, packet)
                continue
            ihl = check_header(packet, "packet written into the TUN")
            if packet[9] == 1 and packet[ihl] == 3:
                continue  # our own ICMP net-unreachable towards a local sender
            assert within(packet[12:16], PEER_SUBNET) and within(packet[16:20], OWN), "a packet outside the leases"
            self.check_gso_size(written, packet)

    def check_gso_size(self, written: bytes, packet: bytes) -> None:
        if self.vnet_hdr and written[1] in (GSO_TCPV4, GSO_TCPV6):
            mss = struct.unpack("<H", written[4:6])[0]
            assert 0 < mss < len(packet), f"coalesced write with gso_size {mss}"


SIDES: list[Side] = []


def test_one_input(data: bytes) -> None:
    if not SIDES:
        SIDES.extend(Side(vnet_hdr=bool(i & 1), dual=bool(i & 2)) for i in range(4))
    if len(data) < 1:
        return
    side = SIDES[(data[0] & 1) | ((data[0] >> 1) & 2)]  # bit 0: virtio header, bit 1: direction, bit 2: dual stack
    (side.inbound if data[0] & 2 else side.outbound)(data[1:])
