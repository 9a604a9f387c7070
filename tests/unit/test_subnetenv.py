"""subnet.env: upstream's lines and order, atomic replacement, exact mode, and reading back the previous subnet."""

import ipaddress
import os
import threading

import pytest

from flannel_udp.subnet import subnetenv
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.lease import Lease, LeaseAttrs
from flannel_udp.subnet.manager import previous_subnet_from


def test_render_matches_upstream_sample():
    cfg = load_config('{"Network": "10.1.0.0/16"}')
    lease = Lease(ipaddress.ip_network("10.1.74.0/24"), LeaseAttrs(ipaddress.IPv4Address("198.18.0.1")))
    assert subnetenv.render(cfg, lease, 1472, False) == (
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )


def test_write_is_atomic_and_mode_0644(tmp_path):
    path = str(tmp_path / "run" / "flannel" / "subnet.env")
    contents = [f"FLANNEL_SUBNET=10.1.{i}.1/24\n" + "X" * 5000 + "\n" for i in range(2)]
    subnetenv.write_atomically(path, contents[0])
    stop = threading.Event()
    seen_bad = []

    def reader():
        while not stop.is_set():
            with open(path) as f:
                data = f.read()
            if data not in contents:
                seen_bad.append(data)

    old_umask = os.umask(0o077)
    try:
        t = threading.Thread(target=reader)
        t.start()
        for i in range(300):
            subnetenv.write_atomically(path, contents[i % 2])
        stop.set()
        t.join()
    finally:
        os.umask(old_umask)
    assert not seen_bad
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [n for n in os.listdir(os.path.dirname(path))] == ["subnet.env"]  # no temp files left


def test_previous_subnet_read_back(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24,not-a-cidr\nFLANNEL_MTU=1472\n")
    assert previous_subnet_from(subnetenv.read(str(path))) == (ipaddress.ip_network("10.244.1.0/24"), None)
    path.write_text("FLANNEL_SUBNET=10.244.1.0/24,not-a-cidr,10.244.2.0/24\n")
    values = subnetenv.read(str(path))
    assert values["FLANNEL_SUBNET"] == [ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("10.244.2.0/24")]
    assert previous_subnet_from(values) == (None, None)  # more than one valid value counts as none, as upstream
    path.write_text("FLANNEL_SUBNET=garbage\n")
    assert previous_subnet_from(subnetenv.read(str(path))) == (None, None)
    assert subnetenv.read(str(tmp_path / "absent")) == {}


def test_the_cni_plugin_reads_subnet_env_as_upstreams_plugin_does():
    """upstream cni-plugin loadFlannelSubnetEnv: exact names, networks as comma lists (duplicates dropped), an
    unsigned 32-bit MTU, masquerade only for `true`; anything else on a line of its own is ignored."""
    env = subnetenv.parse(
        "# written by hand\nFLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=1\nexport FLANNEL_MTU=9\nOTHER=x\n"
    )
    assert env.networks == (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("10.245.0.0/16"))
    assert env.subnet == ipaddress.ip_interface("10.244.7.1/24") and env.mtu == 1450
    assert env.ipmasq is False  # `1` is not `true` to upstream's plugin
    assert env.missing() == [] and subnetenv.parse("FLANNEL_IPMASQ=true\n").ipmasq is True
    assert subnetenv.parse("").missing() == [
        "FLANNEL_NETWORK",
        "FLANNEL_IPV6_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_IPV6_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
    ]
    ipv6_only = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
    assert subnetenv.parse(ipv6_only + "FLANNEL_MTU=1280\nFLANNEL_IPMASQ=false\n").missing() == []
    lone_subnet = subnetenv.parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n")
    assert lone_subnet.missing() == ["FLANNEL_MTU", "FLANNEL_IPMASQ", "FLANNEL_IPV6_NETWORK"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("FLANNEL_SUBNET=10.244.7.1\n", "invalid CIDR address: 10.244.7.1"),
        ("FLANNEL_NETWORK=10.244.0.0/16,nope\n", "invalid CIDR address: nope"),
        ("FLANNEL_SUBNET= 10.244.7.1/24\n", "invalid CIDR address:  10.244.7.1/24"),
        ("FLANNEL_MTU=-1\n", "invalid FLANNEL_MTU '-1'"),
        ("FLANNEL_MTU=4294967296\n", "invalid FLANNEL_MTU '4294967296'"),
        ("FLANNEL_MTU=١٤٥٠\n", "invalid FLANNEL_MTU '١٤٥٠'"),
    ],
)
def test_a_value_the_plugin_cannot_use_is_named(text, message):
    with pytest.raises(subnetenv.SubnetEnvError) as info:
        subnetenv.parse(text)
    assert str(info.value) == message
