"""Subnet keys (upstream subnet_test.go) and the lease JSON, byte for byte."""

import ipaddress

import pytest

from flannel_udp.subnet.lease import LeaseAttrs, LeaseError, lease_from_kv, make_subnet_key, parse_subnet_key


@pytest.mark.parametrize(
    "key,v4,v6",
    [
        ("10.12.13.0-24", "10.12.13.0/24", None),
        ("10.12.13.0-24&fd00:12:13::-56", "10.12.13.0/24", "fd00:12:13::/56"),
    ],
)
def test_subnet_key_round_trip(key, v4, v6):
    sn4, sn6 = parse_subnet_key(key)
    assert str(sn4) == v4 and (str(sn6) if sn6 else None) == v6
    assert make_subnet_key(sn4, sn6) == key


@pytest.mark.parametrize(
    "key",
    [
        "10",
        "10.12.13.0",
        "10.12.13-24",
        "10.12.13.300-24",
        "10.12.13.0-24hi",
        "&2001::-56",
        "10.12.13.0-24&:12:13:-56",
        "10.12.13.0-24&20011::-56",
        "10.12.13.0-24&2001-56",
        "10.12.13.0-24&2001::",
        "10.12.13.0-24&2001::-56hi",
        "255.255.255.255-32",
        "garbage",
        "",
        "10.12.13.0-24\n",
        "10.12.13.0-２４",
    ],
)
def test_bad_subnet_keys_are_ignored(key):
    assert parse_subnet_key(key) is None


def test_full_etcd_path_parses():
    assert str(parse_subnet_key("/coreos.com/network/subnets/10.5.1.0-24")[0]) == "10.5.1.0/24"
    assert parse_subnet_key("10.5.1.0-24&fc00::-64")[1] == ipaddress.ip_network("fc00::/64")


def test_udp_lease_json_is_byte_identical_to_upstream():
    assert LeaseAttrs(ipaddress.IPv4Address("1.2.3.4")).to_json() == '{"PublicIP":"1.2.3.4","PublicIPv6":null}'


def test_vxlan_lease_json_round_trip():
    text = (
        '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    attrs = LeaseAttrs.from_json(text)
    assert attrs.backend_type == "vxlan" and attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert attrs.to_json() == text
    dual = LeaseAttrs.from_json('{"publicip":"10.0.0.5","PublicIPv6":"fc00::1","BackendType":"host-gw"}')
    assert dual.to_json() == '{"PublicIP":"10.0.0.5","PublicIPv6":"fc00::1","BackendType":"host-gw"}'


def test_lease_value_rules():
    assert str(LeaseAttrs.from_json("{}").public_ip) == "0.0.0.0"
    for bad in ['{"PublicIP":""}', '{"PublicIP":"2001:db8::1"}', '{"PublicIP":"x"}', "[]", "", "nope"]:
        with pytest.raises(LeaseError):
            LeaseAttrs.from_json(bad)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("10.5.1.0-24", '{"PublicIP":"192.168.0.1","BackendType":"vxlan"}', ("10.5.1.0/24", None, "vxlan")),
        (
            "10.5.1.0-24&fc00::-64",
            '{"PublicIP":"192.168.0.1","PublicIPv6":"fc00::1"}',
            ("10.5.1.0/24", "fc00::/64", ""),
        ),
        ("10.5.1.0-24", '{"PublicIP":"2001:db8::1"}', 'lease PublicIP is not an IPv4 address: "2001:db8::1"'),
        ("not-a-subnet", "{}", "bad subnet key 'not-a-subnet'"),
        ("", "", "bad subnet key ''"),
    ],
)
def test_kv_fuzz_seeds_give_a_lease_or_name_the_fault(key, value, expected):
    """upstream's fuzz seeds for the etcd key/value decoder, each with the outcome it must have."""
    if isinstance(expected, str):
        with pytest.raises(LeaseError) as info:
            lease_from_kv(key, value, None)
        assert str(info.value) == expected
        return
    lease = lease_from_kv(key, value, None)
    subnet, ipv6_subnet, backend_type = expected
    assert str(lease.subnet) == subnet and lease.attrs.backend_type == backend_type
    assert (str(lease.ipv6_subnet) if lease.ipv6_subnet else None) == ipv6_subnet


def test_ipv6_only_keys_are_the_embedded_stores_and_never_etcds():
    key = "fd00:10:244:7::-64"
    assert make_subnet_key(None, ipaddress.ip_network("fd00:10:244:7::/64")) == key
    assert parse_subnet_key(key, True) == (None, ipaddress.ip_network("fd00:10:244:7::/64"))
    assert parse_subnet_key("/coreos.com/network/subnets/" + key, True)[1] == ipaddress.ip_network("fd00:10:244:7::/64")
    assert parse_subnet_key(key) is None  # upstream's schema (etcd) has no IPv6-only key
    for bad in ("fd00::-128", "fd00::1-64", "fd00::-", "10.1.0.0", "fd00:::-64", "x:y::-64"):
        assert parse_subnet_key(bad, True) is None, bad


def test_ipv6_only_lease_value_needs_a_public_ipv6():
    value = '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::1","BackendType":"udp"}'
    lease = lease_from_kv("fd00:10:244:7::-64", value, None, True)
    assert lease.subnet is None and lease.primary == ipaddress.ip_network("fd00:10:244:7::/64")
    assert lease.attrs.to_json() == value
    with pytest.raises(LeaseError, match="no PublicIPv6"):
        lease_from_kv("fd00:10:244:7::-64", '{"PublicIP":"0.0.0.0","PublicIPv6":null}', None, True)
