"""Upstream pkg/subnet/config_test.go cases, the derived-value table and every error message of pkg/subnet/config.go."""

import ipaddress

import pytest

from flannel_udp.subnet.config import ConfigError, load_config, parse_config


def test_config_defaults_lowercase_key():
    cfg = load_config('{ "network": "10.3.0.0/16" }')
    assert str(cfg.network) == "10.3.0.0/16"
    assert str(cfg.subnet_min) == "10.3.1.0"
    assert str(cfg.subnet_max) == "10.3.255.0"
    assert cfg.subnet_len == 24


def test_ipv6_config_defaults():
    cfg = load_config('{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }')
    assert str(cfg.ipv6_network) == "fc00::/48"
    assert str(cfg.ipv6_subnet_min) == "fc00:0:0:1::"
    assert str(cfg.ipv6_subnet_max) == "fc00:0:0:ffff::"
    assert cfg.ipv6_subnet_len == 64


def test_config_overrides_parse_only():
    cfg = parse_config(
        '{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0", "SubnetLen": 28 }'
    )
    assert (str(cfg.subnet_min), str(cfg.subnet_max), cfg.subnet_len) == ("10.3.5.0", "10.3.8.0", 28)


def test_ipv6_config_overrides_parse_only():
    cfg = parse_config(
        '{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::", '
        '"IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }'
    )
    assert (str(cfg.ipv6_subnet_min), str(cfg.ipv6_subnet_max), cfg.ipv6_subnet_len) == (
        "fc00:0:0:1::",
        "fc00:0:0:f::",
        124,
    )


@pytest.mark.parametrize(
    "network,subnet_len,exp_len,exp_min,exp_max,count",
    [
        ("10.3.0.0/16", None, 24, "10.3.1.0", "10.3.255.0", 255),
        ("10.0.0.0/8", None, 24, "10.0.1.0", "10.255.255.0", 65535),
        ("10.5.0.0/22", None, 24, "10.5.1.0", "10.5.3.0", 3),
        ("10.5.0.0/23", None, 25, "10.5.0.128", "10.5.1.128", 3),
        ("10.5.0.0/24", None, 26, "10.5.0.64", "10.5.0.192", 3),
        ("10.5.0.0/28", None, 30, "10.5.0.4", "10.5.0.12", 3),
        ("10.3.0.0/16", 18, 18, "10.3.64.0", "10.3.192.0", 3),
        ("10.0.0.0/8", 20, 20, "10.0.16.0", "10.255.240.0", 4095),
        ("10.3.5.7/16", None, 24, "10.3.1.0", "10.3.255.0", 255),
    ],
)
def test_derived_table(network, subnet_len, exp_len, exp_min, exp_max, count):
    extra = f', "SubnetLen": {subnet_len}' if subnet_len else ""
    cfg = load_config(f'{{"Network": "{network}"{extra}}}')
    assert (cfg.subnet_len, str(cfg.subnet_min), str(cfg.subnet_max), cfg.subnet_count()) == (
        exp_len,
        exp_min,
        exp_max,
        count,
    )
    assert cfg.network == ipaddress.ip_network(network, strict=False)


@pytest.mark.parametrize(
    "network,exp_len,exp_min,exp_max",
    [
        ("fc00::/48", 64, "fc00:0:0:1::", "fc00:0:0:ffff::"),
        ("fc00::/56", 64, "fc00:0:0:1::", "fc00:0:0:ff::"),
        ("fc00::/63", 65, "fc00::8000:0:0:0", "fc00:0:0:1:8000::"),
        ("fc00::/124", 126, "fc00::4", "fc00::c"),
    ],
)
def test_derived_table_v6(network, exp_len, exp_min, exp_max):
    cfg = load_config(f'{{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "{network}"}}')
    assert (cfg.ipv6_subnet_len, str(cfg.ipv6_subnet_min), str(cfg.ipv6_subnet_max)) == (exp_len, exp_min, exp_max)


