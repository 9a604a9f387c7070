"""The udp backend end to end: real TUNs, real namespaces, real ping and iperf3, the daemon as users run it."""

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from testbed.cluster import in_ns, scrape_metrics, wait_for

HEALTH_PORT = 8471


def http_get(ns: str, path: str, port: int = HEALTH_PORT) -> tuple[int, str]:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=3); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n"
    )
    out = in_ns(ns, sys.executable, "-c", code, f"http://127.0.0.1:{port}{path}").stdout
    status, _, body = out.partition("\n")
    return int(status), body


def metric(ns: str, name: str, **labels) -> float:
    """The sum of the samples of `name` that carry these labels."""
    return sum(
        value
        for sample, value in scrape_metrics(ns, HEALTH_PORT).items()
        if sample.partition("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items())
    )


@pytest.fixture(params=["embedded", "etcd", "offloads-off"])
def cluster(bed, request):
    """3 running nodes with a pod each: on the embedded store, on a real etcd server, or with every offload off."""
    if request.param == "etcd":
        bed.start_etcd()
    offload = ["--udp-offload=false"] if request.param == "offloads-off" else []
    bed.start_cluster(f"--healthz-port={HEALTH_PORT}", "--healthz-ip=127.0.0.1", *offload)
    for host in bed.hosts:  # every node has learnt every other node's lease
        assert wait_for(lambda host=host: metric(host.ns, "flannel_udp_routes") == len(bed.hosts) - 1, 5), bed.logs()
    yield bed


def test_device_setup_matches_upstream(cluster):
    host = cluster.hosts[0]
    env = host.subnet_env()
    subnet = ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network
    assert (
        env["FLANNEL_NETWORK"] == "10.244.0.0/16" and env["FLANNEL_MTU"] == "1472" and env["FLANNEL_IPMASQ"] == "false"
    )
    link = json.loads(in_ns(host.ns, "ip", "-j", "addr", "show", "flannel0").stdout)[0]
    assert link["mtu"] == 1472 and "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
        (str(subnet.network_address), 32)
    ]
    routes = in_ns(host.ns, "ip", "route", "show", "dev", "flannel0").stdout
    assert "10.244.0.0/16" in routes
    sockets = in_ns(host.ns, "ss", "-uln").stdout
    assert f"{host.address}:8285" in sockets


def test_pods_ping_every_direction_and_hosts_reach_pods(cluster):
    pods = [h.pods[0] for h in cluster.hosts]
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert cluster.ping(src.ns, dst.address, count=2, interval=0.1), (
                    f"{src.name} -> {dst.name}\n{cluster.logs()}"
                )
    assert cluster.ping(cluster.hosts[0].ns, pods[2].address)  # host -> remote pod, sourced from flannel0's /32


def test_iperf3_tcp_both_ways(cluster):
    a, b = cluster.hosts[0].pods[0], cluster.hosts[1].pods[0]
    assert cluster.iperf3(a, b, 2)["end"]["sum_received"]["bytes"] > 1_000_000
    assert cluster.iperf3(a, b, 2, "-R")["end"]["sum_received"]["bytes"] > 1_000_000
    assert (
        metric(cluster.hosts[0].ns, "flannel_udp_peer_bytes_total", peer=str(cluster.hosts[1].address), direction="tx")
        > 1_000_000
    )
    # With TUN offloads the sender reads TCP super-packets and the receiver glues segments back (both directions ran).
    offloaded = "TUN off" not in cluster.node_log(cluster.hosts[0])
    for host in cluster.hosts[:2]:
        assert (metric(host.ns, "flannel_udp_io_calls_total", kind="tso_reads") > 0) == offloaded
        assert (metric(host.ns, "flannel_udp_io_calls_total", kind="coalesced_writes") > 0) == offloaded


