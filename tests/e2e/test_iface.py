"""External interface choice as upstream (pkg/ipmatch/match_test.go), run inside a fresh namespace."""

import json
import sys

import pytest

from testbed.cluster import in_ns

CHOOSE = r"""
import json, sys
from pyroute2 import IPRoute
from flannel_udp.net import iface
args = json.loads(sys.argv[1])
with IPRoute() as ipr:
    try:
        ext = iface.choose(ipr, args.get("iface", []), args.get("regex", []), args.get("reach", ""),
                           args.get("public", ""), args.get("public6", ""), args.get("ipv6", False))
        out = [ext.name, str(ext.iface_addr), str(ext.ext_addr), ext.mtu]
        print(json.dumps(out + [str(ext.iface_addr6), str(ext.ext_addr6)] if args.get("ipv6") else out))
    except iface.InterfaceError as e:
        print(json.dumps(["error", str(e)]))
"""


@pytest.fixture
def dummy_ns(bed):
    ns = bed.hosts[0].ns
    # The kernel here has no dummy driver: a veth pair with both ends up carries the addresses just as well.
    in_ns(ns, "ip", "link", "add", "dummy0", "mtu", "1400", "type", "veth", "peer", "name", "dpeer")
    in_ns(ns, "ip", "link", "set", "dpeer", "up")
    for address in ("1.10.100.1/24", "192.168.200.128/24", "172.16.30.18/24", "172.16.31.200/24", "172.16.32.100/24"):
        in_ns(ns, "ip", "addr", "add", address, "dev", "dummy0")
    in_ns(ns, "ip", "link", "set", "dummy0", "up")
    in_ns(ns, "ip", "route", "add", "172.16.33.0/24", "via", "172.16.32.254", "dev", "dummy0", "onlink")
    return ns


def choose(ns, **args):
    return json.loads(in_ns(ns, sys.executable, "-c", CHOOSE, json.dumps(args)).stdout)


def test_upstream_match_cases(dummy_ns):
    ns = dummy_ns
    assert choose(ns, regex=[r"192\.168\.200\.\d+"])[:2] == ["dummy0", "192.168.200.128"]
    assert choose(ns, regex=[r"dummy\d+"])[:2] == ["dummy0", "1.10.100.1"]
    assert choose(ns, iface=["dummy0"])[:2] == ["dummy0", "1.10.100.1"]
    assert choose(ns, iface=["172.16.30.18"])[:2] == ["dummy0", "172.16.30.18"]
    assert choose(ns, regex=[r"172\.16\.30\.\d+"], public="172.16.31.200")[:3] == [
        "dummy0",
        "172.16.30.18",
        "172.16.31.200",
    ]
    assert choose(ns, reach="172.16.33.7")[:2] == ["dummy0", "172.16.32.100"]
    assert choose(ns, iface=["dummy0"])[3] == 1400  # the MTU comes from the chosen interface


def test_first_working_candidate_wins_and_failures_are_upstreams_messages(dummy_ns):
    ns = dummy_ns
    assert choose(ns, iface=["nope0", "eth0"])[:2] == ["eth0", "198.18.0.1"]
    error = choose(ns, iface=["nope0"], regex=["zzz"])
    assert error[0] == "error" and error[1].startswith(
        "Failed to find interface to use that matches the interfaces and/or regexes provided"
    )
    assert choose(ns, public="203.0.113.9") == ["error", "Failed to find any valid interface to use"]
    assert choose(ns, public="not-an-ip") == ["error", "invalid public IP address: not-an-ip"]
    assert choose(ns) == ["error", "unable to find default route"]
    in_ns(ns, "ip", "route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    assert choose(ns)[:2] == ["eth0", "198.18.0.1"]


def test_dual_stack_takes_the_ipv6_side_from_the_same_interface(dummy_ns):
    ns = dummy_ns
    in_ns(ns, "ip", "-6", "addr", "add", "fd00:1:2::5/64", "dev", "dummy0", "nodad")
    # The interface's first global IPv6 address (link-local ones come after), advertised unless -public-ipv6 says
    # otherwise.
    assert choose(ns, iface=["dummy0"], ipv6=True)[4:] == ["fd00:1:2::5", "fd00:1:2::5"]
    assert choose(ns, iface=["dummy0"], ipv6=True, public6="2001:db8::9")[4:] == ["fd00:1:2::5", "2001:db8::9"]
    assert choose(ns, iface=["eth0"], ipv6=True)[4:] == ["fd00:198:18::1", "fd00:198:18::1"]
    assert choose(ns, iface=["dummy0"], ipv6=True, public6="fd00::zz") == [
        "error",
        "invalid public IPv6 address: fd00::zz",
    ]
    # An -iface that is an IPv6 address must sit on the interface the IPv4 side chose (upstream's message).
    assert choose(ns, iface=["172.16.30.18", "fd00:198:18::1"], ipv6=True) == [
        "error",
        "v6 interface eth0 must be the same with v4 interface dummy0",
    ]
    # Found by -public-ip: the public IPv6 must be on that interface too.
    assert choose(ns, public="172.16.30.18", public6="fd00:1:2::5", ipv6=True)[:2] == ["dummy0", "172.16.30.18"]
    assert choose(ns, public="172.16.30.18", public6="fd00:198:18::1", ipv6=True)[0] == "error"
    # Default routes: both families must leave through one interface.
    in_ns(ns, "ip", "route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    assert choose(ns, ipv6=True) == ["error", "unable to find default route for IPv6"]
    in_ns(ns, "ip", "-6", "route", "add", "default", "via", "fd00:1:2::1", "dev", "dummy0")
    assert choose(ns, ipv6=True) == [
        "error",
        "the IPv6 default route uses dummy0, the IPv4 one eth0: dual stack needs both on one interface",
    ]
    in_ns(ns, "ip", "-6", "route", "replace", "default", "via", "fd00:198:18::fe", "dev", "eth0")
    assert choose(ns, ipv6=True)[4:] == ["fd00:198:18::1", "fd00:198:18::1"]
