"""`flannel-udp capture`: see inside the overlay. Decodes the udp backend's datagrams (and vxlan's) on the underlay, the
packets on flannel0, or a pcap file; says per packet what the data plane would do with it, using the fast path's own
checks (_fastpath.packet); writes the inner (or outer) packets to a pcap; prints a summary per flow, peer and verdict.

scapy is imported here only, lazily: the daemon never loads it.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .defaults import LEASE_FILE, UDP_PORT, VXLAN_PORT, WIREGUARD_PORT, WIREGUARD_PORT_V6
from .subnet.registry import StoreError
from .wireguard.messages import describe as describe_wireguard

if TYPE_CHECKING:
    from _fastpath.routes import RouteTable

DLT_RAW = 101
ICMP_TYPES = {0: "echo-reply", 3: "unreachable", 8: "echo-request", 11: "time-exceeded"}
ICMP6_TYPES = {
    1: "unreachable",
    2: "packet-too-big",
    3: "time-exceeded",
    128: "echo-request",
    129: "echo-reply",
    135: "neighbour-solicitation",
    136: "neighbour-advertisement",
}


class CaptureError(RuntimeError):
    """Bad input (interface, file, filter): one line, exit status 1."""


@dataclass
class Record:
    """One captured packet, decoded."""

    time: float
    outer_src: str | None
    outer_dst: str | None
    encapsulation: str  # "udp", "vxlan", "wireguard" or "tun"
    inner: bytes  # empty for WireGuard: its contents are sealed
    verdict: str
    summary: str
    flow: str
    size: int = -1  # bytes counted in the summary: the inner packet's, or a sealed payload's

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.inner)


# -- verdicts: the fast path's own checks -------------------------------------------------------------------------
class Verdicts:
    """What a node would do with a packet, given the leases; without leases, the structural checks only."""

    def __init__(
        self, leases: list, port: int, own_subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    ):
        """own_subnet: the capturing node's primary subnet (IPv4, or IPv6 in an IPv6-only network), if known."""
        from _fastpath.routes import RouteTable

        self.leases = leases
        self.port = port
        own = next((lease for lease in leases if lease.primary == own_subnet), None) if own_subnet else None
        self.own_subnet = own.subnet if own is not None else None
        self.own_subnet6 = own.ipv6_subnet if own is not None else None
        self.own = own
        self.by_public_ip = {str(lease.attrs.public_ip): lease for lease in leases if lease.subnet is not None}
        # Dual stack: a node's IPv6 underlay address names its IPv6 subnet.
        self.by_public_ipv6 = {str(lease.attrs.public_ipv6): lease for lease in leases if lease.attrs.public_ipv6}
        self.empty = RouteTable()
        self.tables: dict[str, RouteTable] = {}

    def subnet_of(self, public_ip: str | None) -> str:
        lease = self.by_public_ip.get(public_ip or "")
        if lease is not None:
            return f" [{lease.subnet}]"
        lease = self.by_public_ipv6.get(public_ip or "")
        return f" [{lease.ipv6_subnet}]" if lease is not None else ""

    def _table_without(self, owner) -> RouteTable:
        """The route table of the node that holds the lease `owner`: every other lease, of each family both carry,
        to the next hop that node's udp backend would choose (the peer's PublicIPv6 when both have one)."""
        from _fastpath.routes import RouteTable

        from .backend.udp import ipv6_next_hop

        key = owner.key
        if key not in self.tables:
            owner_has_ipv6 = owner.attrs.public_ipv6 is not None
            table = RouteTable()
            for lease in self.leases:
                if lease.primary == owner.primary:
                    continue
                if lease.subnet is not None and owner.subnet is not None:
                    table.set_route(lease.subnet, lease.attrs.public_ip, self.port)
                if lease.ipv6_subnet is not None and owner.ipv6_subnet is not None:
                    table.set_route(lease.ipv6_subnet, ipv6_next_hop(lease, owner_has_ipv6), self.port)
            self.tables[key] = table
        return self.tables[key]

    def inbound(self, inner: bytes, sender: str, receiver_ip: str) -> str:
        """A datagram from `sender` to `receiver_ip` (an underlay address of either family), as the receiving node's
        pump judges it."""
        from _fastpath.packet import inbound_verdict

        receiver = self.by_public_ip.get(receiver_ip) or self.by_public_ipv6.get(receiver_ip)
        if receiver is None:  # not sent to a known node: only the structural checks apply
            return self.structural(inner)
        own4 = str(receiver.subnet) if receiver.subnet is not None else None
        own6 = str(receiver.ipv6_subnet) if receiver.ipv6_subnet is not None else None
        return inbound_verdict(inner, sender, self._table_without(receiver), own4, True, own6)

    def structural(self, inner: bytes) -> str:
        """The checks that need no leases, for either family."""
        from _fastpath.packet import inbound_verdict

        return inbound_verdict(inner, "0.0.0.0", self.empty, "0.0.0.0/32", False, "::/128")

    def next_hop(self, inner: bytes) -> str | None:
        """The node a packet leaving through flannel0 is sent to (its route in the udp backend's table); None for a
        packet delivered here or one without a route."""
        addresses = inner_addresses(inner)
        if addresses is None or self.own is None:
            return None
        found = self._table_without(self.own).lookup_peer(addresses[1])
        return str(found[0]) if found is not None else None

    def on_tun(self, inner: bytes) -> str:
        """A packet on flannel0: delivered to this node, or leaving it (then it needs a route and a live TTL)."""
        from _fastpath.packet import outbound_verdict

        addresses = inner_addresses(inner)
        if addresses is not None and self.own is not None:
            destination = ipaddress.ip_address(addresses[1])
            if any(subnet is not None and destination in subnet for subnet in (self.own_subnet, self.own_subnet6)):
                return self.structural(inner)
        table = self._table_without(self.own) if self.own is not None else self.empty
        ipv4 = self.own is None or self.own_subnet is not None
        return outbound_verdict(inner, table, ipv6=self.own_subnet6 is not None, ipv4=ipv4)


