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

DLT_RAW = 101
ICMP_TYPES = {0: "echo-reply", 3: "unreachable", 8: "echo-request", 11: "time-exceeded"}


class CaptureError(RuntimeError):
    """Bad input (interface, file, filter): one line, exit status 1."""


@dataclass
class Record:
    """One captured packet, decoded."""
    time: float
    outer_src: str | None
    outer_dst: str | None
    encapsulation: str  # "udp", "vxlan" or "tun"
    inner: bytes
    verdict: str
    summary: str
    flow: str


# -- verdicts: the fast path's own checks -------------------------------------------------------------------------
class Verdicts:
    """What a node would do with a packet, given the leases; without leases, the structural checks only."""

    def __init__(self, leases: list, port: int, own_subnet: ipaddress.IPv4Network | None = None) -> None:
        from _fastpath.routes import RouteTable
        self.leases = leases
        self.port = port
        self.own_subnet = own_subnet
        self.by_public_ip = {str(lease.attrs.public_ip): lease for lease in leases}
        self.empty = RouteTable()
        self.tables: dict[str, object] = {}

    def subnet_of(self, public_ip: str | None) -> str:
        lease = self.by_public_ip.get(public_ip or "")
        return f" [{lease.subnet}]" if lease is not None else ""

    def _table_without(self, subnet) -> object:
        """The route table of the node that owns `subnet`: every other lease."""
        from _fastpath.routes import RouteTable
        key = str(subnet)
        if key not in self.tables:
            table = RouteTable()
            for lease in self.leases:
                if lease.subnet != subnet:
                    table.set_route(lease.subnet, lease.attrs.public_ip, self.port)
            self.tables[key] = table
        return self.tables[key]

    def inbound(self, inner: bytes, sender: str, receiver_ip: str) -> str:
        """A datagram from `sender` to `receiver_ip`, as the receiving node's pump judges it."""
        from _fastpath.packet import inbound_verdict
        receiver = self.by_public_ip.get(receiver_ip)
        if receiver is None:  # not sent to a known node: only the structural checks apply
            return inbound_verdict(inner, sender, self.empty, "0.0.0.0/32", False)
        return inbound_verdict(inner, sender, self._table_without(receiver.subnet), str(receiver.subnet), True)

    def structural(self, inner: bytes) -> str:
        from _fastpath.packet import inbound_verdict
        return inbound_verdict(inner, "0.0.0.0", self.empty, "0.0.0.0/32", False)

    def on_tun(self, inner: bytes) -> str:
        """A packet on flannel0: delivered to this node, or leaving it (then it needs a route and a live TTL)."""
        from _fastpath.packet import outbound_verdict
        if len(inner) >= 20 and inner[0] >> 4 == 4 and self.own_subnet is not None \
                and ipaddress.IPv4Address(inner[16:20]) in self.own_subnet:
            return self.structural(inner)
        table = self._table_without(self.own_subnet) if self.own_subnet else self.empty
        return outbound_verdict(inner, table)


# -- decoding ------------------------------------------------------------------------------------------------------
def describe_inner(inner: bytes) -> tuple[str, str]:
    """A readable summary of the inner packet and its flow key."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    if len(inner) < 20 or inner[0] >> 4 != 4:
        version = inner[0] >> 4 if inner else 0
        return f"non-IPv4 (version {version}) len {len(inner)}", f"non-IPv4 v{version}"
    ip = IP(inner)
    if TCP in ip:
        t = ip[TCP]
        flow = f"TCP {ip.src}:{t.sport} > {ip.dst}:{t.dport}"
        detail = f"{flow} [{t.flags}]"
    elif UDP in ip:
        u = ip[UDP]
        flow = f"UDP {ip.src}:{u.sport} > {ip.dst}:{u.dport}"
        detail = flow
    elif ICMP in ip:
        flow = f"ICMP {ip.src} > {ip.dst}"
        kind = ICMP_TYPES.get(ip[ICMP].type, f"type {ip[ICMP].type}")
        detail = f"{flow} {kind} (type {ip[ICMP].type} code {ip[ICMP].code})"
    else:
        flow = f"proto {ip.proto} {ip.src} > {ip.dst}"
        detail = flow
    return f"{detail} len {len(inner)} ttl {ip.ttl}", flow


def decode(packet, verdicts: Verdicts, udp_port: int, vxlan_port: int, on_tun: bool) -> Record | None:
    """The outer packet (or a TUN packet) as a Record; None for traffic that is not the overlay's."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.vxlan import VXLAN
    when = float(packet.time)
    if on_tun:
        inner = bytes(packet)
        summary, flow = describe_inner(inner)
        return Record(when, None, None, "tun", inner, verdicts.on_tun(inner), summary, flow)
    if IP not in packet or UDP not in packet[IP]:
        return None
    outer, udp = packet[IP], packet[IP][UDP]
    if udp.dport == udp_port:
        inner = bytes(udp.payload)
        verdict = verdicts.inbound(inner, outer.src, outer.dst)
        encapsulation = "udp"
    elif udp.dport == vxlan_port:
        payload = bytes(udp.payload)
        if len(payload) < 8 + 14 + 20:
            return None
        inner = payload[8 + 14:]  # VXLAN header, then the inner Ethernet frame
        verdict = verdicts.structural(inner)
        encapsulation = f"vxlan vni {VXLAN(payload).vni}"
    else:
        return None
    summary, flow = describe_inner(inner)
    return Record(when, outer.src, outer.dst, encapsulation, inner, verdict, summary, flow)


