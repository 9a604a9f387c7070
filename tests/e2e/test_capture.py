"""`flannel-udp capture` on a running udp-backend cluster: decoded lines for pod traffic, verdicts for hostile
datagrams from the fast path's own checks, a pcap that tcpdump reads, and one-line errors."""

import ipaddress
import subprocess
import sys

import pytest
from test_udp_backend import HOSTILE

from testbed.cluster import in_ns, read_until, wait_for


@pytest.fixture
def udp_cluster(bed):
    for host in bed.hosts:
        bed.start_node(host)
        bed.add_pod(host)
    assert all_pods_reach_each_other(bed), bed.logs()  # every node has every lease
    yield bed


def all_pods_reach_each_other(bed, hosts=None, timeout: float = 5) -> bool:
    pods = [host.pods[0] for host in hosts or bed.hosts]
    return wait_for(
        lambda: all(bed.ping(a.ns, b.address, timeout=0.3) for a in pods for b in pods if a is not b), timeout
    )


def start_capture(bed, host, *args):
    process = bed.popen(
        host.ns,
        sys.executable,
        "-m",
        "flannel_udp",
        "capture",
        "--lease-file",
        bed.lease_file,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.early_stderr = read_until(process, "listening on")  # from here on nothing is missed
    return process


def finish(process, timeout=20) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, getattr(process, "early_stderr", "") + err
    return out


def subnet(host) -> str:
    return str(ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network)


def test_pod_ping_and_tcp_are_decoded_with_node_subnets(udp_cluster, tmp_path):
    bed = udp_cluster
    h1, h2 = bed.hosts[0], bed.hosts[1]
    p1, p2 = h1.pods[0], h2.pods[0]
    pcap = tmp_path / "inner.pcap"
    capture = start_capture(
        bed, h2, "--iface", "eth0", "--proto", "icmp", "--count", "4", "--duration", "15", "--write", str(pcap)
    )
    assert bed.ping(p1.ns, p2.address, count=2, interval=0.2)
    out = finish(capture)
    lines = [line for line in out.splitlines() if " udp: " in line]
    assert len(lines) == 4, out
    request = next(line for line in lines if "echo-request" in line)
    assert (
        f"{h1.address} [{subnet(h1)}] > {h2.address} [{subnet(h2)}] udp: ICMP {p1.address} > {p2.address} echo-request"
        in request
    )
    assert request.endswith(" ok") and "ttl 62" in request  # 64, less the host's forwarding, less the pump's
    assert any(f"ICMP {p2.address} > {p1.address} echo-reply" in line for line in lines)
    assert f"ICMP {p1.address} > {p2.address}" in out.split("FLOW")[1] and "ok" in out.split("VERDICT")[1]
    # The pcap holds the inner packets (DLT_RAW): tcpdump reads them as plain ICMP.
    dump = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, timeout=20).stdout
    assert f"{p1.address} > {p2.address}: ICMP echo request" in dump

    capture = start_capture(
        bed, h2, "--iface", "eth0", "--pod", str(p2.address), "--proto", "tcp", "--count", "3", "--duration", "15"
    )
    assert bed.iperf3(p1, p2, 1)
    out = finish(capture)
    assert f"TCP {p1.address}:" in out and f" > {p2.address}:5201 [S]" in out and "DROP" not in out


def test_hostile_datagrams_get_the_data_planes_verdicts(udp_cluster):
    bed = udp_cluster
    attacker, target, victim = bed.hosts[2], bed.hosts[0], bed.hosts[1]
    in_ns(attacker.ns, "ip", "addr", "add", "198.18.0.200/24", "dev", "eth0")
    assert bed.ping(attacker.ns, target.address)
    capture = start_capture(bed, target, "--iface", "eth0", "--peer", str(attacker.address), "--duration", "6")
    capture2 = start_capture(
        bed, target, "--iface", "eth0", "--peer", "198.18.0.200", "--count", "5", "--duration", "6"
    )
    in_ns(
        attacker.ns,
        sys.executable,
        "-c",
        HOSTILE,
        str(target.address),
        "8285",
        str(attacker.pods[0].address),
        str(victim.pods[0].address),
        str(target.pods[0].address),
    )
    out = finish(capture)
    verdicts = out.split("VERDICT")[1]
    assert "spoofed_source" in verdicts and "short" in verdicts and "bad_length" in verdicts, out
    assert "DROP spoofed_source" in out and f"UDP {victim.pods[0].address}:" in out
    out2 = finish(capture2)
    assert out2.count("DROP unknown_peer") == 5, out2
    assert all(host.process.poll() is None for host in bed.hosts)


