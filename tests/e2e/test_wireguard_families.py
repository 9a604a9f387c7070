"""The wireguard backend's IPv6 side, as upstream lays it out: in dual stack, mode "separate" gives IPv6 pods a device
of their own (flannel-wg-v6 on ListenPortV6 over the IPv6 underlay); modes "auto", "ipv4" and "ipv6" put both
families on flannel-wg and reach each peer on one of its addresses; an IPv6-only network has flannel-wg-v6 alone and
nothing of IPv4. Every case: pods ping across, only WireGuard messages on the underlay, no clear text."""

import json
import os
import sqlite3
import subprocess
import time

import pytest

from testbed.cluster import in_ns, wait_for
from testbed.wgpeers import start_wg_peer
from tests.e2e.test_ipv6_only import IPV6_NETWORK, PREFIX, ipv4_addresses, ipv6_only_config, needs_kube, subnet6_of
from tests.e2e.test_wireguard_backend import (
    PATTERN,
    captured_messages,
    metric,
    ping,
    public_key,
    start,
    start_all,
    subnet_of,
)

NETWORK6 = "fd00:10:244::/56"


def dual_stack_config(**backend) -> dict:
    return {
        "Network": "10.244.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": NETWORK6,
        "Backend": {"Type": "wireguard", **backend},
    }


def addresses(ns: str, device: str) -> list[tuple[str, int]]:
    link = json.loads(in_ns(ns, "ip", "-j", "addr", "show", "dev", device).stdout)[0]
    return [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a.get("scope") == "global"]


def routes(ns: str, device: str) -> list[str]:
    """The device's routes but the kernel's own (link-local, and each address's)."""
    found = []
    for family in ("-4", "-6"):
        shown = json.loads(in_ns(ns, "ip", "-j", family, "route", "show", "dev", device).stdout)
        found += [r["dst"] for r in shown if r.get("protocol") != "kernel"]
    return sorted(found)


def has_link(ns: str, device: str) -> bool:
    return in_ns(ns, "ip", "link", "show", device, check=False).returncode == 0


def stored_lease(bed, host, key: str) -> dict:
    with sqlite3.connect(bed.lease_file) as db:
        (value,) = db.execute("SELECT value FROM leases WHERE key = ?", (key,)).fetchone()
    return json.loads(value)


def capture(bed):
    """Every UDP datagram between the hosts on the underlay bridge, IPv4 and IPv6, from the moment this returns
    (immediate mode: a few pings are written out even if the capture stops right after)."""
    pcap, log = (os.path.join(bed.workdir, name) for name in ("ul.pcap", "tcpdump.log"))
    with open(log, "w") as err:
        process = bed.popen(
            bed.underlay_ns, "tcpdump", "--immediate-mode", "-i", "br0", "-U", "-w", pcap, "udp", stderr=err
        )
    assert wait_for(lambda: "listening on" in open(log).read(), 10)
    return process, pcap


def wireguard_ports_seen(process, pcap: str) -> set[tuple[int, int]]:
    """(IP version, WireGuard port) of every datagram captured; each must be a WireGuard message, no ping's payload
    may show."""
    from scapy.all import IP, UDP, IPv6, rdpcap

    process.terminate()
    process.wait(10)
    with open(pcap, "rb") as f:
        assert bytes.fromhex(PATTERN) not in f.read()
    seen = set()
    for p in rdpcap(pcap):
        if UDP not in p:
            continue
        port = p[UDP].dport if p[UDP].dport in (51820, 51821) else p[UDP].sport
        assert port in (51820, 51821), p.summary()
        assert bytes(p[UDP].payload)[0] in (1, 2, 3, 4), p.summary()
        seen.add((4 if IP in p else 6 if IPv6 in p else 0, port))
    return seen


def ping_both_families(bed, hosts) -> None:
    for src in hosts:
        for dst in hosts:
            if src is not dst:
                assert ping(bed, src.pods[0].ns, dst.pods[0].address).returncode == 0, bed.logs()
                assert ping(bed, src.pods[0].ns, dst.pods[0].address6).returncode == 0, bed.logs()


