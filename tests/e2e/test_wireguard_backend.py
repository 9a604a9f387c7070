"""The wireguard backend end to end: our nodes with one another and with real WireGuard programs (wireguard-go and
boringtun, configured with wg), handshakes from either side, a rekey under traffic, the key kept across restarts, no
clear text on the underlay, and hostile datagrams dropped and counted by reason."""

import base64
import ipaddress
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from testbed.cluster import in_ns, scrape_metrics, tcp_reordering_seen, wait_for
from testbed.wgpeers import public_key_of, start_wg_peer

HEALTH_PORT = 18093
PATTERN = "c0ffee15deadbeef"  # in every test ping's payload: it must never appear on the underlay


def metric(ns: str, name: str, **labels) -> float:
    return sum(
        value
        for sample, value in scrape_metrics(ns, HEALTH_PORT).items()
        if sample.partition("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items())
    )


def key_file(bed, host) -> str:
    return os.path.join(bed.workdir, f"{host.name}-wgkey")


def start(bed, host, *extra, env=None):
    variables = {"WIREGUARD_KEY_FILE": key_file(bed, host), **(env or {})}
    return bed.start_node(host, f"--healthz-port={HEALTH_PORT}", "--healthz-ip=127.0.0.1", *extra, env=variables)


def start_all(bed, hosts, devices=("flannel-wg",)) -> None:
    """Our nodes on these hosts with a pod each, once every node has every other one as a peer on each device."""
    for host in hosts:
        start(bed, host)
        bed.add_pod(host)
    for host in hosts:
        for device in devices:
            peers = lambda host=host, device=device: metric(host.ns, "flannel_udp_wireguard_peers", device=device)  # noqa: E731
            assert wait_for(lambda peers=peers: peers() == len(hosts) - 1, 5), bed.logs()


def subnet_of(host) -> ipaddress.IPv4Network:
    return ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network


def public_key(bed, host) -> str:
    with open(key_file(bed, host)) as f:
        return public_key_of(f.read())


def ping(bed, ns, target, count=1, interval=0.2) -> subprocess.CompletedProcess:
    return in_ns(
        ns,
        "ping",
        "-n",
        "-q",
        "-c",
        str(count),
        "-i",
        str(interval),
        "-W",
        "2",
        "-p",
        PATTERN,
        str(target),
        check=False,
        timeout=count * interval + 10,
    )


@pytest.fixture
def wg_bed(bed):
    bed.write_config({"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}})
    return bed


def test_our_nodes_carry_pods_encrypted_with_upstream_device_and_lease(wg_bed):
    bed = wg_bed
    capture = bed.popen(
        bed.underlay_ns,
        "tcpdump",
        "-i",
        "br0",
        "-U",
        "-w",
        os.path.join(bed.workdir, "ul.pcap"),
        "ip and src net 198.18.0.0/15 and dst net 198.18.0.0/15",
        stderr=subprocess.DEVNULL,
    )
    start_all(bed, bed.hosts)
    first = bed.hosts[0]
    env = first.subnet_env()
    assert env["FLANNEL_MTU"] == "1420" and env["FLANNEL_NETWORK"] == "10.244.0.0/16"
    link = json.loads(in_ns(first.ns, "ip", "-j", "addr", "show", "flannel-wg").stdout)[0]
    assert link["mtu"] == 1420 and "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
        (str(subnet_of(first).network_address), 32)
    ]
    routes = json.loads(in_ns(first.ns, "ip", "-j", "route", "show", "dev", "flannel-wg").stdout)
    assert [r["dst"] for r in routes] == ["10.244.0.0/16"]
    subnet = subnet_of(first)
    with sqlite3.connect(bed.lease_file) as db:
        (value,) = db.execute("SELECT value FROM leases WHERE key = ?", (f"{subnet.network_address}-24",)).fetchone()
    data = json.loads(value)
    assert data["BackendType"] == "wireguard"
    assert data["BackendData"] == {"PublicKey": public_key(bed, first), "Port": 51820}
    assert os.stat(key_file(bed, first)).st_mode & 0o777 == 0o400
    for src in bed.hosts:
        for dst in bed.hosts:
            if src is not dst:
                assert ping(bed, src.pods[0].ns, dst.pods[0].address).returncode == 0, bed.logs()
    report = bed.iperf3(bed.hosts[0].pods[0], bed.hosts[1].pods[0], 1)
    assert report["end"]["sum_received"]["bytes"] > 10_000_000
    # In batches: TSO super-packets cut into segments and sent in GSO runs, received by GRO and glued for the TUN.
    sender, receiver = bed.hosts[0].ns, bed.hosts[1].ns
    tso_reads = metric(sender, "flannel_udp_wireguard_io_calls_total", kind="tso_reads")
    assert metric(sender, "flannel_udp_wireguard_io_calls_total", kind="tso_segments") >= 2 * tso_reads > 0
    assert metric(sender, "flannel_udp_wireguard_io_calls_total", kind="gso_sends") > 0
    assert metric(receiver, "flannel_udp_wireguard_io_calls_total", kind="gro_receives") > 0
    assert metric(receiver, "flannel_udp_wireguard_io_calls_total", kind="coalesced_writes") > 0
    time.sleep(0.5)
    capture.terminate()
    capture.wait(10)
    pcap = os.path.join(bed.workdir, "ul.pcap")
    assert_no_clear_text(pcap, bed)
    # flannel-udp capture names each message, who sent it to whom (with their subnets), never its contents.
    shown = captured_messages(bed, pcap)
    one, two = (f"{h.address} [{subnet_of(h)}]" for h in bed.hosts[:2])
    assert f"{one} > {two} wireguard: handshake initiation sender 0x" in shown, shown[:2000]
    assert f"{two} > {one} wireguard: handshake response sender 0x" in shown
    assert f"{one} > {two} wireguard: transport receiver 0x" in shown
    assert "DROP" not in shown, [line for line in shown.splitlines() if "DROP" in line][:5]
    assert f"{bed.hosts[0].address} > {bed.hosts[1].address} wireguard" in shown.split("FLOW")[1]


def background_ping(bed, ns, target, count: int) -> subprocess.Popen:
    """A ping every 0.1 s while the test goes on; its summary comes from communicate()."""
    return bed.popen(ns, "ping", "-q", "-c", str(count), "-i", "0.1", str(target), stdout=subprocess.PIPE, text=True)


def captured_messages(bed, pcap: str) -> str:
    """What `flannel-udp capture` shows of a capture file, with the leases to name the nodes' subnets."""
    return subprocess.run(
        [sys.executable, "-m", "flannel_udp", "capture", "--read", pcap, "--lease-file", bed.lease_file],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def assert_no_clear_text(pcap: str, bed) -> None:
    """Every IPv4 packet between the hosts is a WireGuard message on UDP 51820, and no ping's payload shows."""
    from scapy.all import IP, UDP, rdpcap

    with open(pcap, "rb") as f:
        raw = f.read()
    assert bytes.fromhex(PATTERN) not in raw
    packets = [p for p in rdpcap(pcap) if IP in p]
    assert len(packets) > 100
    for p in packets:
        assert UDP in p and 51820 in (p[UDP].sport, p[UDP].dport), p.summary()
        assert bytes(p[UDP].payload)[0] in (1, 2, 3, 4)


def test_restart_keeps_the_key_and_peers_reconnect(wg_bed):
    bed = wg_bed
    one, two = bed.hosts[:2]
    start_all(bed, [one, two])
    key = public_key(bed, one)
    assert ping(bed, one.pods[0].ns, two.pods[0].address).returncode == 0
    bed.stop_node(one)
    assert not any(link["ifname"] == "flannel-wg" for link in json.loads(in_ns(one.ns, "ip", "-j", "link").stdout))
    start(bed, one)
    assert public_key(bed, one) == key
    # The peer still holds keys of the old run; its packets are dropped until it starts a new handshake, which its
    # timers do after KEEPALIVE + REKEY_TIMEOUT (15 s) without an answer. Ours starts one at once.
    assert ping(bed, one.pods[0].ns, two.pods[0].address, count=3).returncode == 0, bed.logs()
    assert ping(bed, two.pods[0].ns, one.pods[0].address).returncode == 0, bed.logs()


@pytest.mark.parametrize("kind", ["wireguard-go", "boringtun"])
def test_interop_with_a_real_wireguard_peer(wg_bed, kind):
    """Pods talk both ways with a node that runs `kind`; the peer starts the first handshake, then (after our node
    restarts) we start one."""
    bed = wg_bed
    ours, theirs = bed.hosts[:2]
    start(bed, ours)
    pod = bed.add_pod(ours)
    peer = start_wg_peer(bed, theirs, kind, "10.244.250.0/24")
    peer.add_node(public_key(bed, ours), f"{ours.address}:51820", str(subnet_of(ours)))
    assert wait_for(lambda: metric(ours.ns, "flannel_udp_wireguard_peers") == 1, 5), bed.logs()
    assert ping(bed, theirs.ns, pod.address, count=3).returncode == 0, bed.logs()
    assert "WireGuard handshake with 198.18.0.2:51820 answered" in bed.node_log(ours)
    assert ping(bed, pod.ns, peer.address, count=3).returncode == 0, bed.logs()
    server = bed.popen(theirs.ns, "iperf3", "-s", "-1", "-B", str(peer.address), stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    for reverse in ([], ["-R"]):
        report = json.loads(
            in_ns(pod.ns, "iperf3", "-c", str(peer.address), "-t", "1", "-J", *reverse, timeout=30).stdout
        )
        assert report["end"]["sum_received"]["bytes"] > 5_000_000, (reverse, report.get("error"))
        if not reverse:
            server.wait(10)
            server = bed.popen(theirs.ns, "iperf3", "-s", "-1", "-B", str(peer.address), stdout=subprocess.DEVNULL)
            time.sleep(0.3)
    server.wait(10)
    received = peer.received_from(public_key(bed, ours))
    bed.stop_node(ours)
    start(bed, ours)
    assert ping(bed, pod.ns, peer.address, count=3).returncode == 0, bed.logs()
    assert "WireGuard handshake with 198.18.0.2:51820 initiated" in bed.node_log(ours)
    assert peer.received_from(public_key(bed, ours)) > received


def test_two_packet_threads_share_a_device_and_keep_each_flow_in_order(wg_bed):
    """-udp-workers=2: two pumps on flannel-wg, one TUN queue and one socket of a SO_REUSEPORT group each, sharing
    the sessions. Eight TCP streams are spread over both sending pumps, none reordered; a second peer's traffic
    crosses meanwhile."""
    bed = wg_bed
    one, two, three = bed.hosts
    for host in (one, two, three):
        start(bed, host, "-udp-workers=2")
        bed.add_pod(host)
    for host in (one, two, three):
        assert wait_for(lambda host=host: metric(host.ns, "flannel_udp_wireguard_peers") == 2, 5), bed.logs()
    assert "2 packet threads" in bed.node_log(one)
    listening = in_ns(one.ns, "ss", "-Hlun", "sport = :51820").stdout.splitlines()
    assert len(listening) == 2, listening
    pinger = background_ping(bed, three.pods[0].ns, one.pods[0].address, 20)
    report = bed.iperf3(one.pods[0], two.pods[0], 2, "-P", "8")
    assert report["end"]["sum_received"]["bytes"] > 10_000_000, report.get("error")
    assert " 0% packet loss" in pinger.communicate(timeout=20)[0]
    sent = [
        metric(one.ns, "flannel_udp_wireguard_pump_packets_total", pump=str(pump), stage="udp_sent_packets")
        for pump in (0, 1)
    ]
    assert all(count > 1000 for count in sent), sent
    assert sum(tcp_reordering_seen(one.pods[0].ns).values()) <= 4


ROAMING_RULES = """
table ip roam {
    chain gone { type filter hook prerouting priority -350; ip daddr %(home)s udp dport 51820 drop; }
    chain inbound { type filter hook prerouting priority -300;
        ip daddr %(away)s udp dport 40000 ip daddr set %(home)s udp dport set 51820; }
    chain outbound { type filter hook output priority -300;
        ip saddr %(home)s udp sport 51820 ip saddr set %(away)s udp sport set 40000; }
}
"""


def test_a_peer_that_moves_is_followed_on_its_session(wg_bed):
    """Node two moves behind a new address and port (as behind a NAT whose mapping changed; stateless rewriting
    in its namespace), and its old endpoint goes dark: node one follows the first authenticated message from the
    new one, with no new handshake (forged messages move nothing: tests/unit/test_wireguard_parts.py)."""
    bed = wg_bed
    one, two = bed.hosts[:2]
    start_all(bed, [one, two])
    assert ping(bed, one.pods[0].ns, two.pods[0].address).returncode == 0, bed.logs()
    handshakes = metric(one.ns, "flannel_udp_wireguard_handshake_events_total", event="handshakes_completed")
    away = str(two.address + 100)
    in_ns(two.ns, "ip", "addr", "add", f"{away}/24", "dev", "eth0")
    rules = os.path.join(bed.workdir, "roaming.nft")
    with open(rules, "w") as f:
        f.write(ROAMING_RULES % {"home": two.address, "away": away})
    in_ns(two.ns, "nft", "-f", rules)
    assert wait_for(lambda: ping(bed, two.pods[0].ns, one.pods[0].address).returncode == 0, 5), bed.logs()
    assert f"WireGuard peer at {two.address}:51820 moved to {away}:40000" in bed.node_log(one)
    assert ping(bed, one.pods[0].ns, two.pods[0].address, count=3).returncode == 0
    assert metric(one.ns, "flannel_udp_wireguard_handshake_events_total", event="handshakes_completed") == handshakes
    assert metric(one.ns, "flannel_udp_wireguard_handshake_events_total", event="endpoint_changes") == 1


def test_rekey_under_traffic_loses_no_ping(wg_bed):
    """With the protocol's timers scaled down (rekey after 6 s), pings every 0.1 s for 14 s to wireguard-go cross
    two rekeys without a loss."""
    bed = wg_bed
    ours, theirs = bed.hosts[:2]
    start(bed, ours, env={"FLANNEL_UDP_WG_TIME_SCALE": "0.05"})
    pod = bed.add_pod(ours)
    peer = start_wg_peer(bed, theirs, "wireguard-go", "10.244.250.0/24")
    peer.add_node(public_key(bed, ours), f"{ours.address}:51820", str(subnet_of(ours)))
    assert wait_for(lambda: metric(ours.ns, "flannel_udp_wireguard_peers") == 1, 5), bed.logs()
    result = ping(bed, pod.ns, peer.address, count=140, interval=0.1)
    assert " 0% packet loss" in result.stdout, result.stdout
    assert metric(ours.ns, "flannel_udp_wireguard_handshake_events_total", event="handshakes_completed") >= 3


HOSTILE = """
import os, socket, struct, sys, time
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flannel_udp.wireguard import noise

target, port, target_key = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL: outgoing frames too
raw.bind(("eth0", 0))
raw.settimeout(10)
while True:  # a data message this node sends to the target (a ping runs meanwhile)
    frame = raw.recv(65535)
    ip = frame[14:]
    udp = ip[(ip[0] & 15) * 4:]
    ipv4_udp = frame[12:14] == b"\\x08\\x00" and ip[9] == 17
    if ipv4_udp and socket.inet_ntoa(ip[16:20]) == target and udp[8] == 4 and len(udp) > 8 + 32:
        captured = bytes(udp[8:])
        break
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(captured, (target, port))  # replayed
tampered = bytearray(captured)
tampered[20] ^= 1
s.sendto(bytes(tampered), (target, port))
s.sendto(b"\\x04\\0\\0\\0" + os.urandom(60), (target, port))  # a session nobody has
stranger = noise.Identity(X25519PrivateKey.generate())
def initiation():
    key = X25519PrivateKey.generate()
    me = noise.Identity(key)
    return noise.create_initiation(me, target_key, noise.dh(key, target_key), 1, None)[0]
s.sendto(initiation(), (target, port))  # a key that is no peer's
time.sleep(0.5)
flood = [initiation() for _ in range(200)]
for message in flood:
    s.sendto(message, (target, port))
"""


def test_hostile_datagrams_are_dropped_and_counted(wg_bed):
    bed = wg_bed
    target, attacker = bed.hosts[:2]
    start_all(bed, [target, attacker])
    target_key = public_key(bed, target)
    pinger = background_ping(bed, attacker.pods[0].ns, target.pods[0].address, 40)
    in_ns(
        attacker.ns,
        sys.executable,
        "-c",
        HOSTILE,
        str(target.address),
        "51820",
        base64.b64decode(target_key).hex(),
        timeout=60,
    )
    pinger.communicate(timeout=20)
    ns = target.ns

    def drops(reason, direction="udp_to_tun"):
        return metric(ns, "flannel_udp_wireguard_drops_total", direction=direction, reason=reason)

    assert wait_for(lambda: drops("replay") == 1, 5), scrape_metrics(ns, HEALTH_PORT)
    assert drops("bad_auth") == 1
    assert drops("unknown_index") == 1
    assert wait_for(lambda: drops("unknown_peer_key", "handshake") >= 1, 5), scrape_metrics(ns, HEALTH_PORT)
    # The control plane answers the flood after the script has sent it (a DH per message): wait for its replies.
    cookies = lambda: metric(ns, "flannel_udp_wireguard_handshake_events_total", event="cookie_replies_sent")  # noqa: E731
    assert wait_for(lambda: cookies() > 0, 10), scrape_metrics(ns, HEALTH_PORT)
    assert target.process.poll() is None
    assert ping(bed, attacker.pods[0].ns, target.pods[0].address).returncode == 0


@pytest.mark.parametrize("store", ["etcd", "kube"])
def test_on_etcd_and_the_kubernetes_api(wg_bed, store):
    """The public key and port travel in upstream's places: the etcd lease's BackendData, or the Node's backend-data
    annotation (with backend-type wireguard)."""
    bed = wg_bed
    if store == "etcd":
        bed.start_etcd()
        bed.write_config({"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}})
    else:
        bed.start_kube()
    one, two = bed.hosts[:2]
    start_all(bed, [one, two])
    assert ping(bed, one.pods[0].ns, two.pods[0].address).returncode == 0, bed.logs()
    assert ping(bed, two.pods[0].ns, one.pods[0].address).returncode == 0, bed.logs()
    if store == "kube":
        prefix = "flannel.alpha.coreos.com/"
        annotations = bed.kube.get_node(one.node_name).metadata.annotations
        assert annotations[prefix + "backend-type"] == "wireguard"
        assert json.loads(annotations[prefix + "backend-data"]) == {"PublicKey": public_key(bed, one), "Port": 51820}