def test_health_endpoints(cluster):
    ns = cluster.hosts[0].ns
    assert http_get(ns, "/healthz") == (200, "flanneld is running\n")
    assert http_get(ns, "/readyz") == (200, "flanneld is ready\n")
    assert http_get(ns, "/nope")[0] == 404
    assert metric(ns, "flannel_udp_routes") == 2
    # The fast path's own table: each peer's subnet to its public IP, as the leases say.
    for peer in cluster.hosts[1:]:
        subnet = ipaddress.ip_interface(peer.subnet_env()["FLANNEL_SUBNET"]).network
        assert metric(ns, "flannel_udp_route", subnet=str(subnet), peer=str(peer.address), port="8285") == 1
    assert 86000 < metric(ns, "flannel_lease_expiry_seconds") <= 86400


def test_stopped_node_becomes_net_unreachable_and_late_joiner_is_reachable(cluster):
    gone = cluster.hosts[2]
    subnet = ipaddress.ip_interface(gone.subnet_env()["FLANNEL_SUBNET"]).network
    assert cluster.stop_node(gone) == 0
    # Its lease outlives it (as upstream) until deleted or expired; an operator deletes it here.
    in_ns(gone.ns, sys.executable, "-m", "flannel_udp", "leases", "delete", str(subnet), *cluster.store_args())
    src = cluster.hosts[0].pods[0]

    def unreachable():
        # ICMP errors about ICMP are suppressed (as upstream), so probe with UDP; IP_RECVERR surfaces the soft error.
        out = in_ns(src.ns, sys.executable, "-c", UDP_PROBE, str(gone.pods[0].address), check=False).stdout
        return "Network is unreachable" in out

    assert wait_for(unreachable, 2.0), cluster.logs()

    late = cluster.add_host()
    cluster.start_node(late)
    late_pod = cluster.add_pod(late)
    assert wait_for(lambda: cluster.ping(src.ns, late_pod.address, timeout=0.3), 2.0), cluster.logs()


UDP_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
s.settimeout(0.5)
s.connect((sys.argv[1], 9))
s.send(b"probe")
try:
    s.recv(100)
except OSError as e:
    print(e)
"""


HOSTILE = r"""
import socket, sys, os, struct
target, port, own_src, victim_src = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def ip(src, dst, payload=b"x" * 20, ttl=64, version=4, ihl=5, total=None):
    total = total if total is not None else 20 + len(payload)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total, 1, 0, ttl, 17, 0,
                                socket.inet_aton(src), socket.inet_aton(dst)))
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr) + payload

dst = sys.argv[5]
cases = {
    "short": b"\x45\x00",
    "not_ipv4": b"\x60" + bytes(59),
    "bad_header": ip(own_src, dst, ihl=3),
    "bad_length": ip(own_src, dst, total=200),
    "random": os.urandom(300),
    "spoofed_source": ip(victim_src, dst),
}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for name, data in cases.items():
    for _ in range(5):
        s.sendto(data, (target, port))
stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
stranger.bind(("198.18.0.200", 0))
for _ in range(5):
    stranger.sendto(ip(own_src, dst), (target, port))  # unknown_peer
"""


def test_hostile_datagrams_are_dropped_and_counted(cluster):
    attacker, target, victim = cluster.hosts[2], cluster.hosts[0], cluster.hosts[1]
    in_ns(attacker.ns, "ip", "addr", "add", "198.18.0.200/24", "dev", "eth0")
    attacker_pod, victim_pod, target_pod = attacker.pods[0], victim.pods[0], target.pods[0]
    assert cluster.ping(attacker.ns, target.address)  # the underlay neighbour is resolved before the burst
    in_ns(
        attacker.ns,
        sys.executable,
        "-c",
        HOSTILE,
        str(target.address),
        "8285",
        str(attacker_pod.address),
        str(victim_pod.address),
        str(target_pod.address),
    )
    ns = target.ns

    def drops(reason):
        return metric(ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun", reason=reason)

    assert wait_for(lambda: metric(ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun") >= 35, 5), http_get(
        ns, "/metrics"
    )[1]
    assert drops("unknown_peer") == 5, http_get(ns, "/metrics")[1]
    # The 5 random datagrams land under one of the structural reasons, so those are at least 5 each.
    for reason in ("short", "not_ipv4", "bad_header", "bad_length"):
        assert drops(reason) >= 5, reason
    assert drops("spoofed_source") == 5
    assert metric(ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun") == 35
    for host in cluster.hosts:
        assert host.process.poll() is None
    assert cluster.ping(attacker_pod.ns, target_pod.address)


FLOOD = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(bytes(60000), (sys.argv[1], int(sys.argv[2])))
"""