def test_dual_stack_separate_mode_has_a_device_per_family(bed):
    bed.write_config(dual_stack_config())
    one, two = bed.hosts[:2]
    process, pcap = capture(bed)
    start_all(bed, [one, two], ("flannel-wg", "flannel-wg-v6"))
    assert addresses(one.ns, "flannel-wg") == [(str(subnet_of(one).network_address), 32)]
    assert addresses(one.ns, "flannel-wg-v6") == [(str(subnet6_of(one).network_address), 128)]
    assert routes(one.ns, "flannel-wg") == ["10.244.0.0/16"]
    assert routes(one.ns, "flannel-wg-v6") == [NETWORK6]
    key = public_key(bed, one)
    lease = stored_lease(bed, one, f"{subnet_of(one).network_address}-24&{subnet6_of(one).network_address}-64")
    assert lease["BackendData"] == {"PublicKey": key, "Port": 51820}
    assert lease["BackendV6Data"] == {"PublicKey": key, "Port": 51821}
    assert lease["PublicIPv6"] == str(one.address6)
    listening = in_ns(one.ns, "ss", "-Hlun").stdout
    assert f"{one.address}:51820" in listening and f"[{one.address6}]:51821" in listening, listening
    ping_both_families(bed, [one, two])
    assert wireguard_ports_seen(process, pcap) == {(4, 51820), (6, 51821)}
    shown = captured_messages(bed, pcap)
    # Each message named, with who sent it to whom and their subnets of that family.
    v6 = f"{one.address6} [{subnet6_of(one)}] > {two.address6} [{subnet6_of(two)}] wireguard: transport receiver 0x"
    assert v6 in shown, shown[:2000]
    assert f"{one.address} [{subnet_of(one)}] > {two.address} [{subnet_of(two)}] wireguard: transport" in shown


@pytest.mark.parametrize(("mode", "underlay"), [("ipv6", (6, 51821)), ("auto", (4, 51820))])
def test_single_device_modes_carry_both_families_on_one_underlay(bed, mode, underlay):
    """ "ipv6" reaches peers on their IPv6 addresses; "auto" picks IPv4, the underlay's IPv4 addresses being public
    ones by upstream's rule (198.18.0.0/15) while its IPv6 ones are unique-local."""
    bed.write_config(dual_stack_config(Mode=mode))
    one, two = bed.hosts[:2]
    process, pcap = capture(bed)
    start_all(bed, [one, two])
    assert not has_link(one.ns, "flannel-wg-v6")
    assert sorted(addresses(one.ns, "flannel-wg")) == sorted(
        [(str(subnet_of(one).network_address), 32), (str(subnet6_of(one).network_address), 128)]
    )
    assert routes(one.ns, "flannel-wg") == sorted(["10.244.0.0/16", NETWORK6])
    ping_both_families(bed, [one, two])
    assert wireguard_ports_seen(process, pcap) == {underlay}


def test_ipv6_only_network_has_flannel_wg_v6_alone(bed6):
    bed = bed6
    bed.write_config(ipv6_only_config("wireguard"))
    process, pcap = capture(bed)
    start_all(bed, bed.hosts, ("flannel-wg-v6",))
    for host in bed.hosts:
        assert not has_link(host.ns, "flannel-wg")
        assert addresses(host.ns, "flannel-wg-v6") == [(str(subnet6_of(host).network_address), 128)]
        assert routes(host.ns, "flannel-wg-v6") == [NETWORK6]
        for ns in (host.ns, host.pods[0].ns):
            assert ipv4_addresses(ns) == [], ns
        listening = in_ns(host.ns, "ss", "-Hlun").stdout
        assert "51820" not in listening and f"[{host.address6}]:51821" in listening, listening
    first = bed.hosts[0]
    lease = stored_lease(bed, first, f"{subnet6_of(first).network_address}-64")
    assert "BackendData" not in lease and lease["PublicIP"] == "0.0.0.0"
    assert lease["BackendV6Data"] == {"PublicKey": public_key(bed, first), "Port": 51821}
    for src in bed.hosts:
        for dst in bed.hosts:
            if src is not dst:
                assert ping(bed, src.pods[0].ns, dst.pods[0].address6).returncode == 0, bed.logs()
    report = bed.iperf3(bed.hosts[0].pods[0], bed.hosts[1].pods[0], 1, ipv6=True)
    assert report["end"]["sum_received"]["bytes"] > 10_000_000
    assert wireguard_ports_seen(process, pcap) == {(6, 51821)}


