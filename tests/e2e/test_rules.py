"""Traffic rules inside a node's namespace, compared with upstream's texts (pkg/trafficmngr/iptables/iptables_test.go):
masquerade and forward chains through iptables-restore, resync, stale rules of a previous network, nftables mode, the
blackhole route, and `flannel-udp cleanup`."""

import ipaddress

from testbed.cluster import in_ns, wait_for

MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'


def own_subnet(host) -> str:
    return str(ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"]).network)


def expected_nat(net: str, pod: str) -> str:
    return (
        "\n".join(
            [
                "-P PREROUTING ACCEPT",
                "-P INPUT ACCEPT",
                "-P OUTPUT ACCEPT",
                "-P POSTROUTING ACCEPT",
                "-N FLANNEL-POSTRTG",
                f"-A POSTROUTING {MASQ} -j FLANNEL-POSTRTG",
                f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
                f"-A FLANNEL-POSTRTG -s {pod} -d {net} {MASQ} -j RETURN",
                f"-A FLANNEL-POSTRTG -s {net} -d {pod} {MASQ} -j RETURN",
                f"-A FLANNEL-POSTRTG ! -s {net} -d {pod} {MASQ} -j RETURN",
                f"-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully",
                f"-A FLANNEL-POSTRTG ! -s {net} -d {net} {MASQ} -j MASQUERADE --random-fully",
            ]
        )
        + "\n"
    )


def expected_filter(net: str) -> str:
    return (
        "\n".join(
            [
                "-P INPUT ACCEPT",
                "-P FORWARD ACCEPT",
                "-P OUTPUT ACCEPT",
                "-N FLANNEL-FWD",
                f"-A FORWARD {FWD} -j FLANNEL-FWD",
                f"-A FLANNEL-FWD -s {net} {FWD} -j ACCEPT",
                f"-A FLANNEL-FWD -d {net} {FWD} -j ACCEPT",
            ]
        )
        + "\n"
    )


def test_masquerade_and_forward_rules_read_as_upstreams(bed):
    host = bed.hosts[0]
    bed.start_node(host, "-ip-masq", "-iptables-resync=1")
    assert "FLANNEL_IPMASQ=true" in open(host.subnet_file).read()
    assert in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout == expected_nat("10.244.0.0/16", own_subnet(host))
    assert in_ns(host.ns, "iptables", "-S").stdout == expected_filter("10.244.0.0/16")
    # Someone removes a rule: the resync puts the whole set back, in order.
    in_ns(
        host.ns,
        "iptables",
        "-t",
        "nat",
        "-D",
        "FLANNEL-POSTRTG",
        "-m",
        "mark",
        "--mark",
        "0x4000/0x4000",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "RETURN",
    )
    assert wait_for(
        lambda: in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout == expected_nat("10.244.0.0/16", own_subnet(host)),
        3.0,
    ), bed.node_log(host)
    # A pod behind a masquerading node still reaches a pod on another node with its own address.
    other = bed.hosts[1]
    bed.start_node(other, "-ip-masq")
    pod, far = bed.add_pod(host), bed.add_pod(other)
    assert wait_for(lambda: bed.ping(pod.ns, far.address, timeout=0.5), 5), bed.logs()


def test_restart_with_another_network_removes_the_stale_rules(bed):
    host = bed.hosts[0]
    bed.start_node(host, "-ip-masq")
    old_pod = own_subnet(host)
    bed.stop_node(host)
    bed.write_config({"Network": "10.245.0.0/16"})
    bed.start_node(host, "-ip-masq")
    assert in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout == expected_nat("10.245.0.0/16", own_subnet(host))
    assert old_pod not in in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout
    assert in_ns(host.ns, "iptables", "-S").stdout == expected_filter("10.245.0.0/16")


def test_nftables_mode_has_upstreams_tables_and_no_iptables_chains(bed):
    bed.write_config({"Network": "10.244.0.0/16", "EnableNFTables": True})
    host = bed.hosts[0]
    bed.start_node(host, "-ip-masq")
    pod, net = own_subnet(host), "10.244.0.0/16"
    ruleset = in_ns(host.ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout
    for line in (
        'comment "rules for flannel-ipv4"',
        "type filter hook forward priority filter; policy accept;",
        f"ip saddr {net} accept",
        f"ip daddr {net} accept",
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark 0x00004000 return",
        f"ip saddr {pod} ip daddr {net} return",
        f"ip saddr {net} ip daddr {pod} return",
        f"ip saddr != {pod} ip daddr {net} return",
        f"ip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random",
        f"ip saddr != {net} ip daddr {net} masquerade fully-random",
    ):
        assert line in ruleset, (line, ruleset)
    assert in_ns(host.ns, "nft", "list", "table", "ip6", "flannel-ipv6", check=False).returncode == 0
    assert "FLANNEL" not in in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout


def test_blackhole_route_and_cleanup(bed):
    host = bed.hosts[0]
    bed.start_node(host, "-ip-masq", "-ip-blackhole-route", "-iptables-resync=1")
    subnet = own_subnet(host)
    assert wait_for(lambda: subnet in in_ns(host.ns, "ip", "route", "show", "type", "blackhole").stdout, 3.0)
    bed.add_pod(host)
    assert bed.stop_node(host) == 0
    # Upstream leaves rules, the blackhole route and cni0 behind on exit; cleanup removes them and says so.
    assert "FLANNEL-POSTRTG" in in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout
    out = bed.cli(host.ns, "cleanup", "--subnet-file", host.subnet_file).stdout
    for what in ("cni0", "FLANNEL-POSTRTG", "FLANNEL-FWD", f"blackhole {subnet}"):
        assert what in out, out
    assert (
        "FLANNEL" not in in_ns(host.ns, "iptables", "-t", "nat", "-S").stdout + in_ns(host.ns, "iptables", "-S").stdout
    )
    assert in_ns(host.ns, "ip", "link", "show", "cni0", check=False).returncode != 0
    assert subnet not in in_ns(host.ns, "ip", "route", "show", "type", "blackhole").stdout
    assert "nothing" in bed.cli(host.ns, "cleanup", "--subnet-file", host.subnet_file).stdout  # idempotent


def test_vxlan_device_is_cleaned_up_too(bed):
    bed.write_config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    host = bed.hosts[0]
    bed.start_node(host)
    bed.stop_node(host)
    out = bed.cli(host.ns, "cleanup", "--subnet-file", host.subnet_file).stdout
    assert "flannel.1" in out and in_ns(host.ns, "ip", "link", "show", "flannel.1", check=False).returncode != 0