# -- decoding ------------------------------------------------------------------------------------------------------
def describe_inner(inner: bytes) -> tuple[str, str]:
    """A readable summary of the inner packet and its flow key."""
    from scapy.layers.inet import ICMP, IP

    version = inner[0] >> 4 if inner else 0
    if version == 6 and len(inner) >= 40:
        return describe_inner6(inner)
    if len(inner) < 20 or version != 4:
        return f"non-IPv4 (version {version}) len {len(inner)}", f"non-IPv4 v{version}"
    ip = IP(inner)
    described = describe_transport(ip, ip.src, ip.dst)
    if described is not None:
        flow, detail = described
    elif ICMP in ip:
        flow = f"ICMP {ip.src} > {ip.dst}"
        kind = ICMP_TYPES.get(ip[ICMP].type, f"type {ip[ICMP].type}")
        detail = f"{flow} {kind} (type {ip[ICMP].type} code {ip[ICMP].code})"
    else:
        flow = f"proto {ip.proto} {ip.src} > {ip.dst}"
        detail = flow
    return f"{detail} len {len(inner)} ttl {ip.ttl}", flow


def describe_inner6(inner: bytes) -> tuple[str, str]:
    """The same for an IPv6 packet (dual-stack pod traffic, carried by vxlan)."""
    from scapy.layers.inet6 import IPv6

    ip = IPv6(inner)
    described = describe_transport(ip, f"[{ip.src}]", f"[{ip.dst}]")
    if described is not None:
        flow, detail = described
    elif ip.nh == 58 and len(inner) >= 42:  # ICMPv6 right after the fixed header
        icmp_type, code = inner[40], inner[41]
        flow = f"ICMPv6 {ip.src} > {ip.dst}"
        detail = f"{flow} {ICMP6_TYPES.get(icmp_type, f'type {icmp_type}')} (type {icmp_type} code {code})"
    else:
        flow = f"next-header {ip.nh} {ip.src} > {ip.dst}"
        detail = flow
    return f"{detail} len {len(inner)} hlim {ip.hlim}", flow


def describe_transport(ip, src: str, dst: str) -> tuple[str, str] | None:
    """Flow key and detail of a TCP or UDP packet (addresses as given: IPv6 ones in brackets); None for others."""
    from scapy.layers.inet import TCP, UDP

    if TCP in ip:
        t = ip[TCP]
        flow = f"TCP {src}:{t.sport} > {dst}:{t.dport}"
        return flow, f"{flow} [{t.flags}]"
    if UDP in ip:
        u = ip[UDP]
        flow = f"UDP {src}:{u.sport} > {dst}:{u.dport}"
        return flow, flow
    return None


