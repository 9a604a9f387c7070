"""net-conf.json as an operator (or a ConfigMap) hands it over: any bytes give a checked configuration or one
ConfigError with a one-line message, never another exception."""

from __future__ import annotations

from flannel_udp.subnet.config import ConfigError, load_config


def test_one_input(data: bytes) -> None:
    try:
        config = load_config(data)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return
    if config.enable_ipv4:  # (neither family is accepted here, as upstream's parser does; the daemon refuses it)
        assert config.network.prefixlen <= config.subnet_len <= 30