def tcp_both_ways(bed, pod, peer) -> None:
    """A second of iperf3 from the pod to the peer's device address, then one back (-R)."""
    for reverse in ([], ["-R"]):
        server = bed.popen(peer.host.ns, "iperf3", "-s", "-1", "-B", str(peer.address), stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        shown = in_ns(pod.ns, "iperf3", "-c", str(peer.address), "-t", "1", "-J", *reverse, timeout=30).stdout
        report = json.loads(shown)
        assert report["end"]["sum_received"]["bytes"] > 5_000_000, (reverse, report.get("error"))
        server.wait(10)


@pytest.mark.parametrize("kind", ["wireguard-go", "boringtun"])
def test_ipv6_only_interop_with_a_real_wireguard_peer(bed6, kind):
    """An IPv6-only network: flannel-wg-v6 and a real WireGuard program, configured as upstream's IPv6 device is
    (ListenPortV6, its lease's BackendV6Data), reach each other over the IPv6 underlay. The peer starts the first
    handshake, we start one after a restart; pods ping and move TCP both ways; only WireGuard crosses."""
    bed = bed6
    bed.write_config(ipv6_only_config("wireguard"))
    process, pcap = capture(bed)
    ours, theirs = bed.hosts[:2]
    start(bed, ours)
    pod = bed.add_pod(ours)
    peer = start_wg_peer(bed, theirs, kind, "fd00:10:244:fa::/64", network=IPV6_NETWORK)
    peer.add_node(public_key(bed, ours), f"[{ours.address6}]:51821", str(subnet6_of(ours)))
    peers = lambda: metric(ours.ns, "flannel_udp_wireguard_peers", device="flannel-wg-v6")  # noqa: E731
    assert wait_for(lambda: peers() == 1, 5), bed.logs()
    assert ping(bed, theirs.ns, pod.address6, count=3).returncode == 0, bed.logs()
    assert f"WireGuard handshake with [{theirs.address6}]:51821 answered" in bed.node_log(ours)
    assert ping(bed, pod.ns, peer.address, count=3).returncode == 0, bed.logs()
    tcp_both_ways(bed, pod, peer)
    received = peer.received_from(public_key(bed, ours))
    bed.stop_node(ours)
    start(bed, ours)
    assert ping(bed, pod.ns, peer.address, count=3).returncode == 0, bed.logs()
    assert f"WireGuard handshake with [{theirs.address6}]:51821 initiated" in bed.node_log(ours)
    assert peer.received_from(public_key(bed, ours)) > received
    assert wireguard_ports_seen(process, pcap) == {(6, 51821)}


@needs_kube
@pytest.mark.parametrize("families", ["dual-stack", "ipv6-only"])
def test_kubernetes_annotations_carry_each_familys_key_and_port(request, families):
    """The Kubernetes subnet manager: backend-data / backend-v6-data annotations as upstream writes them."""
    bed = request.getfixturevalue("bed" if families == "dual-stack" else "bed6")
    bed.write_config(dual_stack_config() if families == "dual-stack" else ipv6_only_config("wireguard"))
    bed.start_kube()
    one, two = bed.hosts[:2]
    devices = ("flannel-wg", "flannel-wg-v6") if families == "dual-stack" else ("flannel-wg-v6",)
    start_all(bed, [one, two], devices)
    for src, dst in ((one, two), (two, one)):
        assert ping(bed, src.pods[0].ns, dst.pods[0].address6).returncode == 0, bed.logs()
    annotations = bed.kube.get_node(one.node_name).metadata.annotations
    key = public_key(bed, one)
    assert annotations[PREFIX + "backend-type"] == "wireguard"
    assert json.loads(annotations[PREFIX + "backend-v6-data"]) == {"PublicKey": key, "Port": 51821}
    assert annotations[PREFIX + "public-ipv6"] == str(one.address6)
    if families == "dual-stack":
        assert json.loads(annotations[PREFIX + "backend-data"]) == {"PublicKey": key, "Port": 51820}
        assert ping(bed, one.pods[0].ns, two.pods[0].address).returncode == 0, bed.logs()
    else:  # upstream writes these for every type but vxlan, whatever the families: the same here
        assert (annotations[PREFIX + "backend-data"], annotations[PREFIX + "public-ip"]) == ("null", "0.0.0.0")