def test_capture_on_flannel0_and_from_a_pcap_file(udp_cluster, tmp_path):
    bed = udp_cluster
    h1, h2 = bed.hosts[0], bed.hosts[1]
    outer = tmp_path / "outer.pcap"
    tun = start_capture(bed, h1, "--iface", "flannel0", "--proto", "icmp", "--count", "2", "--duration", "15")
    underlay = start_capture(
        bed, h1, "--iface", "eth0", "--count", "2", "--duration", "15", "--write", str(outer), "--outer"
    )
    assert bed.ping(h1.pods[0].ns, h2.pods[0].address)
    tun_out = finish(tun)
    h2_subnet = ipaddress.ip_interface(h2.subnet_env()["FLANNEL_SUBNET"]).network
    leaving = f"flannel0 > {h2.address} [{h2_subnet}] ICMP {h1.pods[0].address} > {h2.pods[0].address} echo-request"
    assert leaving in tun_out  # with the node it is sent to
    assert f"flannel0 ICMP {h2.pods[0].address} > {h1.pods[0].address} echo-reply" in tun_out
    finish(underlay)
    offline = subprocess.run(
        [sys.executable, "-m", "flannel_udp", "capture", "--read", str(outer), "--lease-file", bed.lease_file],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert offline.returncode == 0 and "echo-request" in offline.stdout and f"[{subnet(h1)}]" in offline.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iface", "eth9"], "error: no interface named eth9"),
        (["--read", "/nonexistent.pcap"], "error: cannot read /nonexistent.pcap: no such file"),
        (
            ["--iface", "lo", "--filter", "udp port"],
            "error: bad filter '(udp dst port 8285 or udp dst port 8472 or udp port 51820 or udp port 51821) and "
            "(udp port)'",
        ),
        ([], "error: give exactly one source"),
        (["--iface", "lo", "--pod", "10.244.1"], "error: --pod is not an IP address: 10.244.1"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"not a pcap at all")
    result = subprocess.run(
        [sys.executable, "-m", "flannel_udp", "capture", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "flannel_udp", "capture", "--read", str(garbage)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot capture on {garbage}"
    )


def test_vxlan_traffic_is_decoded_too(bed):
    bed.write_config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    for host in bed.hosts[:2]:
        bed.start_node(host)
        bed.add_pod(host)
    h1, h2 = bed.hosts[0], bed.hosts[1]
    assert all_pods_reach_each_other(bed, bed.hosts[:2]), bed.logs()
    capture = start_capture(bed, h2, "--iface", "eth0", "--proto", "icmp", "--count", "2", "--duration", "15")
    assert bed.ping(h1.pods[0].ns, h2.pods[0].address)
    out = finish(capture)
    assert f"vxlan vni 1: ICMP {h1.pods[0].address} > {h2.pods[0].address} echo-request" in out, out


def test_dual_stack_vxlan_over_ipv6_is_decoded_with_ipv6_subnets(bed):
    """Dual stack: IPv6 pod traffic rides flannel-v6.1 over the IPv6 underlay; capture shows it with the nodes' IPv6
    subnets, and --pod / --proto icmp select it by its IPv6 address and ICMPv6."""
    bed.write_config(
        {
            "Network": "10.244.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": "fd00:10:244::/56",
            "Backend": {"Type": "vxlan"},
        }
    )
    for host in bed.hosts[:2]:
        bed.start_node(host)
        bed.add_pod(host)
    h1, h2 = bed.hosts[0], bed.hosts[1]
    p1, p2 = h1.pods[0], h2.pods[0]
    assert all_pods_reach_each_other(bed, bed.hosts[:2]), bed.logs()
    capture = start_capture(
        bed, h2, "--iface", "eth0", "--pod", str(p2.address6), "--proto", "icmp", "--count", "2", "--duration", "15"
    )
    assert bed.ping(p1.ns, p2.address6)
    out = finish(capture)
    sub1 = h1.subnet_env()["FLANNEL_IPV6_SUBNET"].replace("::1/", "::/")
    assert f"{h1.address6} [{sub1}] > {h2.address6} [" in out, out
    assert f"vxlan vni 1: ICMPv6 {p1.address6} > {p2.address6} echo-request (type 128 code 0)" in out, out
    assert "DROP" not in out and str(p1.address) not in out