def test_datagrams_lost_in_a_full_socket_buffer_are_counted(cluster):
    """While the node is frozen its socket buffer overflows; every datagram sent is then either received by the pump or
    counted as dropped by the kernel, on /metrics."""
    target, sender = cluster.hosts[0], cluster.hosts[1]
    sent = 400  # 24 MB: three times the socket's receive buffer

    def received():
        return metric(target.ns, "flannel_udp_packets_total", stage="udp_received")

    def socket_drops():
        return metric(
            target.ns, "flannel_udp_dropped_packets_total", direction="udp_to_tun", reason="socket_receive_buffer"
        )

    before = received() + socket_drops()
    target.process.send_signal(signal.SIGSTOP)
    try:
        in_ns(sender.ns, sys.executable, "-c", FLOOD, str(target.address), "8285", str(sent), timeout=60)
    finally:
        target.process.send_signal(signal.SIGCONT)
    assert wait_for(lambda: received() + socket_drops() - before == sent, 10), (received(), socket_drops(), before)
    assert socket_drops() > 0
    assert cluster.ping(sender.pods[0].ns, target.pods[0].address)


def test_udp_priority_runs_the_packet_thread_real_time(bed):
    """-udp-priority N: the packet threads (and only they) are SCHED_FIFO at N; with -udp-busy-poll beside it, traffic
    flows as usual."""
    bed.start_cluster("--udp-priority=7", "--udp-busy-poll=50", "--udp-workers=2")
    host = bed.hosts[0]
    assert "Packet thread runs at real-time priority 7 (SCHED_FIFO)" in bed.node_log(host)
    assert "Packet thread keeps polling 50 µs after each burst" in bed.node_log(host)
    tids = [int(t) for t in os.listdir(f"/proc/{host.process.pid}/task")]
    realtime = [t for t in tids if os.sched_getscheduler(t) == os.SCHED_FIFO]
    assert len(realtime) == 2 and all(os.sched_getparam(t).sched_priority == 7 for t in realtime)
    assert bed.ping(bed.hosts[1].pods[0].ns, host.pods[0].address)


def test_sigterm_under_traffic_ends_the_node_within_5_seconds(bed):
    bed.start_cluster()
    sender, receiver = bed.hosts[0], bed.hosts[1]
    server = bed.popen(receiver.pods[0].ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: "5201" in in_ns(receiver.pods[0].ns, "ss", "-ltn").stdout, 3)
    client = bed.popen(
        sender.pods[0].ns,
        "iperf3",
        "-c",
        str(receiver.pods[0].address),
        "-t",
        "8",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)  # the stream runs at full speed through both pumps
    for host in (receiver, sender):
        host.process.send_signal(signal.SIGTERM)
    for host in (receiver, sender):
        assert host.process.wait(5) == 0, bed.node_log(host)
        assert in_ns(host.ns, "ip", "link", "show", "flannel0", check=False).returncode != 0
    for process in (client, server):
        process.kill()
        process.wait()