def matches(record: Record, args: argparse.Namespace) -> bool:
    inner = record.inner
    is_v4 = len(inner) >= 20 and inner[0] >> 4 == 4
    if args.pod:
        if not is_v4 or args.pod not in (str(ipaddress.IPv4Address(inner[12:16])), str(ipaddress.IPv4Address(inner[16:20]))):
            return False
    if args.peer and args.peer not in (record.outer_src, record.outer_dst):
        return False
    if args.proto and (not is_v4 or inner[9] != {"tcp": 6, "udp": 17, "icmp": 1}[args.proto]):
        return False
    return True


def format_record(record: Record, verdicts: Verdicts) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.time)) + f".{int(record.time % 1 * 1e6):06d}"
    mark = "ok" if record.verdict == "ok" else f"DROP {record.verdict}"
    if record.encapsulation == "tun":
        return f"{stamp} flannel0 {record.summary} {mark}"
    return (f"{stamp} {record.outer_src}{verdicts.subnet_of(record.outer_src)} > {record.outer_dst}"
            f"{verdicts.subnet_of(record.outer_dst)} {record.encapsulation}: {record.summary} {mark}")


# -- summary -------------------------------------------------------------------------------------------------------
class Summary:
    def __init__(self) -> None:
        self.flows: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        self.peers: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        self.verdicts: collections.Counter = collections.Counter()

    def add(self, record: Record) -> None:
        for table, key in ((self.flows, record.flow), (self.peers, record.outer_src or "flannel0")):
            table[key][0] += 1
            table[key][1] += len(record.inner)
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


def tun_address(iface: str) -> ipaddress.IPv4Address | None:
    """flannel0's /32 address is its node's subnet IP: the lease with that subnet IP is the node's own."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=iface)
        if not index:
            return None
        for msg in ipr.get_addr(index=index[0], family=2):
            return ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS"))
    return None


def load_leases(args: argparse.Namespace) -> list:
    """The current leases, for node subnets and verdicts; none when no store is reachable (said on stderr)."""
    import asyncio
    from .cli import open_registry
    try:
        async def read():
            registry = open_registry(args)
            try:
                return (await registry.get_subnets())[0]
            finally:
                await registry.close()
        return asyncio.run(read())
    except Exception as e:  # no lease file, etcd away, bad flags: the capture is still useful, with structural verdicts
        print(f"note: no leases ({e}); verdicts cover the packet checks only, not peers and subnets", file=sys.stderr)
        return []


def build_filter(args: argparse.Namespace, on_tun: bool) -> str | None:
    parts = [] if on_tun or args.read else [f"(udp dst port {args.port} or udp dst port {args.vxlan_port})"]
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


def run_capture(args: argparse.Namespace) -> int:
    if bool(args.iface) == bool(args.read):
        raise CaptureError("give exactly one source: --iface NAME (underlay or flannel0) or --read FILE")
    if args.read and not os.access(args.read, os.R_OK):
        raise CaptureError(f"cannot read {args.read}: {'no such file' if not os.path.exists(args.read) else 'permission denied'}")
    on_tun = bool(args.iface) and is_tun(args.iface)
    expression = build_filter(args, on_tun)
    check_filter(expression, on_tun)

    from scapy.layers.inet import UDP
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import bind_layers
    from scapy.sendrecv import sniff
    from scapy.utils import PcapWriter
    bind_layers(UDP, VXLAN, dport=args.vxlan_port)

    leases = load_leases(args)
    own = None
    if on_tun:
        own_ip = tun_address(args.iface)
        own = next((lease.subnet for lease in leases if lease.subnet.network_address == own_ip), None)
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
        record = decode(packet, verdicts, args.port, args.vxlan_port, on_tun)
        if record is None or not matches(record, args):
            return
        shown += 1
        summary.add(record)
        print(format_record(record, verdicts), flush=True)
        if writer is not None:
            writer.write(packet if args.outer else record.inner)

    def done(_packet) -> bool:
        return bool(args.count) and shown >= args.count

    source = {"offline": args.read} if args.read else {"iface": args.iface}
    try:
        sniff(prn=handle, store=False, filter=expression, timeout=args.duration, stop_filter=done, **source)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise CaptureError(f"cannot capture on {args.iface or args.read}: {e.strerror or e}") from None
    except Exception as e:  # scapy reports unreadable pcaps and bad interfaces in several ways
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
    parser.add_argument("--port", type=int, default=8285, help="the udp backend's port (default 8285)")
    parser.add_argument("--vxlan-port", type=int, default=8472, help="vxlan's port, decoded too (default 8472)")
    parser.add_argument("--count", type=int, default=0, help="stop after N shown packets")
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--pod", help="only packets whose inner source or destination is this IP")
    parser.add_argument("--peer", help="only packets whose outer source or destination is this IP")
    parser.add_argument("--proto", choices=["tcp", "udp", "icmp"], help="only this inner protocol")
    parser.add_argument("--filter", help="a BPF filter on the outer packet (on flannel0: on the packet)")
    parser.add_argument("--write", metavar="FILE", help="write the inner packets (DLT_RAW) to a pcap")
    parser.add_argument("--outer", action="store_true", help="with --write: the outer packets instead")
    parser.add_argument("--lease-file", default="/var/lib/flannel-udp/leases.db",
                        help="the embedded store, for node subnets and verdicts (optional)")