def inner_addresses(inner: bytes) -> tuple[str, str] | None:
    """Source and destination of an IPv4 or IPv6 packet, as text; None for anything else."""
    if len(inner) >= 20 and inner[0] >> 4 == 4:
        return str(ipaddress.IPv4Address(inner[12:16])), str(ipaddress.IPv4Address(inner[16:20]))
    if len(inner) >= 40 and inner[0] >> 4 == 6:
        return str(ipaddress.IPv6Address(inner[8:24])), str(ipaddress.IPv6Address(inner[24:40]))
    return None


def inner_protocol(inner: bytes) -> int | None:
    """IPv4's protocol or IPv6's first next header (ICMPv6 shown as ICMP's 1, so --proto icmp covers both)."""
    if len(inner) >= 20 and inner[0] >> 4 == 4:
        return inner[9]
    if len(inner) >= 40 and inner[0] >> 4 == 6:
        return 1 if inner[6] == 58 else inner[6]
    return None


def decode(
    packet,
    verdicts: Verdicts,
    udp_port: int,
    vxlan_port: int,
    on_tun: bool,
    wireguard_ports: tuple[int, ...] = (WIREGUARD_PORT, WIREGUARD_PORT_V6),
) -> Record | None:
    """The outer packet (or a TUN packet) as a Record; None for traffic that is not the overlay's."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.vxlan import VXLAN

    when = float(packet.time)
    if on_tun:
        inner = bytes(packet)
        summary, flow = describe_inner(inner)
        return Record(when, None, verdicts.next_hop(inner), "tun", inner, verdicts.on_tun(inner), summary, flow)
    outer = packet[IP] if IP in packet else packet[IPv6] if IPv6 in packet else None  # vxlan may run over IPv6
    if outer is None or UDP not in outer:
        return None
    udp = outer[UDP]
    if udp.dport == udp_port:  # the udp backend, over an IPv4 or an IPv6 underlay
        inner = bytes(udp.payload)
        verdict = verdicts.inbound(inner, outer.src, outer.dst)
        encapsulation = "udp"
    elif udp.dport == vxlan_port:
        payload = bytes(udp.payload)
        if len(payload) < 8 + 14 + 20:
            return None
        inner = payload[8 + 14 :]  # VXLAN header, then the inner Ethernet frame
        verdict = verdicts.structural(inner)
        encapsulation = f"vxlan vni {VXLAN(payload).vni}"
    elif (
        udp.dport in wireguard_ports or udp.sport in wireguard_ports
    ):  # sealed: the message type, session and size, never the contents
        payload = bytes(udp.payload)
        summary, valid = describe_wireguard(payload)
        flow = f"{outer.src} > {outer.dst} wireguard"
        verdict = "ok" if valid else "malformed"
        return Record(when, outer.src, outer.dst, "wireguard", b"", verdict, summary, flow, len(payload))
    else:
        return None
    summary, flow = describe_inner(inner)
    return Record(when, outer.src, outer.dst, encapsulation, inner, verdict, summary, flow)


def matches(record: Record, args: argparse.Namespace) -> bool:
    inner = record.inner
    if args.pod:
        addresses = inner_addresses(inner)
        if addresses is None or args.pod not in addresses:
            return False
    if args.peer and args.peer not in (record.outer_src, record.outer_dst):
        return False
    if args.proto and inner_protocol(inner) != {"tcp": 6, "udp": 17, "icmp": 1}[args.proto]:
        return False
    return True


def format_record(record: Record, verdicts: Verdicts) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.time)) + f".{int(record.time % 1 * 1e6):06d}"
    mark = "ok" if record.verdict == "ok" else f"DROP {record.verdict}"
    if record.encapsulation == "tun":  # a packet leaving names the node it is sent to
        hop = f" > {record.outer_dst}{verdicts.subnet_of(record.outer_dst)}" if record.outer_dst else ""
        return f"{stamp} flannel0{hop} {record.summary} {mark}"
    return (
        f"{stamp} {record.outer_src}{verdicts.subnet_of(record.outer_src)} > {record.outer_dst}"
        f"{verdicts.subnet_of(record.outer_dst)} {record.encapsulation}: {record.summary} {mark}"
    )


# -- summary -------------------------------------------------------------------------------------------------------
class Summary:
    def __init__(self) -> None:
        self.flows: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        self.peers: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        self.verdicts: collections.Counter = collections.Counter()

    def add(self, record: Record) -> None:
        for table, key in ((self.flows, record.flow), (self.peers, record.outer_src or "flannel0")):
            table[key][0] += 1
            table[key][1] += record.size
        self.verdicts[record.verdict] += 1

    def render(self) -> str:
        lines = ["", f"{'FLOW':60} {'PACKETS':>8} {'BYTES':>12}"]
        lines += [f"{flow:60} {p:8} {b:12}" for flow, (p, b) in sorted(self.flows.items(), key=lambda i: -i[1][1])]
        lines += ["", f"{'PEER (outer source)':60} {'PACKETS':>8} {'BYTES':>12}"]
        lines += [f"{peer:60} {p:8} {b:12}" for peer, (p, b) in sorted(self.peers.items(), key=lambda i: -i[1][1])]
        lines += ["", f"{'VERDICT':60} {'PACKETS':>8}"]
        lines += [f"{verdict:60} {n:8}" for verdict, n in self.verdicts.most_common()]
        return "\n".join(lines)


# -- sources -------------------------------------------------------------------------------------------------------
def is_tun(iface: str) -> bool:
    try:
        with open(f"/sys/class/net/{iface}/type") as f:
            return int(f.read()) == 65534  # ARPHRD_NONE: a TUN, packets are bare IP
    except OSError:
        raise CaptureError(f"no interface named {iface}") from None


def tun_address(iface: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """flannel0's /32 address is its node's subnet IP (in an IPv6-only network its /128 address the IPv6 subnet's):
    the lease with that subnet IP is the node's own."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=iface)
        if not index:
            return None
        for family in (2, 10):
            for msg in ipr.get_addr(index=index[0], family=family):
                address = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                if not address.is_link_local:
                    return address
    return None


def load_leases(source) -> list:
    """The current leases (from a subnet.source.LeaseSource), for node subnets and verdicts; none when no store is
    reachable (said on stderr)."""
    import asyncio

    try:
        return [lease for _node, lease in asyncio.run(source.read())]
    except (StoreError, OSError) as e:  # no lease file, etcd or the API away: still useful, with structural verdicts
        print(f"note: no leases ({e}); verdicts cover the packet checks only, not peers and subnets", file=sys.stderr)
        return []


def build_filter(args: argparse.Namespace, on_tun: bool) -> str | None:
    wireguard = f"udp port {args.wireguard_port} or udp port {args.wireguard_port_v6}"
    ports = f"udp dst port {args.port} or udp dst port {args.vxlan_port} or {wireguard}"
    parts = [] if on_tun or args.read else [f"({ports})"]
    if args.filter:
        parts.append(f"({args.filter})")
    return " and ".join(parts) or None


def check_filter(expression: str | None, on_tun: bool) -> None:
    """Compile the BPF program now, so that a bad filter is one clear line before anything is captured."""
    if not expression:
        return
    from scapy.arch.common import compile_filter
    from scapy.error import Scapy_Exception

    try:
        compile_filter(expression, linktype=DLT_RAW if on_tun else 1)
    except (Scapy_Exception, OSError) as e:
        raise CaptureError(f"bad filter {expression!r}: {str(e).strip() or 'does not compile'}") from None


def check_arguments(args: argparse.Namespace) -> None:
    """One source, readable; --pod and --peer as canonical addresses (IPv6 compressed), as the decoder shows them."""
    if bool(args.iface) == bool(args.read):
        raise CaptureError("give exactly one source: --iface NAME (underlay or flannel0) or --read FILE")
    if args.read and not os.access(args.read, os.R_OK):
        raise CaptureError(
            f"cannot read {args.read}: {'no such file' if not os.path.exists(args.read) else 'permission denied'}"
        )
    for flag in ("pod", "peer"):
        value = getattr(args, flag)
        if value:
            try:
                setattr(args, flag, str(ipaddress.ip_address(value)))
            except ValueError:
                raise CaptureError(f"--{flag} is not an IP address: {value}") from None


def run_capture(args: argparse.Namespace, source) -> int:
    check_arguments(args)
    on_tun = bool(args.iface) and is_tun(args.iface)
    expression = build_filter(args, on_tun)
    check_filter(expression, on_tun)

    from scapy.error import Scapy_Exception
    from scapy.layers.inet import UDP
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import bind_layers
    from scapy.sendrecv import sniff
    from scapy.utils import PcapWriter

    bind_layers(UDP, VXLAN, dport=args.vxlan_port)

    leases = load_leases(source)
    own = None
    if on_tun:
        own_ip = tun_address(args.iface)
        own = next((lease.primary for lease in leases if lease.primary.network_address == own_ip), None)
    verdicts = Verdicts(leases, args.port, own)
    summary = Summary()
    writer = None
    if args.write:
        try:
            writer = PcapWriter(args.write, linktype=None if args.outer else DLT_RAW, sync=True)
        except OSError as e:
            raise CaptureError(f"cannot write {args.write}: {e.strerror}") from None
    shown = 0

    def handle(packet) -> None:
        nonlocal shown
        record = decode(
            packet, verdicts, args.port, args.vxlan_port, on_tun, (args.wireguard_port, args.wireguard_port_v6)
        )
        if record is None or not matches(record, args):
            return
        shown += 1
        summary.add(record)
        print(format_record(record, verdicts), flush=True)
        if writer is not None and (args.outer or record.inner):  # WireGuard's sealed payloads have no inner packet
            writer.write(packet if args.outer else record.inner)

    def done(_packet) -> bool:
        return bool(args.count) and shown >= args.count

    source = {"offline": args.read} if args.read else {"iface": args.iface}
    try:
        sniff(
            prn=handle,
            store=False,
            filter=expression,
            timeout=args.duration,
            stop_filter=done,
            # As tcpdump says it: from here on nothing that crosses the interface is missed.
            started_callback=(lambda: print(f"listening on {args.iface}", file=sys.stderr, flush=True))
            if args.iface
            else None,
            **source,
        )
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise CaptureError(f"cannot capture on {args.iface or args.read}: {e.strerror or e}") from None
    except (Scapy_Exception, ValueError) as e:  # scapy's words for an unreadable pcap or an unknown interface
        raise CaptureError(f"cannot capture on {args.iface or args.read}: {e}") from None
    finally:
        if writer is not None:
            writer.close()
    print(summary.render())
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("source (one of)")
    source.add_argument("--iface", help="the underlay interface (udp and vxlan datagrams), or flannel0 (bare packets)")
    source.add_argument("--read", metavar="FILE", help="a pcap file")
    parser.add_argument("--port", type=int, default=UDP_PORT, help=f"the udp backend's port (default {UDP_PORT})")
    parser.add_argument(
        "--vxlan-port",
        type=int,
        default=VXLAN_PORT,
        help=f"vxlan's port, decoded too (default {VXLAN_PORT})",
    )
    parser.add_argument(
        "--wireguard-port",
        type=int,
        default=WIREGUARD_PORT,
        help=f"the wireguard backend's port: its messages are named, never decrypted (default {WIREGUARD_PORT})",
    )
    parser.add_argument(
        "--wireguard-port-v6",
        type=int,
        default=WIREGUARD_PORT_V6,
        help=f"flannel-wg-v6's port, named too (default {WIREGUARD_PORT_V6})",
    )
    parser.add_argument("--count", type=int, default=0, help="stop after N shown packets")
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--pod", help="only packets whose inner source or destination is this IP")
    parser.add_argument("--peer", help="only packets whose outer source or destination is this IP")
    parser.add_argument("--proto", choices=["tcp", "udp", "icmp"], help="only this inner protocol (icmp: ICMPv6 too)")
    parser.add_argument("--filter", help="a BPF filter on the outer packet (on flannel0: on the packet)")
    parser.add_argument("--write", metavar="FILE", help="write the inner packets (DLT_RAW) to a pcap")
    parser.add_argument("--outer", action="store_true", help="with --write: the outer packets instead")
    parser.add_argument(
        "--lease-file",
        default=LEASE_FILE,
        help="the embedded store, for node subnets and verdicts (optional)",
    )