@pytest.mark.parametrize(
    "text,message",
    [
        ("{}", "please define a correct Network parameter in the flannel config"),
        ('{"Network": "0.0.0.0/0"}', "please define a correct Network parameter in the flannel config"),
        ('{"Network": "10.3.0.0/16", "SubnetLen": 31}', "SubnetLen must be less than /31"),
        ('{"Network": "10.3.0.0/16", "SubnetLen": 17}', "network must be able to accommodate at least four subnets"),
        ('{"Network": "10.5.0.0/29"}', "network is too small. Minimum useful network prefix is /28"),
        ('{"Network": "10.3.0.0/16", "SubnetMin": "10.4.0.0"}', "SubnetMin is not in the range of the Network"),
        ('{"Network": "10.3.0.0/16", "SubnetMax": "10.4.0.0"}', "SubnetMax is not in the range of the Network"),
        ('{"Network": "10.3.0.0/16", "SubnetMin": "10.3.1.5"}', "SubnetMin is not on a SubnetLen boundary: 10.3.1.5"),
        ('{"Network": "10.3.0.0/16", "SubnetMax": "10.3.9.1"}', "SubnetMax is not on a SubnetLen boundary: 10.3.9.1"),
        (
            '{"EnableIPv6": true, "EnableIPv4": false}',
            "please define a correct IPv6Network parameter in the flannel config",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 127}',
            "SubnetLen must be less than /127",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 49}',
            "network must be able to accommodate at least four subnets",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/125"}',
            "IPv6Network is too small. Minimum useful network prefix is /124",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fd00::"}',
            "IPv6SubnetMin is not in the range of the IPv6Network",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fd00::"}',
            "IPv6SubnetMax is not in the range of the IPv6Network",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::1"}',
            "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::1",
        ),
        (
            '{"EnableIPv6": true, "EnableIPv4": false, "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc00:0:0:2::1"}',
            "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:2::1",
        ),
    ],
)
def test_check_errors_verbatim(text, message):
    with pytest.raises(ConfigError) as e:
        load_config(text)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "text,field",
    [
        ('{"Network": "10.0.0.0/33"}', "Network"),
        ('{"Network": "fc00::/48"}', "invalid IPv4 CIDR format"),
        ('{"Network": "10.0.0.0/8", "SubnetLen": "24"}', "SubnetLen"),
        ('{"Network": "10.0.0.0/8", "SubnetLen": -1}', "SubnetLen"),
        ('{"Network": "10.0.0.0/8", "SubnetMin": ""}', "SubnetMin"),
        ('{"Network": "10.0.0.0/8", "SubnetMin": 5}', "SubnetMin"),
        ('{"Network": "10.0.0.0/8", "SubnetMax": null}', "SubnetMax"),
        ('{"Network": "10.0.0.0/8", "Backend": "vxlan"}', "error decoding Backend property of config"),
        ('{"Network": "10.0.0.0/8", "EnableIPv4": "yes"}', "EnableIPv4"),
        ("[1,2]", "JSON object"),
        ('{"Network": ', "invalid JSON"),
        ("", "invalid JSON"),
    ],
)
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(ConfigError) as e:
        load_config(text)
    assert field in str(e.value)


def test_backend_type_rules():
    assert parse_config("{}").backend_type == "udp"
    cfg = parse_config('{"Backend":{"Type":"VXLAN"}}')
    assert cfg.backend_type == "VXLAN" and cfg.backend_name == "vxlan"
    assert parse_config('{"Backend":null}').backend_type == ""
    assert parse_config('{"Backend":{}}').backend_type == ""
    assert parse_config('{"backend":{"type":"host-gw","port":1}}').backend_type == "host-gw"


def test_keys_case_insensitive_last_wins_unknown_ignored():
    cfg = parse_config('{"Network":"10.1.0.0/16","NETWORK":"10.2.0.0/16","Foo":1}')
    assert str(cfg.network) == "10.2.0.0/16"
    assert parse_config('{"Network":"10.1.0.0/16","SubnetLen":null}').subnet_len == 0


def test_min_greater_than_max_is_accepted_and_has_no_subnets():
    cfg = load_config('{"Network":"10.3.0.0/16","SubnetMin":"10.3.9.0","SubnetMax":"10.3.2.0"}')
    assert cfg.subnet_count() == 0


@pytest.mark.parametrize(
    "seed",
    [
        '{"Network":"10.0.0.0/8"}',
        '{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}',
        '{"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"host-gw"}}',
        '{"Network":"10.0.0.0/8","SubnetMin":"10.0.1.0","SubnetMax":"10.0.20.0"}',
        "",
        "{}",
    ],
)
def test_seeds_give_a_config_or_one_line_config_error(seed):
    """The seeds upstream's fuzz test starts from (the netconf fuzz target goes on from fuzz/corpus/netconf)."""
    try:
        config = load_config(seed)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert config.enable_ipv4 or config.enable_ipv6