def test_sigterm_removes_flannel0_and_restart_keeps_the_subnet(cluster):
    host = cluster.hosts[1]
    before = host.subnet_env()["FLANNEL_SUBNET"]
    assert cluster.stop_node(host) == 0
    assert in_ns(host.ns, "ip", "link", "show", "flannel0", check=False).returncode != 0
    assert "Exiting cleanly" in cluster.node_log(host)
    cluster.start_node(host)
    assert host.subnet_env()["FLANNEL_SUBNET"] == before
    assert cluster.ping(cluster.hosts[0].pods[0].ns, host.pods[0].address, count=3, interval=0.2)


def test_revoked_own_lease_ends_the_daemon_with_status_0(cluster):
    host = cluster.hosts[0]
    subnet = ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network
    in_ns(host.ns, sys.executable, "-m", "flannel_udp", "leases", "delete", str(subnet), *cluster.store_args())
    assert host.process.wait(5) == 0
    assert "Lease has been revoked" in cluster.node_log(host)
    assert in_ns(host.ns, "ip", "link", "show", "flannel0", check=False).returncode != 0


def test_short_lease_is_renewed_before_it_expires(bed):
    host = bed.hosts[0]
    bed.start_node(host, "--lease-ttl=3")
    time.sleep(4.5)
    assert host.process.poll() is None, bed.node_log(host)
    out = in_ns(host.ns, sys.executable, "-m", "flannel_udp", "leases", "--lease-file", bed.lease_file).stdout
    assert str(host.address) in out and "Lease renewed" in bed.node_log(host)


def run_node_expecting_failure(bed, host, *extra, iface="eth0") -> str:
    line = bed.run_node_expecting_failure(host, *extra, iface=iface)
    assert in_ns(host.ns, "ip", "link", "show", "flannel0", check=False).returncode != 0  # nothing left configured
    return line


def test_missing_interface_is_one_clear_line(bed):
    line = run_node_expecting_failure(bed, bed.hosts[0], iface="eth9")
    assert line.startswith("error: Failed to find interface to use") and "eth9" in line


def test_occupied_port_is_one_clear_line(bed):
    host = bed.hosts[0]
    blocker = bed.popen(
        host.ns,
        sys.executable,
        "-c",
        "import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('{host.address}', 8285)); time.sleep(60)",
    )
    assert wait_for(lambda: ":8285 " in in_ns(host.ns, "ss", "-uln").stdout, 5)
    line = run_node_expecting_failure(bed, host)
    assert line == f"error: UDP port 8285 on {host.address} is already in use (is another flanneld running?)"
    blocker.kill()
    out = in_ns(
        host.ns, sys.executable, "-m", "flannel_udp", "leases", "--lease-file", bed.lease_file, check=False
    ).stdout
    assert str(host.address) not in out  # the port is checked before a lease is taken


def test_occupied_healthz_port_is_one_clear_line(bed):
    host = bed.hosts[0]
    blocker = bed.popen(
        host.ns,
        sys.executable,
        "-c",
        "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 18081)); s.listen(); time.sleep(60)",
    )
    assert wait_for(lambda: ":18081 " in in_ns(host.ns, "ss", "-tln").stdout, 5)
    line = run_node_expecting_failure(bed, host, "--healthz-port", "18081")
    assert line == "error: cannot serve /healthz on 0.0.0.0:18081: Address already in use (-healthz-ip, -healthz-port)"
    blocker.kill()
    assert "flannel0" not in in_ns(host.ns, "ip", "link").stdout


def test_exhausted_network_is_one_clear_line(bed):
    bed.write_config({"Network": "10.5.0.0/28"})  # 3 subnets
    for host in bed.hosts:
        bed.start_node(host)
    late = bed.add_host()
    line = run_node_expecting_failure(bed, late)
    assert line == "error: out of subnets"


def leases_of(bed) -> str:
    return in_ns(
        bed.hosts[0].ns, sys.executable, "-m", "flannel_udp", "leases", "--lease-file", bed.lease_file, check=False
    ).stdout


