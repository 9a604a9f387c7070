"""External interface choice as upstream (pkg/ipmatch match_test.go, reference §9.6), run inside a fresh namespace."""
import json
import sys

import pytest

from flannel_udp.testbed import in_ns

CHOOSE = r"""
import json, sys
from pyroute2 import IPRoute
from flannel_udp.net import iface
args = json.loads(sys.argv[1])
with IPRoute() as ipr:
    try:
        ext = iface.choose(ipr, args.get("iface", []), args.get("regex", []), args.get("reach", ""), args.get("public", ""))
        print(json.dumps([ext.name, str(ext.iface_addr), str(ext.ext_addr), ext.mtu]))
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
    assert choose(ns, regex=[r"172\.16\.30\.\d+"], public="172.16.31.200")[:3] == ["dummy0", "172.16.30.18", "172.16.31.200"]
    assert choose(ns, reach="172.16.33.7")[:2] == ["dummy0", "172.16.32.100"]
    assert choose(ns, iface=["dummy0"])[3] == 1400  # the MTU comes from the chosen interface


def test_first_working_candidate_wins_and_failures_are_upstreams_messages(dummy_ns):
    ns = dummy_ns
    assert choose(ns, iface=["nope0", "eth0"])[:2] == ["eth0", "198.18.0.1"]
    error = choose(ns, iface=["nope0"], regex=["zzz"])
    assert error[0] == "error" and error[1].startswith(
        "Failed to find interface to use that matches the interfaces and/or regexes provided")
    assert choose(ns, public="203.0.113.9") == ["error", "Failed to find any valid interface to use"]
    assert choose(ns, public="not-an-ip") == ["error", "invalid public IP address: not-an-ip"]
    assert choose(ns) == ["error", "unable to find default route"]
    in_ns(ns, "ip", "route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
    assert choose(ns)[:2] == ["eth0", "198.18.0.1"]
