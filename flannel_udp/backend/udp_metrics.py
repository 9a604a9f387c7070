"""The udp data plane on /metrics: every pump's counters summed, the main ones per pump too, the peers' counters (shared
by the pumps), the kernel's drops in front of them, and the route table as the pumps look it up."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..net.udp_socket import socket_drops, tun_queue_drops

if TYPE_CHECKING:
    from .udp import UdpNetwork

STAGES = (
    "tun_read_packets",
    "udp_sent_packets",
    "udp_received_packets",
    "tun_written_packets",
    "icmp_unreachable_sent",
)
CALLS = (
    "tun_wakeups",
    "socket_wakeups",
    "send_batches",
    "receive_batches",
    "gso_sends",
    "gro_receives",
    "tso_reads",
    "tso_segments",
    "tun_writes",
    "coalesced_writes",
)


def summed(per_pump: list[dict]) -> dict:
    """One pump's counters() shape, each figure (and each drop reason) added up over the pumps."""
    total: dict = {}
    for counters in per_pump:
        for key, value in counters.items():
            if isinstance(value, dict):
                reasons = total.setdefault(key, {})
                for reason, count in value.items():
                    reasons[reason] = reasons.get(reason, 0) + count
            else:
                total[key] = total.get(key, 0) + value
    return total


def collect(network: UdpNetwork) -> list:
    per_pump = [pump.counters() for pump in network.pumps]
    counters = summed(per_pump)
    return [
        *peer_families(network),
        drop_family(network, counters),
        totals_family(counters),
        per_pump_family(per_pump),
        calls_family(counters),
        *route_families(network),
    ]


def peer_families(network: UdpNetwork) -> list:
    packets = CounterMetricFamily(
        "flannel_udp_peer_packets", "Packets exchanged with a peer node", labels=["peer", "direction"]
    )
    octets = CounterMetricFamily(
        "flannel_udp_peer_bytes", "Inner IP bytes exchanged with a peer node", labels=["peer", "direction"]
    )
    for peer, (tx_p, tx_b, rx_p, rx_b) in network.routes.peer_stats().items():
        packets.add_metric([peer, "tx"], tx_p)
        packets.add_metric([peer, "rx"], rx_p)
        octets.add_metric([peer, "tx"], tx_b)
        octets.add_metric([peer, "rx"], rx_b)
    return [packets, octets]


def drop_family(network: UdpNetwork, counters: dict) -> CounterMetricFamily:
    drops = CounterMetricFamily(
        "flannel_udp_dropped_packets", "Packets dropped by the data plane, by reason", labels=["direction", "reason"]
    )
    for direction in ("tun_to_udp", "udp_to_tun"):
        for reason, count in counters[f"drops_{direction}"].items():
            drops.add_metric([direction, reason], count)
    # Drops before a pump sees a packet: the kernel's counters of the queues in front of them.
    drops.add_metric(["udp_to_tun", "socket_receive_buffer"], sum(map(socket_drops, network.sockets)))
    drops.add_metric(["tun_to_udp", "tun_queue"], tun_queue_drops(network.tun_name))
    return drops


def totals_family(counters: dict) -> CounterMetricFamily:
    totals = CounterMetricFamily("flannel_udp_packets", "Packets through the data plane", labels=["stage"])
    for stage in STAGES:
        totals.add_metric([stage.removesuffix("_packets")], counters[stage])
    return totals


def per_pump_family(per_pump: list[dict]) -> CounterMetricFamily:
    """Each pump's share (-udp-workers): how evenly the kernel spreads the flows."""
    family = CounterMetricFamily(
        "flannel_udp_pump_packets", "Packets through each packet thread", labels=["pump", "stage"]
    )
    for index, counters in enumerate(per_pump):
        for stage in STAGES[:4]:
            family.add_metric([str(index), stage.removesuffix("_packets")], counters[stage])
    return family


def calls_family(counters: dict) -> CounterMetricFamily:
    calls = CounterMetricFamily(
        "flannel_udp_io_calls",
        "Readiness callbacks and batched syscalls (packets per call shows how well batching works)",
        labels=["kind"],
    )
    for kind in CALLS:
        calls.add_metric([kind], counters[kind])
    return calls


def route_families(network: UdpNetwork) -> list:
    routes = GaugeMetricFamily("flannel_udp_routes", "Routes installed in the fast path")
    routes.add_metric([], len(network.routes))
    # The data plane's own table, as the pumps look it up: what an operator compares with the leases.
    route_info = GaugeMetricFamily(
        "flannel_udp_route", "A route of the fast path (value 1)", labels=["subnet", "peer", "port"]
    )
    for subnet, peer, port in sorted(network.routes.entries(), key=lambda entry: str(entry[0])):
        route_info.add_metric([str(subnet), str(peer), str(port)], 1)
    return [routes, route_info]