def test_unwritable_subnet_file_is_one_line_and_a_new_node_leaves_nothing_behind(bed, tmp_path):
    host = bed.hosts[0]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    line = run_node_expecting_failure(bed, host, f"--subnet-file={not_a_dir}/subnet.env")
    assert line == f"error: cannot write the subnet file {not_a_dir}/subnet.env: Not a directory"
    assert "Start-up failed: released lease" in bed.node_log(host)
    assert str(host.address) not in leases_of(bed)  # the lease it allocated is given back
    assert in_ns(host.ns, "iptables", "-S", "FLANNEL-FWD", check=False).returncode != 0  # its rules are gone


def test_failed_restart_keeps_the_lease_and_rules_of_the_earlier_run(bed, tmp_path):
    host = bed.hosts[0]
    bed.start_node(host)
    subnet = host.subnet_env()["FLANNEL_SUBNET"]
    assert bed.stop_node(host) == 0
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    run_node_expecting_failure(bed, host, f"--subnet-file={not_a_dir}/subnet.env")
    assert "Start-up failed" not in bed.node_log(host)
    assert str(ipaddress.ip_interface(subnet).network) in leases_of(bed)
    assert in_ns(host.ns, "iptables", "-S", "FLANNEL-FWD", check=False).returncode == 0


def test_underlay_mtu_too_small_is_one_line_before_a_lease_is_taken(bed):
    host = bed.hosts[0]
    in_ns(host.ns, "ip", "link", "set", "eth0", "mtu", "90")
    line = run_node_expecting_failure(bed, host)
    assert line == (
        "error: the MTU of eth0 (90) leaves 62 bytes for flannel0 after the 28-byte UDP encapsulation, "
        "below IPv4's minimum of 68"
    )
    assert str(host.address) not in leases_of(bed)


def test_unwritable_lease_file_is_one_clear_line(bed):
    host = bed.hosts[0]
    line = bed.run_node_expecting_failure(host, "--lease-file=/proc/flannel/leases.db")
    assert re.match(r"error: cannot use lease file /proc/flannel/leases.db: ", line)


# Linux before 6.11 refuses a UDP GSO send with EIO when the egress device cannot checksum-offload; this kernel
# checksums in software instead, so the refusal is played by a shim in front of libc's sendmmsg (preloaded into the
# node): every message that carries UDP_SEGMENT fails with EIO, as on such a kernel; all others go to the kernel.
REFUSE_GSO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
int sendmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags) {
    static int (*real)(int, struct mmsghdr *, unsigned int, int);
    if (!real) real = dlsym(RTLD_NEXT, "sendmmsg");
    for (unsigned int i = 0; i < n; i++)
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&vec[i].msg_hdr); c; c = CMSG_NXTHDR(&vec[i].msg_hdr, c))
            if (c->cmsg_level == IPPROTO_UDP && c->cmsg_type == UDP_SEGMENT) {
                if (i > 0) return i;
                errno = EIO;
                return -1;
            }
    return real(fd, vec, n, flags);
}
"""


def test_gso_refused_by_the_kernel_is_logged_when_it_happens_and_traffic_goes_on(bed, tmp_path):
    """The pump turns GSO off for good on EIO, resends the batch datagram by datagram, and the node says so in its log
    at once (no /metrics scrape needed)."""
    source, shim = tmp_path / "refuse_gso.c", tmp_path / "refuse_gso.so"
    source.write_text(REFUSE_GSO_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], check=True, timeout=60)
    sender, receiver = bed.hosts[:2]
    bed.start_node(sender, env={"LD_PRELOAD": str(shim)})
    bed.start_node(receiver)
    a, b = bed.add_pod(sender), bed.add_pod(receiver)
    report = bed.iperf3(a, b, 1)
    assert report["end"]["sum_received"]["bytes"] > 1_000_000, bed.logs()
    line = "UDP GSO refused by the kernel (Input/output error); sending one datagram per packet from now on"
    assert wait_for(lambda: line in bed.node_log(sender), 5), bed.logs()
    assert bed.node_log(sender).count("UDP GSO refused") == 1
